"""`evaluate` metric module: phone error rate over space-separated phone tokens.

Load it offline with `phonetune.data.per.load_metric()` (or `evaluate.load(<this folder>)`). The arithmetic is
`phonetune.data.per.score_predictions`, the same code training and `phonetune evaluate` use.
"""

import datasets
import evaluate

from phonetune.data.per import score_predictions

_DESCRIPTION = """Phone error rate (PER): (substitutions + deletions + insertions) / reference phones,
computed on phone tokens separated by single spaces, micro-averaged over all utterances."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of phone strings, e.g. "h ə l oʊ".
    references: list of phone strings.
    locales: optional list of locale codes (one per utterance) for per-locale results.
Returns:
    per, substitutions, deletions, insertions, ref_phones, utterances, and per_locale.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PhoneErrorRate(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], locales: list[str] | None = None
    ) -> dict:
        locales = locales if locales is not None else ["all"] * len(predictions)
        scores = score_predictions(predictions, references, locales)
        return {**scores["overall"], "per_locale": scores["per_locale"]}
