"""Articulatory features of espeak-ng phone tokens, a feature-weighted phone distance, and the
mapping of a model's phones onto a target language's inventory (zero-shot evaluation).

Features come from panphon (Mortensen et al. 2016): 24 articulatory features per IPA segment, each
+1, 0 (unspecified) or -1. panphon describes IPA *segments*; espeak-ng's phone *tokens* are
sometimes several segments (`aɪ`, `ɑːɹ`, `ɑu2`) or use symbols panphon does not know (`ɚ`, `ᵻ`,
tone digits, Kirshenbaum letters in the released vocabulary). `phone_features` turns a token into
segments in these steps, each recorded in `PhoneFeatures.notes` (docs/zero_shot.md has the table):

1. tone: ASCII digits are Mandarin tone numbers (`i5`, `ɑu2`); a final `ɜ` after another symbol is
   tone 3 as the released vocabulary writes it (`iɜ`, `onɡɜ`). Features ignore tone; the mapping
   uses it only to break ties;
2. symbols rewritten to what panphon knows (`SYMBOLS`, `TOKENS`): `ɚ` -> `əɹ`, `ɝ` -> `ɜɹ`,
   `ᵻ` -> `ɨ`, `əl` -> `l̩` (espeak's syllabic l), ASCII `g`, `:`, `S`, `Z`, `N`, ... of the
   released vocabulary, Kirshenbaum retroflex `s.` -> `ʂ`, aspiration `th` -> `tʰ`;
3. rhotic vowels (`ɑːɹ`, `ɚ` = `əɹ`) and diphthongs (`aɪ`, `ɑu`) stay several segments: the vowel,
   then its off-glide;
4. stop + fricative (`tʃ`, `ts`, `pf`) becomes panphon's tied affricate (`t͡ʃ`); two identical
   segments (`ää`, `cʰcʰ`) become one long segment; a length mark panphon cannot attach sets the
   `long` feature of the segment before it;
5. whatever panphon still cannot read is dropped and noted (`ᵝ` of `ɯᵝ`); a token left with no
   segment at all (a bare tone digit `1`) has no features.

A token's feature vector is a weighted mean of its segments' vectors: the head (the nucleus, see
`_head`) weighs 2, every other segment 1. So `ɑːɹ` is mostly `ɑː` and a little `ɹ`, and maps to an
`ɑ`-like vowel, not to `ɹ`, in a language without r-coloured vowels.
"""

from __future__ import annotations

import csv
import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from phonetune.data.errors import PhonetuneError
from phonetune.data.vocab import SPECIAL_TOKENS

TIE_BAR = "\u0361"
LONG = "ː"
HEAD_WEIGHT = 2.0  # the head segment of a multi-segment token weighs twice each other segment

# Character rewrites, applied to every token (after tone digits are removed): espeak-ng symbols and
# the ASCII/Kirshenbaum letters of the released 392-token vocabulary (older espeak-ng), spelled as
# the IPA panphon knows.
SYMBOLS: dict[str, str] = {
    "ɚ": "əɹ",  # r-coloured schwa: schwa with an r off-glide (panphon has no rhotic feature)
    "ɝ": "ɜɹ",  # r-coloured open-mid central vowel, likewise
    "ᵻ": "ɨ",  # espeak's reduced close central vowel (en "roses")
    "g": "ɡ",  # ASCII g -> IPA script g
    ":": LONG,  # ASCII colon as length mark (`u:`)
    "ˑ": "",  # half-long: treated as short
    "\u030d": "\u0329",  # syllabic mark above -> below (the form panphon knows)
    "\u030a": "\u0325",  # voiceless ring above -> below
    "[": "\u032a",  # Kirshenbaum dental (`t[`) -> dental diacritic
    '"': "\u0308",  # Kirshenbaum centralised (`u"`) -> centralised diacritic
    "?": "ʔ",  # Kirshenbaum glottal stop
    "S": "ʃ",
    "Z": "ʒ",
    "N": "ŋ",
    "X": "χ",
}
# Whole-token rewrites (after tone removal), for units whose meaning depends on the whole token.
TOKENS: dict[str, str] = {
    "əl": "l̩",  # espeak (en) writes syllabic l as `əl`
    "ər": "əɹ",  # Mandarin r-coloured vowel (`ər2`)
    "i.": "ɻ̩",  # Mandarin apical vowel after retroflexes (zhi, chi, shi), older espeak-ng
    "i̪": "ɹ̩",  # Mandarin apical vowel after dental sibilants (zi, ci, si)
    "sx": "ɧ",  # Swedish sj-sound
    "ʲ": "j",  # a bare palatalisation mark: the palatal glide it stands for
}
# Kirshenbaum retroflex: a consonant followed by "." (`s.`, `ts.h` in the released vocabulary).
RETROFLEX = {
    **{"t": "ʈ", "d": "ɖ", "s": "ʂ", "z": "ʐ", "n": "ɳ", "l": "ɭ", "r": "ɻ"},
    **{"ts": "ʈʂ", "dz": "ɖʐ"},  # the retroflex affricates (Mandarin zh, ch: `ts.`, `ts.h`)
}
# espeak's `^` (Russian `ɪ^` in "дверь", `t^` in the released vocabulary): after a vowel a
# non-syllabic vowel (the palatal off-glide of a soft consonant), after a consonant palatalisation.
_CARET = re.compile(r"(.)\^")
_VOWELS = frozenset("aeiouyæøœɐɑɒɔəɘɛɜɞɤɨɪɯɵɶʉʊʌʏ")
# Stops and affricates that a final "h" aspirates in the released vocabulary (`th`, `tsh`, `tɕh`).
_ASPIRATED = re.compile(r"^([ptkcqbdɡ]|[tdʈ][szɕʑʂʐʃʒ])h$")
# Mandarin finals spelled with n + ɡ for the velar nasal coda (`onɡ5` in the released vocabulary).
_VELAR_CODA = re.compile(r"(?<=[aeiouəɑɔʊ])nɡ$")
_TONE_DIGITS = re.compile(r"[0-9]")


@dataclass(frozen=True)
class PhoneFeatures:
    """How one phone token is described: its segments, feature vector, tone and handling notes."""

    token: str
    segments: tuple[str, ...]  # the panphon segments used, in order (NFC, as phones are)
    vector: np.ndarray | None = field(compare=False)  # head-weighted mean; None: no features
    tone: str = ""  # Mandarin tone number ("" when the token carries none)
    notes: tuple[str, ...] = ()

    @property
    def has_features(self) -> bool:
        return self.vector is not None


# --- panphon ----------------------------------------------------------------------------------
@functools.cache
def _table():  # noqa: ANN202 - panphon.FeatureTable
    """panphon's feature table, loaded once (a few seconds: it parses its CSV files)."""
    import panphon

    return panphon.FeatureTable()


@functools.cache
def feature_names() -> tuple[str, ...]:
    """panphon's 24 feature names, in the order of every vector here."""
    return tuple(_table().names)


@functools.cache
def feature_weights() -> np.ndarray:
    """panphon's feature weights (data/feature_weights.csv), aligned to `feature_names()` by name.

    Read by name because panphon's `weights` list follows the weights file's column order, which is
    not the order of its feature vectors. The tone features (`hitone`, `hireg`) have no weight:
    espeak writes tone as digits, which are kept out of the features (see the module docstring).
    """
    with (
        resources.files("panphon").joinpath("data/feature_weights.csv").open(encoding="utf-8") as f
    ):
        header, values = list(csv.reader(f))[:2]
    by_name = dict(zip(header, (float(v) for v in values), strict=True))
    return np.array([by_name.get(name, 0.0) for name in feature_names()])


def _segment_vector(segment: str) -> np.ndarray | None:
    features = _table().fts(segment)
    return np.array(features.numeric(), dtype=np.float64) if features else None


# --- from token to segments -------------------------------------------------------------------
def split_tone(token: str) -> tuple[str, str]:
    """(token without tone, tone): `i5` -> (`i`, `5`), `ɑu2` -> (`ɑu`, `2`), `iɜ` -> (`i`, `3`)."""
    tone = "".join(_TONE_DIGITS.findall(token))
    base = _TONE_DIGITS.sub("", token)
    if not tone and len(base) > 1 and base.endswith("ɜ") and not base.endswith("ːɜ"):
        # The released vocabulary writes Mandarin tone 3 as a final ɜ (i1 i2 iɜ i4 i5).
        base, tone = base[:-1], "3"
    return base, tone


def _rewrite(base: str, notes: list[str]) -> str:
    if base in TOKENS:
        notes.append(f"{base} read as {TOKENS[base]}")
        return TOKENS[base]
    text = base
    if _VELAR_CODA.search(text):
        text = _VELAR_CODA.sub("ŋ", text)  # Mandarin final `onɡ`: the velar nasal coda
        notes.append("final nɡ read as ŋ")
    rewritten = "".join(SYMBOLS.get(char, char) for char in text)
    if rewritten != text:
        notes.append(f"{text} read as {rewritten}")
        text = rewritten
    retroflex = re.sub(r"(t?s|d?z|[tdnlr])\.", lambda m: RETROFLEX[m.group(1)], text)
    if retroflex != text:
        notes.append(f"Kirshenbaum retroflex {text} read as {retroflex}")
        text = retroflex
    marked = _CARET.sub(lambda m: m.group(1) + ("\u032f" if m.group(1) in _VOWELS else "ʲ"), text)
    if marked != text:
        notes.append(f"espeak ^ of {text} read as {marked}")
        text = marked
    if _ASPIRATED.match(text):
        notes.append(f"final h of {text} read as aspiration")
        text = text[:-1] + "ʰ"
    return text


def _parse_segments(text: str, notes: list[str]) -> list[tuple[str, bool]]:
    """panphon segments of `text` with a flag for a length mark panphon could not attach.

    Characters panphon cannot place are dropped and noted; a dropped length mark lengthens the
    segment before it instead.
    """
    text = unicodedata.normalize("NFD", text)
    segments: list[tuple[str, bool]] = []
    position = 0
    dropped: list[str] = []
    for segment in _table().ipa_segs(text):
        start = text.find(segment, position)
        for char in text[position:start]:
            if char == LONG and segments:
                segments[-1] = (segments[-1][0], True)
            else:
                dropped.append(char)
        segments.append((segment, False))
        position = start + len(segment)
    for char in text[position:]:
        if char == LONG and segments:
            segments[-1] = (segments[-1][0], True)
        else:
            dropped.append(char)
    if dropped:
        notes.append("ignored (no panphon features): " + " ".join(dropped))
    return segments


def _tie_affricates(segments: list[tuple[str, bool]], notes: list[str]) -> list[tuple[str, bool]]:
    """Stop + fricative (`t`, `ʃ`) -> panphon's tied affricate `t͡ʃ` where panphon knows it."""
    tied: list[tuple[str, bool]] = []
    for segment, long in segments:
        fricative = segment.removesuffix(LONG)  # `tsː`: tie `t͡s`, then lengthen it
        if (
            tied
            and not tied[-1][1]
            and _manner(tied[-1][0]) == "stop"
            and _manner(fricative) == "fricative"
        ):
            affricate = tied[-1][0] + TIE_BAR + fricative
            if _segment_vector(affricate) is not None:
                notes.append(f"affricate {affricate}")
                tied[-1] = (affricate, long or fricative != segment)
                continue
        tied.append((segment, long))
    return tied


def _manner(segment: str) -> str:
    """The manner of a segment from panphon's features: "stop", "fricative" or "" (others)."""
    vector = _segment_vector(segment)
    if vector is None:
        return ""
    value = dict(zip(feature_names(), vector, strict=True))
    if value["cons"] <= 0 or value["son"] >= 0:
        return ""
    if value["cont"] > 0:
        return "fricative"
    return "stop" if value["delrel"] < 0 else ""


def _merge_geminates(segments: list[tuple[str, bool]], notes: list[str]) -> list[tuple[str, bool]]:
    """Two identical segments in one token (`ää`, `cʰcʰ`) are one long segment."""
    merged: list[tuple[str, bool]] = []
    for segment, long in segments:
        if merged and merged[-1][0] == segment:
            merged[-1] = (segment, True)
            notes.append(f"doubled {segment} read as long")
        else:
            merged.append((segment, long))
    return merged


def _head(vectors: list[np.ndarray]) -> int:
    """Index of a token's head segment: its most open syllabic segment (the first of equals).

    The nucleus of a falling diphthong comes first (`aɪ`, `ɑu`), of a rising one last (`ia`,
    `uo`), of a triphthong in the middle (`iou`): the most open vowel finds it in each case.
    Centring diphthongs (`ɪə`) thus lean toward their schwa. With no syllabic segment (a
    consonant cluster), the first segment is the head.
    """
    names = feature_names()
    syl, hi, lo = names.index("syl"), names.index("hi"), names.index("lo")
    syllabic = [i for i, v in enumerate(vectors) if v[syl] > 0]
    if not syllabic:
        return 0
    # close (hi+) 0, mid 1, open (lo+) 2; syllabic consonants (no height) count as close.
    return max(syllabic, key=lambda i: (1 - max(vectors[i][hi], 0) + max(vectors[i][lo], 0), -i))


@functools.lru_cache(maxsize=4096)
def phone_features(token: str) -> PhoneFeatures:
    """Articulatory description of one espeak-ng phone token (see the module docstring)."""
    token = unicodedata.normalize("NFC", token)
    notes: list[str] = []
    if token in SPECIAL_TOKENS:
        return PhoneFeatures(token, (), None, "", ("special token: no features",))
    base, tone = split_tone(token)
    if tone:
        notes.append(f"tone {tone} kept out of the features")
    text = _rewrite(base, notes) if base else ""
    segments = _merge_geminates(_tie_affricates(_parse_segments(text, notes), notes), notes)
    if not segments:
        notes.append("no segment panphon knows: no features")
        return PhoneFeatures(token, (), None, tone, tuple(notes))
    vectors = []
    long_index = feature_names().index("long")
    for segment, long in segments:
        vector = _segment_vector(segment)
        if long:
            vector[long_index] = 1.0
        vectors.append(vector)
    head = _head(vectors)
    weights = np.ones(len(vectors))
    weights[head] = HEAD_WEIGHT
    if len(vectors) > 1:
        notes.append(f"{len(vectors)} segments, head {segments[head][0]}")
    vector = np.average(np.stack(vectors), axis=0, weights=weights)
    return PhoneFeatures(
        token,
        tuple(_display(segment, long) for segment, long in segments),
        vector,
        tone,
        tuple(notes),
    )


def _display(segment: str, long: bool) -> str:
    if long and not segment.endswith(LONG):
        segment += LONG
    return unicodedata.normalize("NFC", segment)


# --- distances --------------------------------------------------------------------------------
def phone_distance(a: str, b: str) -> float:
    """Feature-weighted distance between two phone tokens, from 0 (same features) to 1.

    The sum over panphon's features of weight x |difference|, divided by its largest possible
    value (2 x the sum of the weights). Tone is not a feature: `i1` and `i5` are at distance 0.
    A token without features is at distance 1 from every other token.
    """
    if a == b:
        return 0.0
    fa, fb = phone_features(a), phone_features(b)
    if fa.vector is None or fb.vector is None:
        return 1.0
    weights = feature_weights()
    return float(np.sum(weights * np.abs(fa.vector - fb.vector)) / (2 * weights.sum()))


def feature_substitution_cost(a: str, b: str) -> float:
    """The substitution cost of the phone feature error rate: the share of features that differ.

    For single-segment phones this is panphon's `hamming_substitution_cost`: the number of the 24
    features whose values differ, over 24. A multi-segment token's averaged values count as
    min(1, |difference|) per feature. Unweighted, as the PFER of the literature is.
    """
    if a == b:
        return 0.0
    fa, fb = phone_features(a), phone_features(b)
    if fa.vector is None or fb.vector is None:
        return 1.0
    return float(np.mean(np.minimum(1.0, np.abs(fa.vector - fb.vector))))


# --- mapping onto a target inventory ----------------------------------------------------------
@dataclass
class PhoneMapping:
    """Each source phone (the model's) -> its nearest phone of a target inventory."""

    mapping: dict[str, str]
    distances: dict[str, float]
    unmappable: list[str]  # no features and not in the inventory: left as they are

    def apply(self, phones: str) -> str:
        """Map a space-separated phone string token by token (its length does not change)."""
        return " ".join(self.mapping.get(phone, phone) for phone in phones.split())

    def changed(self) -> dict[str, str]:
        """Only the phones that map to another phone."""
        return {source: target for source, target in self.mapping.items() if source != target}


def map_phones(source_phones: Iterable[str], inventory: Mapping[str, int]) -> PhoneMapping:
    """Map each source phone to its nearest target phone (the paper's articulatory mapping).

    A phone of the inventory maps to itself. Any other phone goes to the target phone with the
    smallest `phone_distance`; ties go to a phone with the same tone, then to the phone more
    frequent in the inventory's text, then to the first in Unicode order, so the mapping is
    deterministic. A source phone without features that the inventory lacks is left as it is.
    """
    targets = [phone for phone in inventory if phone not in SPECIAL_TOKENS]
    if not targets:
        raise PhonetuneError("the target phone inventory is empty: there is nothing to map onto")
    mapping: dict[str, str] = {}
    distances: dict[str, float] = {}
    unmappable: list[str] = []
    for source in dict.fromkeys(source_phones):
        if source in SPECIAL_TOKENS:
            continue
        if source in inventory:
            mapping[source], distances[source] = source, 0.0
            continue
        if not phone_features(source).has_features:
            unmappable.append(source)
            mapping[source], distances[source] = source, 1.0
            continue
        tone = phone_features(source).tone

        def rank(target: str, source: str = source, tone: str = tone) -> tuple:
            return (
                round(phone_distance(source, target), 9),
                phone_features(target).tone != tone,
                -inventory[target],
                target,
            )

        best = min(targets, key=rank)
        mapping[source], distances[source] = best, phone_distance(source, best)
    return PhoneMapping(mapping, distances, unmappable)


# --- target inventories -----------------------------------------------------------------------
def inventory_from_transcripts(transcripts: Iterable[str]) -> Counter[str]:
    """Phone counts of space-separated phone transcripts (special tokens left out)."""
    counts: Counter[str] = Counter()
    for transcript in transcripts:
        counts.update(p for p in transcript.split() if p not in SPECIAL_TOKENS)
    return counts


def read_inventory(path: Path) -> Counter[str]:
    """A user's phone inventory file: phones separated by spaces or new lines, `#` comments.

    Phones are espeak-ng tokens as the model writes them (`aɪ`, `tʃ`, `i5`). Each listed phone
    counts once per occurrence (only used to break ties in the mapping).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PhonetuneError(f"--inventory {path}: no such file") from None
    except UnicodeDecodeError as error:
        raise PhonetuneError(f"--inventory {path} is not UTF-8 text: {error}") from None
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    counts = inventory_from_transcripts(unicodedata.normalize("NFC", line) for line in lines)
    if not counts:
        raise PhonetuneError(
            f"--inventory {path} lists no phones: write the target language's phones separated "
            "by spaces or new lines (espeak-ng tokens such as `a`, `tʃ`, `aɪ`)"
        )
    return counts


@dataclass
class TextInventory:
    """Phones of a target-language text phonemized with espeak-ng, and what was skipped."""

    phones: Counter[str]
    sentences: int
    skipped: dict[str, int]  # reason -> number of lines


def inventory_from_text(path: Path, locale: str) -> TextInventory:
    """Phonemize the lines of a text file with the locale's espeak-ng voice (as `prepare` does).

    Lines in a script espeak-ng would spell out letter by letter, and lines that yield no phones,
    are skipped and counted, as preparation rejects such sentences.
    """
    from phonetune.data.locales import foreign_scripts, get_locale
    from phonetune.data.phonemize import phonemize_batch

    spec = get_locale(locale)
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise PhonetuneError(f"--inventory-text {path}: no such file") from None
    except UnicodeDecodeError as error:
        raise PhonetuneError(f"--inventory-text {path} is not UTF-8 text: {error}") from None
    lines = [line for line in lines if line]
    skipped: Counter[str] = Counter()
    readable = []
    for line in lines:
        if foreign_scripts(line, spec):
            skipped["script espeak-ng would spell out"] += 1
        else:
            readable.append(line)
    phones = phonemize_batch(readable, spec.espeak) if readable else []
    skipped["no phones"] += sum(1 for p in phones if not p)
    counts = inventory_from_transcripts(phones)
    if not counts:
        raise PhonetuneError(
            f"--inventory-text {path}: no phones from {len(lines)} line(s) of {locale} text "
            f"(espeak-ng voice {spec.espeak}); give sentences in the target language, one a line"
        )
    return TextInventory(counts, len(readable), {k: v for k, v in skipped.items() if v})
