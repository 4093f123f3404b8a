"""`phonetune evaluate`: phone error rate of a model on a prepared split, per locale and overall.

With `--zero-shot`, also the paper's cross-lingual evaluation: the model's phones are mapped onto
each evaluated locale's phone inventory by articulatory features (data.articulatory), and PER and
the phone feature error rate (PFER) are reported with and without that mapping (docs/zero_shot.md).
Recognition is infer/recognize.py's; PER is data/per.py's, the code training's evaluation uses.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phonetune.data.errors import PhonetuneError
from phonetune.data.options import check_output_file, require_positive
from phonetune.data.per import first_per_locale, score_feature_errors, score_predictions
from phonetune.data.prepared import batches_longest_first, open_prepared
from phonetune.data.progress import progress_bar
from phonetune.data.vocab import SPECIAL_TOKENS
from phonetune.infer.beam import BeamSearch, add_beam_options, beam_search_from_args
from phonetune.infer.recognize import (
    DEFAULT_BATCH_SECONDS,
    LoadedModel,
    add_batch_seconds_option,
    add_model_argument,
    chosen_checkpoint,
    is_export_dir,
    load_model,
    recognize,
)
from phonetune.train.checkpoint import select_checkpoint

if TYPE_CHECKING:
    from collections import Counter

    import datasets

EXAMPLES_PER_LOCALE = 3


# --- evaluation -------------------------------------------------------------------------------
def load_split(prepared_dir: Path, split: str, locales: Sequence[str] | None) -> datasets.Dataset:
    prepared_dir = Path(prepared_dir)
    dataset = open_prepared(prepared_dir, "--data")
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
    which: str | int = "latest",
    beam: BeamSearch | None = None,
) -> dict:
    """PER of `model` on `split` of a prepared dataset; writes JSON to `out` when given.

    `model` is a loaded model or a path (an export, a checkpoint, or a run folder and `which` of
    its checkpoints), loaded once the data and options are checked.
    Returns `{"overall": {...}, "per_locale": {locale: {...}}, ...}` with per, substitutions,
    deletions, insertions, ref_phones and utterances, plus model, split, throughput and examples,
    `unseen_locales` (evaluated locales the model was not trained on, where that is recorded) and
    `phones_outside_vocabulary` (reference phones the model cannot output).
    With `zero_shot`, adds `"zero_shot"` (see `zero_shot_results`): the target inventory of each
    locale comes from `inventory` (a phone list), `inventory_text` (text phonemized with espeak-ng)
    or, by default, the phones of the locale's train split transcripts.
    `beam` (infer/beam.py) replaces greedy decoding by beam search; `"decoding"` says which ran.
    """
    require_positive(batch_seconds, "--batch-seconds")
    if out is not None:
        check_output_file(Path(out), "--out")
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
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model), which)
    decoder = beam.build(loaded.id_to_token) if beam is not None else None
    notes = describe_mismatch(loaded, references, row_locales)
    if verbose:
        for note in notes["lines"]:
            print(f"note: {note}")
    audio = rows.select_columns(["audio"]).with_format("numpy")
    predictions = [""] * len(rows)

    started = time.perf_counter()
    with progress_bar(len(rows), "evaluate", "clip", show=verbose) as bar:
        for indices in batches_longest_first(durations, batch_seconds):
            waves = [
                np.asarray(samples, dtype=np.float32) / 32768.0
                for samples in audio[indices.tolist()]["audio"]
            ]
            for index, phones in zip(
                indices.tolist(), recognize(loaded, waves, decoder), strict=True
            ):
                predictions[index] = phones
            bar.update(len(indices))
    elapsed = time.perf_counter() - started

    results = score_predictions(predictions, references, row_locales)
    audio_seconds = float(sum(durations))
    results.update(
        {
            "model": loaded.source,
            "data": str(prepared_dir),
            "split": split,
            "decoding": decoder.describe() if decoder is not None else {"method": "greedy"},
            "audio_seconds": round(audio_seconds, 2),
            "eval_seconds": round(elapsed, 2),
            "audio_seconds_per_second": round(audio_seconds / elapsed, 2) if elapsed > 0 else None,
            "unseen_locales": notes["unseen_locales"],
            "phones_outside_vocabulary": notes["phones_outside_vocabulary"],
            "examples": first_per_locale(
                row_locales,
                [
                    {"reference": r, "prediction": p}
                    for r, p in zip(references, predictions, strict=True)
                ],
                EXAMPLES_PER_LOCALE,
            ),
        }
    )
    if inventories is not None:
        results["zero_shot"] = zero_shot_results(
            predictions, references, row_locales, loaded, inventories
        )
    if verbose:
        print_table(results)
        if "zero_shot" in results:
            print_zero_shot(results["zero_shot"])
    if out is not None:  # after the table: what was measured is shown even if this fails
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(
                json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        except OSError as error:
            raise PhonetuneError(f"cannot write {out}: {error.strerror or error}") from None
    return results


def describe_mismatch(
    loaded: LoadedModel, references: Sequence[str], locales: Sequence[str]
) -> dict:
    """What about this data the model cannot know: evaluated locales outside its training locales
    (where they are recorded: their PER measures zero-shot recognition), and reference phones
    outside its vocabulary (it can never output them: each is an error). Counts and a note each."""
    lines = []
    trained = loaded.train_locales
    unseen = sorted(set(locales) - set(trained)) if trained is not None else None
    if unseen:
        lines.append(
            f"{', '.join(unseen)} not among the model's training locales ({', '.join(trained)}): "
            "their PER measures zero-shot recognition (--zero-shot maps phones to each "
            "locale's inventory)"
        )
    known = set(loaded.id_to_token.values())
    outside: Counter[str] = collections.Counter(
        phone for text in references for phone in text.split() if phone not in known
    )
    if outside:
        total = sum(1 for text in references for _ in text.split())
        listing = " ".join(f"{phone} ({n})" for phone, n in outside.most_common(12))
        lines.append(
            f"{sum(outside.values())} of {total} reference phones ({len(outside)} distinct) are "
            f"not in the model's vocabulary and can never be output: {listing}"
            + (" ..." if len(outside) > 12 else "")
        )
    return {
        "lines": lines,
        "unseen_locales": unseen,
        "phones_outside_vocabulary": dict(outside.most_common()),
    }


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
    from phonetune.data.articulatory import inventory_from_text, read_inventory

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
    from phonetune.data.articulatory import inventory_from_transcripts

    dataset = open_prepared(prepared_dir, "--data")
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
    from phonetune.data.articulatory import feature_substitution_cost, map_phones

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
    examples = [
        {"reference": reference, "prediction": prediction, "mapped": after}
        for prediction, reference, after in zip(predictions, references, mapped, strict=True)
    ]
    return {
        "overall": {name: scores[name]["overall"] for name in scores},
        "per_locale": dict(sorted(per_locale.items())),
        "examples": first_per_locale(locales, examples, EXAMPLES_PER_LOCALE),
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


def describe_decoding(decoding: dict) -> str:
    if decoding["method"] != "beam":
        return "greedy decoding"
    lm = f", LM {decoding['lm']} weight {decoding['lm_weight']:g}" if "lm" in decoding else ""
    return f"beam search, beam {decoding['beam']}{lm}"


def print_table(results: dict) -> None:
    header = f"{'locale':<10} {'utts':>6} {'ref phones':>10} {'sub':>7} {'del':>7} {'ins':>7} {'PER %':>7}"
    decoding = results.get("decoding", {"method": "greedy"})
    print(f"\n{results['model']} on {results['split']} ({describe_decoding(decoding)}):")
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
    add_beam_options(parser)
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
    locales = (
        [loc for item in args.locales for loc in item.split(",") if loc] if args.locales else None
    )
    beam = beam_search_from_args(args)
    which = chosen_checkpoint(args)
    out = args.out
    if out is None and not is_export_dir(args.model):
        # Next to the checkpoint, where `phonetune export` looks for it.
        # Beam search results get a name of their own: the model card reports greedy decoding,
        # what its code does, and takes eval_<split>.json only.
        name = f"eval_{args.split}{'_beam' if beam is not None else ''}.json"
        out = select_checkpoint(args.model, which).path / name
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
        which=which,
        beam=beam,
    )
    if out is not None:
        print(f"wrote {out}")
    return 0
