"""Phone error rate: the one implementation used by training's evaluation and `phonetune evaluate`.

PER is an edit distance over phone *tokens* (espeak's `aɪ`, `tʃ`, `i5` are one token each), not over
characters. Rates are micro-averaged: errors summed over all utterances of a locale (or of all
locales) divided by the number of reference phones, so long utterances weigh more, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rapidfuzz.distance import Levenshtein

SPECIAL_TOKENS = frozenset({"<pad>", "<s>", "</s>", "<unk>"})


@dataclass
class ErrorCounts:
    """Edit operations between reference and hypothesis phones, summed over utterances."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_phones: int = 0
    utterances: int = 0

    @property
    def per(self) -> float:
        errors = self.substitutions + self.deletions + self.insertions
        if self.ref_phones == 0:
            return 0.0 if errors == 0 else float("inf")
        return errors / self.ref_phones

    def add(self, other: ErrorCounts) -> None:
        self.substitutions += other.substitutions
        self.deletions += other.deletions
        self.insertions += other.insertions
        self.ref_phones += other.ref_phones
        self.utterances += other.utterances

    def as_dict(self) -> dict[str, float | int]:
        return {"per": self.per, **asdict(self)}


def count_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> ErrorCounts:
    """Minimal edit operations turning `reference` phone tokens into `hypothesis` tokens."""
    counts = ErrorCounts(ref_phones=len(reference), utterances=1)
    for op in Levenshtein.editops(list(reference), list(hypothesis)):
        if op.tag == "replace":
            counts.substitutions += 1
        elif op.tag == "delete":
            counts.deletions += 1
        else:
            counts.insertions += 1
    return counts


def score_predictions(
    predictions: Sequence[str], references: Sequence[str], locales: Sequence[str]
) -> dict[str, dict]:
    """PER overall and per locale from space-separated phone strings.

    Returns `{"overall": {...}, "per_locale": {locale: {...}}}`, each with `per`, `substitutions`,
    `deletions`, `insertions`, `ref_phones`, `utterances`.
    """
    if not len(predictions) == len(references) == len(locales):
        raise ValueError(
            f"got {len(predictions)} predictions, {len(references)} references and "
            f"{len(locales)} locales: they must pair up one to one"
        )
    overall = ErrorCounts()
    per_locale: dict[str, ErrorCounts] = {}
    for prediction, reference, locale in zip(predictions, references, locales, strict=True):
        counts = count_errors(reference.split(), prediction.split())
        overall.add(counts)
        per_locale.setdefault(locale, ErrorCounts()).add(counts)
    return {
        "overall": overall.as_dict(),
        "per_locale": {loc: per_locale[loc].as_dict() for loc in sorted(per_locale)},
    }


def greedy_decode(ids: Iterable[int], id_to_token: Mapping[int, str], blank_id: int = 0) -> str:
    """Best-path CTC decoding: collapse repeated ids, drop blanks and special tokens.

    Phones are joined with single spaces and there is no word delimiter, as in the released model.
    """
    phones: list[str] = []
    previous = None
    for token_id in ids:
        token_id = int(token_id)
        if token_id != previous and token_id != blank_id:
            token = id_to_token.get(token_id, "<unk>")
            if token not in SPECIAL_TOKENS:
                phones.append(token)
        previous = token_id
    return " ".join(phones)


METRIC_DIR = Path(__file__).parent / "metrics" / "phone_error_rate"


def load_metric():  # noqa: ANN201 - returns evaluate.EvaluationModule
    """PER as a Hugging Face `evaluate` metric, loaded offline from the installed package."""
    import evaluate

    return evaluate.load(str(METRIC_DIR))
