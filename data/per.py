"""Phone error rate: the one implementation used by training's evaluation and `phonetune evaluate`.

PER is an edit distance over phone *tokens* (espeak's `aɪ`, `tʃ`, `i5` are one token each), not over
characters. Rates are micro-averaged: errors summed over all utterances of a locale (or of all
locales) divided by the number of reference phones, so long utterances weigh more, as in the paper.

The phone feature error rate (PFER) is the same edit distance with a graded substitution cost: the
share of articulatory features two phones differ in (data.articulatory.feature_substitution_cost),
insertions and deletions cost 1, micro-averaged the same way. As every substitution costs at most
1, PFER <= PER for the same predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rapidfuzz.distance import Levenshtein


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


def feature_edit_distance(
    reference: Sequence[str],
    hypothesis: Sequence[str],
    substitution_cost: Callable[[str, str], float],
) -> float:
    """Smallest total cost turning `reference` into `hypothesis`: insertion and deletion cost 1,
    substituting phone a by b costs `substitution_cost(a, b)` (0 for equal phones, at most 1)."""
    previous = [float(j) for j in range(len(hypothesis) + 1)]
    for i, ref_phone in enumerate(reference, 1):
        current = [float(i)]
        for j, hyp_phone in enumerate(hypothesis, 1):
            substitute = previous[j - 1] + (
                0.0 if ref_phone == hyp_phone else substitution_cost(ref_phone, hyp_phone)
            )
            current.append(min(previous[j] + 1.0, current[j - 1] + 1.0, substitute))
        previous = current
    return previous[-1]


def score_feature_errors(
    predictions: Sequence[str],
    references: Sequence[str],
    locales: Sequence[str],
    substitution_cost: Callable[[str, str], float],
) -> dict[str, dict]:
    """PFER overall and per locale from space-separated phone strings.

    Returns `{"overall": {...}, "per_locale": {locale: {...}}}`, each with `pfer`,
    `feature_errors` (the summed edit cost) and `ref_phones`.
    """
    if not len(predictions) == len(references) == len(locales):
        raise ValueError(
            f"got {len(predictions)} predictions, {len(references)} references and "
            f"{len(locales)} locales: they must pair up one to one"
        )
    totals: dict[str, list[float]] = {}
    for prediction, reference, locale in zip(predictions, references, locales, strict=True):
        ref = reference.split()
        cost = feature_edit_distance(ref, prediction.split(), substitution_cost)
        for key in (locale, None):
            total = totals.setdefault(key, [0.0, 0])
            total[0] += cost
            total[1] += len(ref)

    def rate(errors: float, ref_phones: int) -> dict[str, float | int]:
        pfer = errors / ref_phones if ref_phones else (0.0 if errors == 0 else float("inf"))
        return {"pfer": pfer, "feature_errors": errors, "ref_phones": ref_phones}

    return {
        "overall": rate(*totals.get(None, [0.0, 0])),
        "per_locale": {
            loc: rate(*totals[loc]) for loc in sorted(k for k in totals if k is not None)
        },
    }


def first_per_locale(
    locales: Sequence[str], examples: Sequence[dict[str, str]], count: int
) -> dict[str, list[dict[str, str]]]:
    """The first `count` examples (e.g. reference / prediction pairs) of each locale, locales sorted:
    PER alone does not show what goes wrong."""
    chosen: dict[str, list[dict[str, str]]] = {}
    for locale, example in zip(locales, examples, strict=True):
        kept = chosen.setdefault(locale, [])
        if len(kept) < count:
            kept.append(example)
    return dict(sorted(chosen.items()))


METRIC_DIR = Path(__file__).parent / "metrics" / "phone_error_rate"


def load_metric():  # noqa: ANN201 - returns evaluate.EvaluationModule
    """PER as a Hugging Face `evaluate` metric, loaded offline from the installed package."""
    import evaluate

    return evaluate.load(str(METRIC_DIR))
