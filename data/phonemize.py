"""Batched, cached phonemization with the released model's scheme.

The scheme (what `facebook/wav2vec2-xlsr-53-espeak-cv-ft` was trained on): espeak-ng phones separated
by single spaces, no word boundary token, no stress marks, espeak's multi-character units (`aɪ`,
`tʃ`, `ɑːɹ`, `i5`) kept as single tokens. phonemizer is called with `Separator(phone=" ", word="")`
and `strip=False`: with `strip=True` the last phone of a word is glued to the first of the next
(`ɚk`), which multiplies the vocabulary. Tokens are NFC-normalised so look-alike code point sequences
compare equal to the released vocabulary.
"""

from __future__ import annotations

import logging
import sqlite3
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from phonetune.data.errors import PhonetuneError
from phonetune.data.espeak import configure_phonemizer

LANGUAGE_SWITCH_POLICIES = ("remove-flags", "remove-utterance")
# Bump when the scheme above changes: old cache entries then stop matching.
SCHEME_VERSION = 1
BATCH_SIZE = 512
LOCK_TIMEOUT_S = 60.0
LOOKUP_BATCH = 500  # sentences per cache query (SQLite allows 999 parameters before 3.32)

# One backend per language per process: creating a backend copies the espeak library to a
# temporary folder, so one per sentence is slow and leaks (PITFALLS: "Backend per call").
_BACKENDS: dict[tuple[str, str], object] = {}


def _get_backend(language: str, policy: str):  # noqa: ANN202 - phonemizer's EspeakBackend
    key = (language, policy)
    if key not in _BACKENDS:
        configure_phonemizer()
        from phonemizer.backend import EspeakBackend

        # With no word separator phonemizer's word-count check always "mismatches": silence it.
        logger = logging.getLogger("phonetune.phonemizer")
        logger.setLevel(logging.ERROR)
        _BACKENDS[key] = EspeakBackend(
            language, with_stress=False, language_switch=policy, logger=logger
        )
    return _BACKENDS[key]


# espeak-ng version drift, undone so phones stay in the released vocabulary: 1.52 writes Italian
# geminate s ("rossa") as one unit `ss`, where the released vocabulary (older espeak-ng) has no
# such token and other doubled consonants come out as two tokens ("bello" -> b ɛ l l o).
_DRIFT: dict[str, str] = {"ss": "s s"}


def normalize_phones(raw: str) -> str:
    """phonemizer output -> single-space-separated NFC phone tokens."""
    tokens = (unicodedata.normalize("NFC", token) for token in raw.split())
    return " ".join(_DRIFT.get(token, token) for token in tokens)


def phonemize_batch(
    sentences: Sequence[str], language: str, policy: str = "remove-flags"
) -> list[str]:
    """Phones for each sentence (an empty string where espeak-ng produced none)."""
    if policy not in LANGUAGE_SWITCH_POLICIES:
        raise ValueError(
            f"language switch policy must be one of {LANGUAGE_SWITCH_POLICIES}, not {policy!r}"
        )
    from phonemizer.separator import Separator

    backend = _get_backend(language, policy)
    separator = Separator(phone=" ", word="", syllable="")
    phones: list[str] = []
    for start in range(0, len(sentences), BATCH_SIZE):
        batch = list(sentences[start : start + BATCH_SIZE])
        # njobs=1: preparation parallelises over locales and clips itself.
        raw = backend.phonemize(batch, separator=separator, strip=False, njobs=1)
        phones.extend(normalize_phones(line) for line in raw)
    return phones


def phonemize_words(
    sentences: Sequence[str], language: str, policy: str = "remove-flags"
) -> list[list[str] | None]:
    """Each sentence's phones word by word (each word's phones space-separated), where espeak-ng's
    words put together give exactly `phonemize_batch`'s phones; None where they do not.

    The same espeak-ng call with a word separator: phones are unchanged, only where one word ends
    is marked. Words are espeak-ng's, which are not always the written ones ("23" is two).
    """
    from phonemizer.separator import Separator

    backend = _get_backend(language, policy)
    separator = Separator(phone=" ", word=_WORD_MARK, syllable="")
    raw = backend.phonemize(list(sentences), separator=separator, strip=False, njobs=1)
    plain = phonemize_batch(sentences, language, policy)
    words: list[list[str] | None] = []
    for line, phones in zip(raw, plain, strict=True):
        pieces = [normalize_phones(word) for word in line.split(_WORD_MARK)]
        pieces = [piece for piece in pieces if piece]
        words.append(pieces if " ".join(pieces) == phones else None)
    return words


# Never part of a phone: espeak-ng's IPA has no vertical bar.
_WORD_MARK = "|"


class PhonemeCache:
    """Phones already computed, on disk, keyed by (text, language, espeak-ng version, policy, scheme).

    SQLite (standard library, safe to share between runs, no pickles). Reads and writes happen in
    the main process only, so no locking between workers is needed.
    """

    def __init__(self, path: Path, espeak_version: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.espeak_version = espeak_version
        try:
            # Per-locale prepare runs on one machine may share the cache: a writer waits for
            # another's short transaction instead of failing at once.
            self._db = sqlite3.connect(path, timeout=LOCK_TIMEOUT_S)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS phones (text TEXT, language TEXT, espeak TEXT,"
                " policy TEXT, scheme INTEGER, phones TEXT,"
                " PRIMARY KEY (text, language, espeak, policy, scheme))"
            )
        except sqlite3.Error as error:
            raise PhonetuneError(
                f"the phoneme cache {path} cannot be used ({error}). Give each job a cache on a "
                "local disk with --cache-dir or PHONETUNE_CACHE_DIR (SQLite's locks do not work "
                "on every network file system)."
            ) from None
        self.hits = 0
        self.misses = 0

    def lookup(self, sentences: Sequence[str], language: str, policy: str) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(sentences))
        # Many sentences per query: one query per sentence would cost a large corpus's main
        # process seconds before any worker has work.
        for start in range(0, len(unique), LOOKUP_BATCH):
            batch = unique[start : start + LOOKUP_BATCH]
            rows = self._db.execute(
                "SELECT text, phones FROM phones WHERE language=? AND espeak=? AND policy=?"
                f" AND scheme=? AND text IN ({', '.join('?' * len(batch))})",
                (language, self.espeak_version, policy, SCHEME_VERSION, *batch),
            )
            found.update(rows)
        self.hits += len(found)
        self.misses += len(unique) - len(found)
        return found

    def store(self, results: dict[str, str], language: str, policy: str) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO phones VALUES (?, ?, ?, ?, ?, ?)",
            [
                (text, language, self.espeak_version, policy, SCHEME_VERSION, phones)
                for text, phones in results.items()
            ],
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()
