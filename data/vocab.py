"""Phone vocabularies: build from data, load from a file, and the released 392-token vocabulary.

Layout (the released model's): `<pad>` = 0 is the CTC blank, then `<s>`, `</s>`, `<unk>`, then
phones by decreasing frequency. There is no word-boundary token.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

from phonetune.data.errors import PhonetuneError

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
BLANK_TOKEN = "<pad>"
BLANK_ID = 0
VOCAB_FILE = "vocab.json"  # its name in a prepared dataset, a checkpoint and an export
RELEASED_VOCAB_PATH = Path(__file__).parent / "reference" / "espeak_cv_ft_vocab.json"


def build_vocab(phone_counts: Counter[str]) -> dict[str, int]:
    """Special tokens, then phones by frequency (ties broken by the token, for determinism)."""
    phones = sorted(
        (p for p in phone_counts if p not in SPECIAL_TOKENS), key=lambda p: (-phone_counts[p], p)
    )
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(phones))}


def load_vocab(path: Path) -> dict[str, int]:
    """Read a token -> id JSON file and check it has the CTC layout phonetune relies on."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PhonetuneError(f"vocabulary file {path} does not exist") from None
    except OSError as error:  # a folder, no permission
        raise PhonetuneError(
            f"cannot read vocabulary file {path}: {error.strerror or error}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PhonetuneError(f"vocabulary file {path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
        raise PhonetuneError(f"vocabulary file {path} must be a JSON object of token -> integer id")
    vocab = _normalize_keys(raw)
    problems = []
    if sorted(vocab.values()) != list(range(len(vocab))):
        problems.append("ids are not 0..N-1 without gaps or duplicates")
    if vocab.get(BLANK_TOKEN) != BLANK_ID:
        problems.append(f"{BLANK_TOKEN} (the CTC blank) must have id {BLANK_ID}")
    if "<unk>" not in vocab:
        problems.append("<unk> is missing")
    if problems:
        raise PhonetuneError(f"vocabulary file {path} cannot be used: {'; '.join(problems)}")
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def _normalize_keys(raw: dict[str, int]) -> dict[str, int]:
    """NFC-normalise tokens, as phones are, so that look-alike spellings match.

    The released vocabulary spells some nasal vowels decomposed (u + U+0303) and `ũ` twice, once
    each way. A token keeps its raw spelling when its NFC form is already a token of the file, so
    no id is lost and the id of the NFC spelling is the one phones map to.
    """
    normalized: dict[str, int] = {}
    for token, index in raw.items():
        nfc = unicodedata.normalize("NFC", token)
        normalized[token if nfc != token and nfc in raw else nfc] = index
    return normalized


def load_released_vocab() -> dict[str, int]:
    """The 392-token vocabulary of facebook/wav2vec2-xlsr-53-espeak-cv-ft, tokens NFC-normalised."""
    return load_vocab(RELEASED_VOCAB_PATH)


def save_vocab(vocab: dict[str, int], path: Path) -> None:
    path.write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
