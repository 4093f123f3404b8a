"""`phonetune evaluate`: phone error rate of a model on a prepared split, per locale and overall.

Also the inference core shared with `phonetune transcribe` and the export checks: loading a model
from an export folder or a checkpoint, normalising audio exactly as training did, batching by
seconds of audio, and greedy CTC decoding (train.per.greedy_decode, the one decoder training uses).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data.errors import PhonetuneError
from train.batching import normalize_audio
from train.export import find_checkpoint, load_ctc_model, read_vocab
from train.per import greedy_decode, score_predictions

if TYPE_CHECKING:
    import datasets
    from transformers import Wav2Vec2ForCTC

DEFAULT_BATCH_SECONDS = 60.0
EXAMPLES_PER_LOCALE = 3


# --- audio in, phones out ---------------------------------------------------------------------
def normalize_batch(
    waves: Sequence[np.ndarray], uses_attention_mask: bool
) -> dict[str, torch.Tensor]:
    """Pad a batch as the training collate and Wav2Vec2FeatureExtractor(do_normalize=True) do.

    Each utterance is scaled to zero mean and unit variance over its own samples (training's own
    `normalize_audio`; int16 PCM is scaled to [-1, 1) first), then padded with 0. The attention
    mask is returned only for models whose feature encoder is layer-normalised: the others were
    trained without one (padding then reaches their group norm, in training as here, so batch
    such models by similar lengths, as batch_by_seconds does).
    """
    longest = max(len(wave) for wave in waves)
    input_values = np.zeros((len(waves), longest), dtype=np.float32)
    attention_mask = np.zeros((len(waves), longest), dtype=np.int64)
    for row, wave in enumerate(waves):
        input_values[row, : len(wave)] = normalize_audio(np.asarray(wave))
        attention_mask[row, : len(wave)] = 1
    batch = {"input_values": torch.from_numpy(input_values)}
    if uses_attention_mask:
        batch["attention_mask"] = torch.from_numpy(attention_mask)
    return batch


def count_output_frames(model: Wav2Vec2ForCTC, num_samples: int) -> int:
    """CTC frames the model's feature encoder produces for `num_samples` samples (about 50 per second)."""
    length = num_samples
    for kernel, stride in zip(model.config.conv_kernel, model.config.conv_stride, strict=True):
        length = max(0, (length - kernel) // stride + 1)
    return length


@dataclass
class LoadedModel:
    """A model ready for inference, wherever it came from."""

    model: Wav2Vec2ForCTC
    id_to_token: dict[int, str]
    uses_attention_mask: bool
    source: str

    @property
    def min_samples(self) -> int:
        """Shortest input that yields one output frame (the feature encoder's receptive field)."""
        samples = 1
        for kernel, stride in reversed(
            list(zip(self.model.config.conv_kernel, self.model.config.conv_stride, strict=True))
        ):
            samples = (samples - 1) * stride + kernel
        return samples


def is_export_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "vocab.json").is_file()


def load_model(path: Path) -> LoadedModel:
    """Load an export folder, a run folder (newest checkpoint) or a checkpoint step folder."""
    path = Path(path)
    if is_export_dir(path):
        model_dir, vocab_path, source = path, path / "vocab.json", str(path)
    else:
        checkpoint = find_checkpoint(path)
        model_dir, vocab_path = checkpoint.model_dir, checkpoint.vocab_path
        source = f"{checkpoint.path} (step {checkpoint.step})"
    vocab = read_vocab(vocab_path)
    model = load_ctc_model(model_dir)
    if model.config.vocab_size != len(vocab):
        raise PhonetuneError(
            f"{path}: the model has {model.config.vocab_size} outputs but vocab.json {len(vocab)} tokens"
        )
    return LoadedModel(
        model=model,
        id_to_token={i: token for token, i in vocab.items()},
        uses_attention_mask=model.config.feat_extract_norm == "layer",
        source=source,
    )


def batch_by_seconds(durations: Sequence[float], budget_seconds: float) -> list[list[int]]:
    """Group indices by duration, longest first, so each batch's padded audio fits the budget.

    Sorting keeps padding small; starting with the longest batch makes an out-of-memory error
    happen at once rather than at the end. A clip longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(durations)), key=lambda i: durations[i], reverse=True)
    batches: list[list[int]] = []
    for index in order:
        # Sorted longest first, so the batch's first clip sets its padded length.
        if batches and durations[batches[-1][0]] * (len(batches[-1]) + 1) <= budget_seconds:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def recognize(loaded: LoadedModel, waves: Sequence[np.ndarray]) -> list[str]:
    """Greedy CTC transcription of one batch of 16 kHz waveforms."""
    batch = normalize_batch(waves, loaded.uses_attention_mask)
    with torch.inference_mode():
        ids = loaded.model(**batch).logits.argmax(dim=-1)
    return [
        # Frames past a clip's own length come from padding: decode only the clip's frames.
        greedy_decode(
            ids[row, : count_output_frames(loaded.model, len(wave))].tolist(), loaded.id_to_token
        )
        for row, wave in enumerate(waves)
    ]


# --- evaluation -------------------------------------------------------------------------------
def load_split(prepared_dir: Path, split: str, locales: Sequence[str] | None) -> datasets.Dataset:
    import datasets

    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "dataset_dict.json").is_file():
        raise PhonetuneError(
            f"--data {prepared_dir} is not a prepared dataset (no dataset_dict.json): "
            "give the folder `phonetune prepare --out` wrote"
        )
    dataset = datasets.load_from_disk(str(prepared_dir))
    if split not in dataset:
        raise PhonetuneError(
            f"{prepared_dir} has no {split!r} split (it has {', '.join(dataset)}): "
            "a split with no kept clip is absent"
        )
    rows = dataset[split]
    if locales:
        present = set(rows.unique("locale"))
        unknown = [loc for loc in locales if loc not in present]
        if unknown:
            raise PhonetuneError(
                f"--locales {', '.join(unknown)}: not in the {split} split of {prepared_dir} "
                f"(it has {', '.join(sorted(present))})"
            )
        wanted = set(locales)
        rows = rows.filter(lambda locale: locale in wanted, input_columns="locale")
    return rows


def evaluate_model(
    model: Path | LoadedModel,
    prepared_dir: Path,
    split: str = "test",
    locales: list[str] | None = None,
    out: Path | None = None,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    verbose: bool = True,
) -> dict:
    """PER of `model` on `split` of a prepared dataset; writes JSON to `out` when given.

    Returns `{"overall": {...}, "per_locale": {locale: {...}}, ...}` with per, substitutions,
    deletions, insertions, ref_phones and utterances, plus model, split, throughput and examples.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model))
    rows = load_split(prepared_dir, split, locales)
    if len(rows) == 0:
        raise PhonetuneError(
            f"the {split} split of {prepared_dir} holds no clips for these locales"
        )
    references = rows["phones"]
    row_locales = rows["locale"]
    durations = rows["duration"]
    audio = rows.select_columns(["audio"]).with_format("numpy")
    predictions = [""] * len(rows)

    started = time.perf_counter()
    batches = batch_by_seconds(durations, batch_seconds)
    for number, indices in enumerate(batches, 1):
        waves = [
            np.asarray(samples, dtype=np.float32) / 32768.0 for samples in audio[indices]["audio"]
        ]
        for index, phones in zip(indices, recognize(loaded, waves), strict=True):
            predictions[index] = phones
        if verbose and number % 20 == 0:
            print(f"  batch {number}/{len(batches)}", flush=True)
    elapsed = time.perf_counter() - started

    results = score_predictions(predictions, references, row_locales)
    audio_seconds = float(sum(durations))
    results.update(
        {
            "model": loaded.source,
            "data": str(prepared_dir),
            "split": split,
            "audio_seconds": round(audio_seconds, 2),
            "eval_seconds": round(elapsed, 2),
            "audio_seconds_per_second": round(audio_seconds / elapsed, 2) if elapsed > 0 else None,
            "examples": collect_examples(predictions, references, row_locales),
        }
    )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    if verbose:
        print_table(results)
    return results


def collect_examples(
    predictions: Sequence[str], references: Sequence[str], locales: Sequence[str]
) -> dict:
    """The first few reference / prediction pairs per locale: PER alone does not show what goes wrong."""
    examples: dict[str, list[dict[str, str]]] = {}
    for prediction, reference, locale in zip(predictions, references, locales, strict=True):
        chosen = examples.setdefault(locale, [])
        if len(chosen) < EXAMPLES_PER_LOCALE:
            chosen.append({"reference": reference, "prediction": prediction})
    return dict(sorted(examples.items()))


def print_table(results: dict) -> None:
    header = f"{'locale':<10} {'utts':>6} {'ref phones':>10} {'sub':>7} {'del':>7} {'ins':>7} {'PER %':>7}"
    print(f"\n{results['model']} on {results['split']}:")
    print(header)
    print("-" * len(header))
    rows = [*results["per_locale"].items(), ("overall", results["overall"])]
    for name, m in rows:
        if name == "overall":
            print("-" * len(header))
        print(
            f"{name:<10} {m['utterances']:>6} {m['ref_phones']:>10} {m['substitutions']:>7} "
            f"{m['deletions']:>7} {m['insertions']:>7} {100 * m['per']:>7.2f}"
        )
    speed = results.get("audio_seconds_per_second")
    print(
        f"\n{results['audio_seconds']:.1f} s of audio in {results['eval_seconds']:.1f} s"
        + (f" ({speed:.1f} audio seconds per second)" if speed else "")
    )


# --- command line -----------------------------------------------------------------------------
def add_batch_seconds_option(parser: argparse.ArgumentParser) -> None:
    """`--batch-seconds`, shared by `evaluate` and `transcribe`."""
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=DEFAULT_BATCH_SECONDS,
        help=f"seconds of padded audio per batch (default {DEFAULT_BATCH_SECONDS:g})",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="an export folder, a run folder (its newest checkpoint) or a checkpoints/step_<n> folder",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="PREP_DIR written by `phonetune prepare`"
    )
    parser.add_argument(
        "--split", default="test", help="split to evaluate: train, dev or test (default test)"
    )
    parser.add_argument(
        "--locales",
        nargs="+",
        default=None,
        help="only these locales (space- or comma-separated; default: all in the split)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the results as JSON here (default for a checkpoint: eval_<split>.json "
        "next to it, which `phonetune export` puts in the model card)",
    )
    add_batch_seconds_option(parser)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.batch_seconds <= 0:
        raise PhonetuneError("--batch-seconds must be positive")
    locales = (
        [loc for item in args.locales for loc in item.split(",") if loc] if args.locales else None
    )
    out = args.out
    if out is None and not is_export_dir(args.model):
        # Next to the checkpoint, where `phonetune export` looks for it.
        out = find_checkpoint(args.model).path / f"eval_{args.split}.json"
    evaluate_model(
        args.model,
        args.data,
        split=args.split,
        locales=locales,
        out=out,
        batch_seconds=args.batch_seconds,
    )
    if out is not None:
        print(f"wrote {out}")
    return 0
