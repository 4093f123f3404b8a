"""`phonetune evaluate`: phone error rate of a model on a prepared split, per locale and overall.

With `--zero-shot`, also the paper's cross-lingual evaluation: the model's phones are mapped onto
each evaluated locale's phone inventory by articulatory features (data.articulatory), and PER and
the phone feature error rate (PFER) are reported with and without that mapping (docs/zero_shot.md).

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
from train.per import SPECIAL_TOKENS, greedy_decode, score_feature_errors, score_predictions

if TYPE_CHECKING:
    from collections import Counter

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
    zero_shot: bool = False,
    inventory: Path | None = None,
    inventory_text: Path | None = None,
) -> dict:
    """PER of `model` on `split` of a prepared dataset; writes JSON to `out` when given.

    Returns `{"overall": {...}, "per_locale": {locale: {...}}, ...}` with per, substitutions,
    deletions, insertions, ref_phones and utterances, plus model, split, throughput and examples.
    With `zero_shot`, adds `"zero_shot"` (see `zero_shot_results`): the target inventory of each
    locale comes from `inventory` (a phone list), `inventory_text` (text phonemized with espeak-ng)
    or, by default, the phones of the locale's train split transcripts.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model))
    rows = load_split(prepared_dir, split, locales)
    if len(rows) == 0:
        raise PhonetuneError(
            f"the {split} split of {prepared_dir} holds no clips for these locales"
        )
    if not zero_shot and (inventory is not None or inventory_text is not None):
        raise PhonetuneError(
            "--inventory and --inventory-text give the target inventory of a zero-shot "
            "evaluation: add --zero-shot"
        )
    # Inventories first: a mistake in them is reported before minutes of decoding.
    inventories = (
        target_inventories(prepared_dir, sorted(set(rows["locale"])), inventory, inventory_text)
        if zero_shot
        else None
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
    if inventories is not None:
        results["zero_shot"] = zero_shot_results(
            predictions, references, row_locales, loaded, inventories
        )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(
            json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    if verbose:
        print_table(results)
        if "zero_shot" in results:
            print_zero_shot(results["zero_shot"])
    return results


# --- zero-shot: the paper's articulatory phone mapping -----------------------------------------
@dataclass
class TargetInventory:
    """The phones of one target language, and where they came from."""

    phones: Counter[str]
    source: str


def target_inventories(
    prepared_dir: Path,
    locales: Sequence[str],
    inventory: Path | None = None,
    inventory_text: Path | None = None,
) -> dict[str, TargetInventory]:
    """The target phone inventory of each evaluated locale.

    A file (`inventory`: phones; `inventory_text`: sentences, phonemized with espeak-ng) describes
    one language, so it needs exactly one locale. By default each locale's inventory is the set of
    phones in its train split transcripts: espeak-ng's phonemization of target-language text, the
    knowledge the paper assumes; no audio of the locale is used.
    """
    from data.articulatory import inventory_from_text, read_inventory

    if inventory is not None and inventory_text is not None:
        raise PhonetuneError("give --inventory or --inventory-text, not both")
    if inventory is not None or inventory_text is not None:
        option = "--inventory" if inventory is not None else "--inventory-text"
        if len(locales) != 1:
            raise PhonetuneError(
                f"{option} describes one language, but {len(locales)} locales are evaluated "
                f"({', '.join(locales)}): choose the one it belongs to with --locales"
            )
        if inventory is not None:
            return {locales[0]: TargetInventory(read_inventory(inventory), f"file {inventory}")}
        text = inventory_from_text(inventory_text, locales[0])
        skipped = "".join(f", {n} skipped: {reason}" for reason, n in text.skipped.items())
        source = (
            f"{text.sentences} sentences of {inventory_text} phonemized with espeak-ng{skipped}"
        )
        return {locales[0]: TargetInventory(text.phones, source)}
    return {locale: train_split_inventory(prepared_dir, locale) for locale in locales}


def train_split_inventory(prepared_dir: Path, locale: str) -> TargetInventory:
    import datasets

    from data.articulatory import inventory_from_transcripts

    dataset = datasets.load_from_disk(str(prepared_dir))
    phones = None
    if "train" in dataset:
        rows = dataset["train"].select_columns(["locale", "phones"])
        phones = rows.filter(lambda loc: loc == locale, input_columns="locale")["phones"]
    if not phones:
        raise PhonetuneError(
            f"--zero-shot: {prepared_dir} has no train transcripts of {locale} to take its phone "
            "inventory from: give the inventory with --inventory FILE (phones) or "
            "--inventory-text FILE (sentences in the language, phonemized with espeak-ng)"
        )
    return TargetInventory(
        inventory_from_transcripts(phones),
        f"phones of the {len(phones)} {locale} train transcripts of {prepared_dir}",
    )


def zero_shot_results(
    predictions: Sequence[str],
    references: Sequence[str],
    locales: Sequence[str],
    loaded: LoadedModel,
    inventories: dict[str, TargetInventory],
) -> dict:
    """PER and PFER with and without mapping the model's phones onto each locale's inventory.

    "Without mapping" scores the model's output as it is: a phone outside the target inventory can
    never match a reference phone, so each one is an error. "With mapping" first replaces every
    phone by its nearest inventory phone (data.articulatory.map_phones). Returns
    `{"overall": {"without_mapping", "with_mapping"}, "per_locale": {locale: {...}}, "examples"}`.
    """
    from data.articulatory import feature_substitution_cost, map_phones

    model_phones = [t for t in loaded.id_to_token.values() if t not in SPECIAL_TOKENS]
    mappings = {loc: map_phones(model_phones, inv.phones) for loc, inv in inventories.items()}
    mapped = [
        mappings[loc].apply(prediction)
        for prediction, loc in zip(predictions, locales, strict=True)
    ]
    scores = {}
    for name, hypotheses in (("without_mapping", predictions), ("with_mapping", mapped)):
        per = score_predictions(hypotheses, references, locales)
        pfer = score_feature_errors(hypotheses, references, locales, feature_substitution_cost)
        scores[name] = {
            "overall": {**per["overall"], **pfer["overall"]},
            "per_locale": {
                loc: {**per["per_locale"][loc], **pfer["per_locale"][loc]}
                for loc in per["per_locale"]
            },
        }
    # Per locale: phones the model output, and how many of them lie outside the inventory.
    predicted = {loc: [0, 0] for loc in inventories}
    for prediction, loc in zip(predictions, locales, strict=True):
        phones = prediction.split()
        predicted[loc][0] += len(phones)
        predicted[loc][1] += sum(p not in inventories[loc].phones for p in phones)
    per_locale = {}
    for loc, inventory in inventories.items():
        mapping = mappings[loc]
        per_locale[loc] = {
            "without_mapping": scores["without_mapping"]["per_locale"][loc],
            "with_mapping": scores["with_mapping"]["per_locale"][loc],
            "inventory": {"source": inventory.source, "phones": sorted(inventory.phones)},
            "model_phones": len(model_phones),
            "model_phones_in_inventory": sum(p in inventory.phones for p in model_phones),
            "inventory_phones_not_in_model": sorted(set(inventory.phones) - set(model_phones)),
            "mapping": dict(sorted(mapping.changed().items())),
            "mapping_distances": {p: round(mapping.distances[p], 4) for p in mapping.changed()},
            "unmappable": mapping.unmappable,
            "predicted_phones": predicted[loc][0],
            "predicted_outside_inventory": predicted[loc][1],
        }
    examples: dict[str, list[dict[str, str]]] = {}
    for prediction, reference, loc, after in zip(
        predictions, references, locales, mapped, strict=True
    ):
        chosen = examples.setdefault(loc, [])
        if len(chosen) < EXAMPLES_PER_LOCALE:
            chosen.append({"reference": reference, "prediction": prediction, "mapped": after})
    return {
        "overall": {name: scores[name]["overall"] for name in scores},
        "per_locale": dict(sorted(per_locale.items())),
        "examples": dict(sorted(examples.items())),
    }


def print_zero_shot(zero_shot: dict) -> None:
    header = (
        f"{'locale':<10} {'inventory':>9} {'mapped':>7} {'PER %':>7} {'mapped':>7} "
        f"{'PFER %':>7} {'mapped':>7}"
    )
    print("\nzero-shot: model phones mapped to each locale's inventory by articulatory features")
    print(header)
    print("-" * len(header))
    rows = [*zero_shot["per_locale"].items(), ("overall", zero_shot["overall"])]
    for name, m in rows:
        if name == "overall":
            print("-" * len(header))
            sizes = mapped = ""
        else:
            sizes, mapped = str(len(m["inventory"]["phones"])), str(len(m["mapping"]))
        before, after = m["without_mapping"], m["with_mapping"]
        print(
            f"{name:<10} {sizes:>9} {mapped:>7} {100 * before['per']:>7.2f} "
            f"{100 * after['per']:>7.2f} {100 * before['pfer']:>7.2f} {100 * after['pfer']:>7.2f}"
        )
    for name, m in zero_shot["per_locale"].items():
        print(f"{name} inventory: {m['inventory']['source']}")
        print(
            f"  {m['predicted_outside_inventory']} of {m['predicted_phones']} phones the model "
            "output are outside it (errors unless mapped)"
        )
        missing = m["inventory_phones_not_in_model"]
        if missing:
            print(f"  phones the model cannot output: {' '.join(missing)}")
        if m["unmappable"]:
            print(f"  model phones with no features, left as they are: {' '.join(m['unmappable'])}")


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


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """MODEL, as evaluate and transcribe both take it."""
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="an export folder, a run folder (its newest checkpoint) or a checkpoints/step_<n> folder",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
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
    parser.add_argument(
        "--zero-shot",
        action="store_true",
        help="also map the model's phones onto each locale's phone inventory by articulatory "
        "features (the paper's zero-shot evaluation) and report PER and PFER with and without "
        "the mapping (docs/zero_shot.md)",
    )
    parser.add_argument(
        "--inventory",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --zero-shot and one locale: the target phone inventory, phones separated by "
        "spaces or new lines (default: the phones of the locale's train transcripts in --data)",
    )
    parser.add_argument(
        "--inventory-text",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --zero-shot and one locale: sentences in the target language, one a line, "
        "phonemized with the locale's espeak-ng voice to give the target inventory",
    )


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
        zero_shot=args.zero_shot,
        inventory=args.inventory,
        inventory_text=args.inventory_text,
    )
    if out is not None:
        print(f"wrote {out}")
    return 0
