"""The model card (README.md) of an export: what the model is, what it was trained on, how well it
does per language, the phonemization and versions behind it, how to use it, and what the export
checks measured."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phonetune import __version__
from phonetune.data.errors import PhonetuneError
from phonetune.data.files import read_json
from phonetune.data.prepared import read_report, split_hours_per_locale
from phonetune.infer.checks import LOGITS_TOLERANCE, ONNX_OPSET, ONNX_TOLERANCE, ExportCheck
from phonetune.train.checkpoint import METRICS_FILE, Checkpoint

if TYPE_CHECKING:
    from transformers import Wav2Vec2Config


def train_hours_per_locale(checkpoint: Checkpoint, report: dict) -> dict[str, float]:
    """Hours of kept training audio of each locale the model was trained on (a run with
    `data.locales` leaves the dataset's other locales out)."""
    hours = split_hours_per_locale(report, checkpoint.train_split())
    trained = checkpoint.train_locales()
    return {loc: h for loc, h in hours.items() if trained is None or loc in trained}


def read_training_dev_per(checkpoint: Checkpoint) -> tuple[float | None, dict[str, float]]:
    """Dev PER training measured at this step: overall from state.json, per locale from metrics.jsonl."""
    overall = checkpoint.state.get("eval_per")
    per_locale: dict[str, float] = {}
    metrics = (checkpoint.run_dir / METRICS_FILE) if checkpoint.run_dir else None
    if metrics is None or not metrics.is_file():
        return overall, per_locale
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(record, dict) or record.get("step") != checkpoint.step:
            continue
        if overall is None and isinstance(record.get("eval_per"), int | float):
            overall = float(record["eval_per"])
        for key in ("eval_per_locale", "per_locale", "eval_per_by_locale"):
            table = record.get(key)
            if isinstance(table, dict):
                for locale, value in table.items():
                    value = value.get("per") if isinstance(value, dict) else value
                    if isinstance(value, int | float):
                        per_locale[locale] = float(value)
    return overall, per_locale


def read_metrics_files(paths: Sequence[Path]) -> dict[str, dict]:
    """`phonetune evaluate` JSON files by split ("test" when a file does not say)."""
    by_split = {}
    for path in paths:
        if not Path(path).is_file():
            raise PhonetuneError(f"--metrics {path}: no such file")
        metrics = read_json(path, None, "--metrics takes the JSON that `phonetune evaluate` wrote.")
        if not is_evaluate_output(metrics):
            raise PhonetuneError(
                f"--metrics {path}: not `phonetune evaluate` output (an object with overall and "
                "per_locale results, each with a per)"
            )
        if (metrics.get("decoding") or {}).get("method", "greedy") != "greedy":
            raise PhonetuneError(
                f"--metrics {path}: decoded with beam search; the model card reports greedy "
                "decoding, what its code does: evaluate without --beam for the card"
            )
        by_split[str(metrics.get("split", "test"))] = metrics
    return by_split


def is_evaluate_output(metrics: object) -> bool:
    def has_per(result: object) -> bool:
        return isinstance(result, dict) and isinstance(result.get("per"), int | float)

    return (
        isinstance(metrics, dict)
        and has_per(metrics.get("overall"))
        and isinstance(metrics.get("per_locale"), dict)
        and all(has_per(result) for result in metrics["per_locale"].values())
    )


def find_metrics_files(checkpoint: Checkpoint) -> list[Path]:
    """Results `phonetune evaluate` left next to the checkpoint (eval_<split>.json; not those of
    beam search, eval_<split>_beam.json: the card reports what its own greedy code gives)."""
    return sorted(p for p in checkpoint.path.glob("eval_*.json") if not p.stem.endswith("_beam"))


def _format_per(value: float | None) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "not measured"  # (or not recorded as a number: the card shows no made-up value)
    return f"{100 * value:.2f} %"


def _mapping(value: object) -> dict:
    """A section of a record (prep_report.json, state.json) that should be an object: {} if not."""
    return value if isinstance(value, dict) else {}


def _language_code(locale: str) -> str:
    return locale.split("-")[0].lower()


def base_model_name(training_config: dict, model_config: Wav2Vec2Config) -> str:
    model = training_config.get("model") or {}
    if isinstance(model, dict):
        if isinstance(model.get("name_or_path"), str) and model["name_or_path"]:
            return model["name_or_path"]
        if model.get("config"):
            return f"a randomly initialised {model_config.num_hidden_layers}-layer wav2vec 2.0 (built from a config)"
    return "unknown (not recorded in the training config)"


def render_model_card(
    checkpoint: Checkpoint,
    model_config: Wav2Vec2Config,
    out_name: str,
    check: ExportCheck,
    metrics: dict[str, dict],
) -> str:
    """README.md of the export: what it is, what it was trained on, how well it does, how to use it."""
    import transformers

    report = read_report(checkpoint.prepared_dir())
    training_config = checkpoint.training_config()
    hours = train_hours_per_locale(checkpoint, report)
    averaged = getattr(model_config, "phonetune_averaged_steps", None)
    # The dev PER logged during training belongs to one checkpoint, not to an average of several.
    dev_overall, dev_locale = (None, {}) if averaged else read_training_dev_per(checkpoint)
    if "dev" in metrics:  # a full evaluate run beats the dev PER logged during training
        dev_overall = metrics["dev"]["overall"]["per"]
        dev_locale = {loc: m["per"] for loc, m in metrics["dev"]["per_locale"].items()}
    test = metrics.get("test")
    locales = sorted(set(hours) | set(dev_locale) | set(test["per_locale"] if test else {}))
    data_versions = _mapping(report.get("versions"))
    train_versions = _mapping(checkpoint.state.get("versions"))
    settings = _mapping(report.get("settings"))
    voices = ", ".join(
        f"{locale} -> {entry['espeak_language']}"
        for locale, entry in _mapping(report.get("per_locale")).items()
        if isinstance(entry, dict) and entry.get("espeak_language")
    )

    lines = ["---", "language:"]
    lines += [f"- {code}" for code in sorted({_language_code(loc) for loc in locales})] or [
        "- multilingual"
    ]
    lines += [
        "tags:",
        "- speech",
        "- audio",
        "- automatic-speech-recognition",
        "- phoneme-recognition",
        "datasets:",
        "- common_voice",
        "library_name: transformers",
        "pipeline_tag: automatic-speech-recognition",
        "---",
        "",
        f"# {out_name}: a multilingual phone recognizer",
        "",
        f"wav2vec 2.0 fine-tuned with CTC on espeak-ng IPA phones by phonetune, starting from "
        f"`{base_model_name(training_config, model_config)}`. It outputs phones separated by single "
        "spaces, without word boundaries, like `facebook/wav2vec2-xlsr-53-espeak-cv-ft`. "
        "Input must be 16 kHz mono audio.",
        "",
        "## Training",
        "",
        f"- checkpoint: `{checkpoint.path.name}` (step {checkpoint.step}, epoch {checkpoint.state.get('epoch', '?')})",
        *(
            [f"- weights: the mean of the checkpoints of steps {', '.join(map(str, averaged))}"]
            if averaged
            else []
        ),
        f"- vocabulary: {model_config.vocab_size} tokens; `<pad>` (id 0) is the CTC blank",
        f"- architecture: {model_config.num_hidden_layers} layers, hidden size {model_config.hidden_size}, "
        f"feature encoder normalisation `{model_config.feat_extract_norm}`",
        f"- training data: {sum(hours.values()):.2f} h of Common Voice audio"
        if hours
        else "- training data: hours not recorded (prep_report.json not found)",
        "",
        "## Phone error rate",
        "",
        "PER = (substitutions + deletions + insertions) / reference phones, over phone tokens, "
        "micro-averaged. Dev PER as measured during training unless a full evaluation was supplied; "
        "test PER from `phonetune evaluate`.",
        "",
        "| language | train hours | dev PER | test PER |",
        "|---|---:|---:|---:|",
    ]
    for locale in locales:
        test_per = test["per_locale"].get(locale, {}).get("per") if test else None
        hours_text = f"{hours[locale]:.3f}" if locale in hours else "?"
        lines.append(
            f"| {locale} | {hours_text} | {_format_per(dev_locale.get(locale))} | {_format_per(test_per)} |"
        )
    lines.append(
        f"| **all** | {f'{sum(hours.values()):.3f}' if hours else '?'} | {_format_per(dev_overall)} | "
        f"{_format_per(test['overall']['per'] if test else None)} |"
    )
    lines += [
        "",
        "## Phonemization",
        "",
        "Labels are espeak-ng phones as phonemizer produces them with"
        + (":" if settings else " (phonetune's fixed scheme; prep_report.json was not found):"),
        "",
        '- phone separator `" "`, word separator `""` (no word boundaries), syllable separator `""`',
        f"- `strip={settings.get('phonemizer_strip', False)}` (keeps the last phone of a word apart from the next word's first)",
        f"- `with_stress={settings.get('with_stress', False)}`",
        f"- language switches: `{settings.get('language_switch', 'not recorded')}`",
        f"- espeak-ng languages: {voices or 'not recorded'}",
        "",
        "## Versions",
        "",
        "| | espeak-ng | phonemizer | transformers | torch | phonetune |",
        "|---|---|---|---|---|---|",
        f"| data preparation | {data_versions.get('espeak_ng', '?')} | {data_versions.get('phonemizer', '?')} | | | {data_versions.get('phonetune', '?')} |",
        f"| training | {train_versions.get('espeak_ng', '?')} | {train_versions.get('phonemizer', '?')} | "
        f"{train_versions.get('transformers', '?')} | {train_versions.get('torch', '?')} | {train_versions.get('phonetune', '?')} |",
        f"| export | | | {transformers.__version__} | {torch.__version__} | {__version__} |",
        "",
        "## Usage",
        "",
        "Needs only `transformers` and `torch` (no espeak-ng, no phonetune):",
        "",
        "```python",
        "import torch",
        "from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor",
        "",
        f'processor = Wav2Vec2Processor.from_pretrained("{out_name}")',
        f'model = Wav2Vec2ForCTC.from_pretrained("{out_name}")',
        "",
        "# audio_16k: a 1-D float array of 16 kHz mono samples",
        'input_values = processor(audio_16k, sampling_rate=16_000, return_tensors="pt").input_values',
        "with torch.no_grad():",
        "    logits = model(input_values).logits",
        "transcription = processor.batch_decode(torch.argmax(logits, dim=-1))",
        "```",
        "",
        "For a batch, call the processor with `padding=True` and pass the `attention_mask` it "
        "returns (if any) to the model. Or use "
        '`transformers.pipeline("automatic-speech-recognition", model="' + out_name + '")`.',
        "",
        "## Export check",
        "",
        f"Reloaded through the code above on {check.clips} clips ({check.seconds:.1f} s, {check.audio}): "
        f"largest logit difference to the checkpoint {check.max_abs_diff:.2g} (tolerance {LOGITS_TOLERANCE:g}).",
    ]
    if check.onnx_max_abs_diff is not None:
        lines.append(
            f"`model.onnx` (opset {ONNX_OPSET}; inputs `input_values`"
            f"{' and `attention_mask`' if model_config.feat_extract_norm == 'layer' else ''}, output `logits`): "
            f"ONNX Runtime vs PyTorch largest logit difference {check.onnx_max_abs_diff:.2g} "
            f"(tolerance {ONNX_TOLERANCE:g}), argmax agreement {100 * check.onnx_argmax_agreement:.2f} %."
        )
    lines += [quantized.describe() for quantized in check.quantized]
    return "\n".join(lines) + "\n"
