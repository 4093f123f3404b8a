"""`phonetune export`: a training checkpoint -> a folder that plain `transformers` loads (and ONNX).

The folder has the released `facebook/wav2vec2-xlsr-53-espeak-cv-ft` layout, readable by transformers
5.x (`processor_config.json`) and 4.x (`preprocessor_config.json`, `special_tokens_map.json`):

    config.json, model.safetensors         Wav2Vec2ForCTC; <pad> = 0 is the CTC blank
    preprocessor_config.json               Wav2Vec2FeatureExtractor: 16 kHz, per-utterance normalisation
    processor_config.json                  the same, as transformers 5 writes it
    vocab.json, tokenizer_config.json,     Wav2Vec2PhonemeCTCTokenizer with do_phonemize=false, so
    special_tokens_map.json                inference needs no espeak-ng
    README.md                              model card: data, steps, PER per language, versions
    model.onnx                             with --onnx
    model.int8.onnx, model.fp16.onnx       with --quantize int8, --onnx-fp16 (infer/quantize.py)

Nothing is trusted because it loads (infer/checks.py): the folder is reloaded through the model
card's own code and its logits are compared with the checkpoint's on real audio. The folder is
written under a temporary name and only moved into place once every check passed; its README.md is
infer/card.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from phonetune.data.audio import SAMPLE_RATE
from phonetune.data.errors import PhonetuneError
from phonetune.data.options import positive_int
from phonetune.data.vocab import BLANK_ID, SPECIAL_TOKENS, VOCAB_FILE, load_vocab
from phonetune.infer.card import find_metrics_files, read_metrics_files, render_model_card
from phonetune.infer.checks import (
    LOGITS_TOLERANCE,
    ONNX_TOLERANCE,
    ExportCheck,
    check_onnx,
    check_reload,
    export_onnx,
    load_check_audio,
)
from phonetune.infer.quantize import write_quantized
from phonetune.infer.recognize import add_checkpoint_choice, chosen_checkpoint
from phonetune.train.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_model_folder,
    select_checkpoint,
)

if TYPE_CHECKING:  # transformers is imported where it is used: `phonetune --help` stays instant
    from transformers import Wav2Vec2Processor

# The tokenizer's special tokens, in the names transformers gives them (the vocabulary's layout).
SPECIAL_TOKENS_MAP = dict(
    zip(("pad_token", "bos_token", "eos_token", "unk_token"), SPECIAL_TOKENS, strict=True)
)
# Files an export folder may hold: --overwrite only ever replaces a folder made of these.
EXPORT_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        VOCAB_FILE,
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "README.md",
        "model.onnx",
        "model.onnx.data",
        "model.int8.onnx",
        "model.fp16.onnx",
        "generation_config.json",
    }
)


# --- the folder -------------------------------------------------------------------------------
def build_processor(vocab_path: Path, uses_attention_mask: bool) -> Wav2Vec2Processor:
    """Feature extractor + phone tokenizer matching how training fed and labelled the model."""
    from transformers import (
        Wav2Vec2FeatureExtractor,
        Wav2Vec2PhonemeCTCTokenizer,
        Wav2Vec2Processor,
    )

    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=True,  # training normalises each utterance to zero mean, unit variance
        # Models with layer-normalised feature encoders were trained with padding masked out;
        # group-normalised ones (wav2vec2-base style) never see a mask.
        return_attention_mask=uses_attention_mask,
    )
    tokenizer = Wav2Vec2PhonemeCTCTokenizer(
        str(vocab_path),
        do_phonemize=False,  # input is already phones; loading must not need espeak-ng
        phone_delimiter_token=" ",
        word_delimiter_token=None,  # the model predicts no word boundaries
        # Phone strings are not English text: "ʔ ." must not be glued to "ʔ.".
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS_MAP,
    )
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def save_processor(processor: Wav2Vec2Processor, folder: Path) -> None:
    """Write the processor in both transformers 5.x and 4.x (hub) layouts."""
    # 5.x writes processor_config.json and the tokenizer files; 4.x and the hub read the feature
    # extractor from preprocessor_config.json.
    processor.save_pretrained(str(folder))
    processor.feature_extractor.save_pretrained(str(folder))
    # 4.x reads the special tokens from here; 5.x keeps them in tokenizer_config.json.
    write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)


def write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_out_dir(out: Path, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse to write over anything that is not an earlier export, and over non-empty folders without --overwrite."""
    out = Path(out)
    for path in protected:
        resolved = Path(path).resolve()
        if out.resolve() == resolved or resolved.is_relative_to(out.resolve()):
            raise PhonetuneError(
                f"--out {out} would overwrite the checkpoint being exported ({path})"
            )
    if out.exists() and not out.is_dir():
        raise PhonetuneError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise PhonetuneError(f"--out {out} is not empty: choose another folder or pass --overwrite")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
    if foreign:
        raise PhonetuneError(
            f"--out {out} holds files an export does not write ({', '.join(foreign[:5])}); "
            "--overwrite only replaces an earlier export: choose an empty folder"
        )


def move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` by the finished `staging` folder (both on the same file system)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


# --- the whole export -------------------------------------------------------------------------
def export_model(
    source: Path,
    out: Path,
    *,
    onnx: bool = False,
    quantize: Sequence[str] = (),
    which: str | int = "latest",
    overwrite: bool = False,
    audio: Path | None = None,
    metrics: Sequence[Path] = (),
    evaluate_splits: Sequence[str] = (),
    average_last: int | None = None,
    average_steps: Sequence[int] = (),
    verbose: bool = True,
) -> Path:
    """Export a checkpoint to `out`: `source` a step folder, or a run folder and `which` of its
    checkpoints (latest, best, step N); returns `out`.

    `quantize` (int8, fp16) adds quantized copies of model.onnx (and implies `onnx`), checked by
    their PER on real clips (infer/quantize.py).

    `average_last` N exports the mean of the weights of the N checkpoints up to the chosen one,
    `average_steps` that of the checkpoints of these steps (see `select_averaged`).

    `audio` replaces the clips the checks run on; `metrics` are `phonetune evaluate` JSON files for
    the model card (eval_<split>.json next to the checkpoint are picked up too); `evaluate_splits`
    evaluates the export on those splits of the training data first and puts the results in the card.
    """
    say = print if verbose else (lambda *_args, **_kwargs: None)
    out = Path(out)
    onnx = onnx or bool(quantize)
    averaged = select_averaged(source, which, average_last, average_steps)
    checkpoint = averaged[-1] if averaged else select_checkpoint(source, which)
    check_out_dir(out, overwrite, protected=[checkpoint.path])
    # Every argument is checked before the model is loaded and minutes go into checks.
    metrics_by_split = read_metrics_files(list(find_metrics_files(checkpoint)) + list(metrics))
    prepared = check_evaluate_splits(checkpoint, evaluate_splits)
    if audio is not None and not Path(audio).is_file():
        raise PhonetuneError(f"--audio {audio}: no such file")
    say(f"exporting {checkpoint.path} (step {checkpoint.step}) -> {out}")

    vocab = load_vocab(checkpoint.vocab_path)
    model = load_model_folder(checkpoint.model_dir, safetensors_only=True)
    if averaged:
        steps = [c.step for c in averaged]
        say(
            f"averaging the weights of {len(averaged)} checkpoints: steps {', '.join(map(str, steps))}"
        )
        model.load_state_dict(average_weights(averaged, vocab), strict=True)
        model.config.phonetune_averaged_steps = steps
    # Where a model came from travels with it: `phonetune evaluate` notes locales it never saw.
    train_locales = checkpoint.train_locales()
    if train_locales is not None:
        model.config.phonetune_train_locales = train_locales
    if model.config.vocab_size != len(vocab) or model.config.pad_token_id != BLANK_ID:
        raise PhonetuneError(
            f"{checkpoint.path}: the model has vocab_size {model.config.vocab_size} and pad_token_id "
            f"{model.config.pad_token_id}, vocab.json has {len(vocab)} tokens with <pad> = 0: they must agree"
        )
    uses_mask = model.config.feat_extract_norm == "layer"
    clips, audio_source = load_check_audio(checkpoint, audio)
    id_to_token = {i: t for t, i in vocab.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        model.save_pretrained(str(staging))  # safetensors
        # transformers 5 writes the weights readable by their owner only (0600), whatever the umask:
        # give them the permissions of the config written beside them, so others can load the model.
        shutil.copymode(staging / "config.json", staging / "model.safetensors")
        save_processor(build_processor(checkpoint.vocab_path, uses_mask), staging)
        worst, sample = check_reload(model, staging, clips, id_to_token)
        check = ExportCheck(
            audio=audio_source,
            clips=len(clips),
            seconds=sum(len(c) for c in clips) / SAMPLE_RATE,
            max_abs_diff=worst,
            sample_transcription=sample,
        )
        say(
            f"reload check: logits match the checkpoint within {worst:.2g} (tolerance {LOGITS_TOLERANCE:g}) "
            f"on {check.clips} clips ({audio_source})"
        )
        if onnx:
            exported = load_model_folder(staging)
            export_onnx(exported, staging / "model.onnx", uses_mask)
            check.onnx_max_abs_diff, check.onnx_argmax_agreement = check_onnx(
                staging / "model.onnx", exported, clips
            )
            say(
                f"ONNX check: ONNX Runtime vs PyTorch max |logit difference| {check.onnx_max_abs_diff:.2g} "
                f"(tolerance {ONNX_TOLERANCE:g}), argmax agreement {100 * check.onnx_argmax_agreement:.2f} %"
            )
            check.quantized = write_quantized(
                staging, quantize, checkpoint.prepared_dir(), clips, audio_source
            )
            for quantized in check.quantized:
                say(f"{quantized.kind} check: {quantized.describe()}")
        metrics_by_split.update(evaluate_export(staging, prepared, evaluate_splits, say))
        card = render_model_card(checkpoint, model.config, out.name, check, metrics_by_split)
        (staging / "README.md").write_text(card, encoding="utf-8")
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"sample transcription: {sample[:100]!r}{' ...' if len(sample) > 100 else ''}")
    summarize_folder(out, say)
    return out


def select_averaged(
    source: Path, which: str | int, average_last: int | None, average_steps: Sequence[int]
) -> list[Checkpoint]:
    """The checkpoints whose weights an export averages, oldest first ([] when not averaging): the
    `average_last` checkpoints of the run up to the chosen one (`which`), or those of
    `average_steps`. The last one gives the export its vocabulary, configuration and model card."""
    if average_last is not None and average_steps:
        raise PhonetuneError("give --average-last or --average, not both")
    if average_steps:
        if which != "latest":
            raise PhonetuneError("--average names its steps: --best and --step do not apply")
        return [select_checkpoint(source, step) for step in sorted(set(average_steps))]
    if average_last is None:
        return []
    last = select_checkpoint(source, which)
    if last.run_dir is None:
        raise PhonetuneError(
            f"--average-last needs a run folder (its checkpoints/), not the step folder {last.path}"
        )
    steps = [step for step, _ in list_checkpoints(last.run_dir) if step <= last.step]
    if len(steps) < average_last:
        raise PhonetuneError(
            f"--average-last {average_last}: {last.run_dir} holds {len(steps)} checkpoint(s) up to step "
            f"{last.step} ({', '.join(map(str, steps))}). Keep more with train.keep_last, or average fewer."
        )
    return [select_checkpoint(last.run_dir, step) for step in steps[-average_last:]]


def average_weights(checkpoints: Sequence[Checkpoint], vocab: dict[str, int]) -> dict:
    """The element-wise mean of the checkpoints' weights (summed in float64, returned in the
    saved dtype), as icefall averages its checkpoints. They must hold the same tensors and the
    same vocabulary; integer tensors must be equal."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sums: dict = {}
    for checkpoint in checkpoints:
        path = checkpoint.model_dir / "model.safetensors"
        if load_vocab(checkpoint.vocab_path) != vocab:
            raise PhonetuneError(f"{checkpoint.path} has another vocabulary: it cannot be averaged")
        try:
            weights = load_file(path)
        except (OSError, SafetensorError) as error:
            raise PhonetuneError(f"{path} cannot be read ({error})") from None
        if sums and (weights.keys() != sums.keys() or any(
            weights[name].shape != sums[name].shape for name in sums
        )):  # fmt: skip
            raise PhonetuneError(f"{path} holds other tensors than {checkpoints[0].model_dir}")
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                if name in sums and not torch.equal(sums[name], tensor):
                    raise PhonetuneError(f"{path}: {name} differs between the checkpoints")
                sums[name] = tensor
            elif name in sums:
                sums[name] += tensor.double()
            else:
                sums[name] = tensor.double()
    dtypes = {name: tensor.dtype for name, tensor in weights.items()}
    return {
        name: (total / len(checkpoints)).to(dtypes[name]) if total.is_floating_point() else total
        for name, total in sums.items()
    }


def check_evaluate_splits(checkpoint: Checkpoint, splits: Sequence[str]) -> Path | None:
    """The prepared dataset `--evaluate` runs on, with every split it names; None without it."""
    if not splits:
        return None
    from phonetune.data.prepared import open_split

    prepared = checkpoint.prepared_dir()
    if prepared is None:
        raise PhonetuneError(
            "--evaluate needs the prepared dataset named in the checkpoint's config.yaml (data.prepared_dir), "
            "which was not found; run `phonetune evaluate` separately and pass --metrics"
        )
    for split in splits:
        open_split(prepared, split, "--evaluate")
    return prepared


def evaluate_export(
    staging: Path, prepared: Path | None, splits: Sequence[str], say: Callable[..., None]
) -> dict[str, dict]:
    """PER of the exported folder on the training data's splits (for the model card)."""
    if prepared is None:
        return {}
    from phonetune.infer.evaluate import evaluate_model

    results = {}
    for split in splits:
        say(f"evaluating the export on {prepared} [{split}]")
        results[split] = evaluate_model(staging, prepared, split=split, verbose=False)
        say(f"  {split} PER {100 * results[split]['overall']['per']:.2f} %")
    return results


def summarize_folder(out: Path, say: Callable[..., None]) -> None:
    say(f"wrote {out}:")
    for path in sorted(out.iterdir()):
        say(f"  {path.name:<26} {path.stat().st_size / 1e6:>10.2f} MB")


# --- command line -----------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        type=Path,
        metavar="RUN_DIR|CHECKPOINT_DIR",
        help="a training run folder (exports its newest checkpoint) or one checkpoints/step_<n> folder",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="EXPORT_DIR to write the model folder to"
    )
    add_checkpoint_choice(parser)
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx (dynamic batch and length), checked with ONNX Runtime",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also write model.int8.onnx (dynamic int8 quantization of model.onnx's MatMuls; "
        "implies --onnx), checked by its PER on the dev split of the training data",
    )
    parser.add_argument(
        "--onnx-fp16",
        action="store_true",
        help="also write model.fp16.onnx (float16 weights, float32 inputs and outputs; implies "
        "--onnx), checked like --quantize",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in --out"
    )
    parser.add_argument(
        "--audio",
        type=Path,
        default=None,
        help="audio file the checks run on (default: clips of the training data, or espeak-ng speech)",
    )
    parser.add_argument(
        "--metrics",
        type=Path,
        action="append",
        default=[],
        help="`phonetune evaluate --out` JSON to put in the model card (repeatable; one per split)",
    )
    average = parser.add_mutually_exclusive_group()
    average.add_argument(
        "--average-last",
        type=positive_int,
        default=None,
        metavar="N",
        help="export the mean of the weights of the run's last N checkpoints (up to --step/--best "
        "if given): often a little better than any one of them",
    )
    average.add_argument(
        "--average",
        type=step_list,
        default=(),
        metavar="STEP,STEP,...",
        help="export the mean of the weights of the checkpoints of these steps",
    )
    parser.add_argument(
        "--evaluate",
        nargs="+",
        default=[],
        metavar="SPLIT",
        help="evaluate the export on these splits of the training data for the model card, e.g. dev test",
    )


def step_list(text: str) -> list[int]:
    try:
        steps = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of steps: {text!r}") from None
    if len(steps) < 2 or min(steps) < 0:
        raise argparse.ArgumentTypeError(
            f"give two steps or more, e.g. 800,900,1000 (not {text!r})"
        )
    return steps


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    which = chosen_checkpoint(args)
    out = export_model(
        args.source,
        args.out,
        onnx=args.onnx,
        quantize=[kind for kind, on in (("int8", args.quantize), ("fp16", args.onnx_fp16)) if on],
        which=which,
        overwrite=args.overwrite,
        audio=args.audio,
        metrics=args.metrics,
        evaluate_splits=args.evaluate,
        average_last=args.average_last,
        average_steps=args.average,
    )
    prepared = select_checkpoint(args.source, which).prepared_dir()
    data = shlex.quote(str(prepared)) if prepared is not None else "PREPARED_DIR"
    print(f"next: phonetune evaluate {shlex.quote(str(out))} --data {data} --split test")
    return 0
