"""`phonetune train`: fine-tune a wav2vec 2.0 encoder with CTC on a prepared dataset.

One process (CPU or one GPU) with `phonetune train --config FILE [key=value ...]`; several with
`accelerate launch [options] -m train --config FILE [key=value ...]` (on GPUs: `--multi_gpu
--num_processes N`; the same flags also work without GPUs, the processes then join a gloo group on
the CPU, whereas `--cpu --num_processes N` starts a single process unless MPI is set up; FSDP
version 2 shards the model, see `check_fsdp_launch`, and DeepSpeed ZeRO-2 the optimizer state, see
train/zero.py). The run can be killed at any
moment and continued with `resume=auto`: the next steps are the ones the uninterrupted run would
have taken (same batches, same masks and dropout, same updates).

Read top to bottom: `train()` sets up (data, model, optimizer, resume), then loops over optimizer
steps calling `train_step`, and every so often `evaluate` and `save_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from data.errors import PhonetuneError
from data.vocab import BLANK_ID, load_vocab
from train import checkpoint as ckpt
from train import guard, zero
from train.batching import (
    IGNORE_INDEX,
    Batch,
    DurationBatchSampler,
    PreparedSplit,
    make_loader,
    plan_eval,
    unknown_phones,
)
from train.config import (
    Config,
    config_differences,
    config_to_dict,
    dump_config,
    load_config,
    write_config,
)
from train.model import (
    CTCModel,
    architecture_differences,
    build_model,
    count_parameters,
    expected_architecture,
    load_checkpoint_model,
)
from train.schedule import lr_multiplier

if TYPE_CHECKING:
    from accelerate import Accelerator

METRICS_FILE = "metrics.jsonl"
Say = Callable[[str], None]  # prints on the main process only (Accelerator.print)


# --- command line ---------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="YAML training recipe (see configs/)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config values with dotted keys, e.g. data.prepared_dir=prep run.output_dir=runs/x "
        "train.max_steps=100 resume=auto",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="validate the configuration, print it resolved, and exit",
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    train(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `accelerate launch -m train` entry (train/__main__.py)."""
    parser = argparse.ArgumentParser(
        prog="python -m train", description="phonetune training (one process of it)"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PhonetuneError as error:
        if args.debug:
            raise
        print(f"phonetune train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("phonetune train: interrupted", file=sys.stderr)
        return 130


# --- state ------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a checkpoint's state.json records about the progress of training."""

    step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    epoch: int = 0  # current epoch of the sampler
    position: int = 0  # batches of this epoch already consumed by each process
    skipped_steps: int = 0  # steps whose gradient was NaN/inf (no update)
    consecutive_nonfinite: int = 0
    ctc_infeasible: int = 0  # clips whose CTC loss was infinite (too few frames for the phones)
    audio_seconds: float = 0.0  # audio trained on, all processes
    eval_per: float | None = None  # dev PER of the evaluation at `eval_step`
    eval_step: int | None = None
    # running sums since the last training line of metrics.jsonl (so a resumed run logs the same)
    interval_loss: float = 0.0
    interval_steps: int = 0
    interval_audio: float = 0.0
    interval_padded: float = 0.0


@dataclass
class Data:
    vocab: dict[str, int]
    train: PreparedSplit
    train_rows: np.ndarray
    eval: PreparedSplit | None
    eval_rows: np.ndarray
    versions: dict[str, Any]
    skipped: dict[str, int] = field(default_factory=dict)


# --- setup ------------------------------------------------------------------------------------------
def make_accelerator(config: Config) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PhonetuneError(
            "train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on this machine"
        )
    # LayerDrop and the frozen-transformer phase leave parameters without gradients in some steps;
    # DDP must then look for them or it waits forever ("Expected to have finished reduction").
    find_unused = config.model.layerdrop > 0 or config.train.freeze_finetune_updates > 0
    try:
        accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
            # Without a GPU, say so: several processes started by torchrun (`accelerate launch
            # --multi_gpu`, `torchrun`) then form a gloo process group instead of each running alone.
            cpu=not torch.cuda.is_available(),
        )
    except ImportError as error:  # a launcher config needing DeepSpeed, which is not installed
        raise PhonetuneError(
            f"the launch needs a package that is not installed: {error} "
            '(for DeepSpeed: pip install -e ".[deepspeed]")'
        ) from error
    launched = accelerator.distributed_type.name
    for variable, asked in (
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
        ("ACCELERATE_USE_FSDP", "FSDP"),
    ):
        if os.environ.get(variable, "").lower() == "true" and launched not in ("DEEPSPEED", "FSDP"):
            accelerator.print(
                f"warning: the launcher config asks for {asked}, which Accelerate runs only on "
                f"GPUs; these {accelerator.num_processes} process(es) train without it (DDP on the "
                f"{accelerator.device.type}, nothing sharded)"
            )
    if accelerator.distributed_type.name == "MEGATRON_LM":
        raise PhonetuneError(
            "the launcher asked for Megatron-LM, which phonetune train does not support. "
            "Launch with DDP (configs/accelerate/8gpu_ddp.yaml), FSDP "
            "(configs/accelerate/fsdp_8gpu.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2_8gpu.yaml)."
        )
    if is_sharded(accelerator):
        check_fsdp_launch(accelerator, config)
    if zero.uses_deepspeed(accelerator):
        zero.check_deepspeed_launch(accelerator, config)
    return accelerator


def check_fsdp_launch(accelerator: Accelerator, config: Config) -> None:
    """FSDP version 2 (per-parameter sharding), without LayerDrop or fp16 loss scaling."""
    if not accelerator.is_fsdp2:
        raise PhonetuneError(
            "phonetune train shards with FSDP version 2 (torch's fully_shard): set "
            "fsdp_config.fsdp_version: 2 in the Accelerate config, as configs/accelerate/fsdp_8gpu.yaml"
        )
    # fp16 failed on an H200: Accelerate 1.15 unscales the gradients twice when clipping under
    # FSDP, and a plain GradScaler may find overflows per shard, so processes could disagree on which
    # steps to skip (not checked). bf16 needs no loss scaling.
    if config.train.mixed_precision == "fp16":
        raise PhonetuneError(
            "train.mixed_precision=fp16 is not supported under FSDP (loss scaling over shards); "
            "use train.mixed_precision=bf16, or launch fp16 runs with DDP (configs/accelerate/8gpu_ddp.yaml)"
        )
    # Every process gathers a layer's shards together before running it; LayerDrop skips layers at
    # random per process, so one would wait for a gather that the others never join.
    if config.model.layerdrop > 0:
        raise PhonetuneError(
            f"model.layerdrop={config.model.layerdrop:g} cannot run under FSDP: processes skip "
            "different layers, and a sharded layer runs only when all of them gather it. Set "
            "model.layerdrop=0, or launch with DDP (configs/accelerate/8gpu_ddp.yaml)."
        )


def check_fsdp_wrapping(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """The layer classes the Accelerate config shards one by one exist in this model (a
    wav2vec2-base encoder has Wav2Vec2EncoderLayer, not XLSR's ...StableLayerNorm)."""
    wanted = accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap or []
    present = {type(child).__name__ for child in module.modules()}
    missing = [name for name in wanted if name not in present]
    if missing:
        layers = sorted(name for name in present if "EncoderLayer" in name)
        raise PhonetuneError(
            f"the Accelerate config shards layers of class {', '.join(missing)}, which this model "
            f"does not have; set fsdp_config.fsdp_transformer_layer_cls_to_wrap to its encoder "
            f"layer class (this model's layer classes: {', '.join(layers)})"
        )


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP): the forward pass is then a
    collective, and whole weights exist only once gathered."""
    return accelerator.distributed_type.name == "FSDP"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_resume_checkpoint(config: Config, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (None = start fresh), per `resume`."""
    if config.resume == "none":
        existing = ckpt.list_checkpoints(run_dir)
        if existing:
            raise PhonetuneError(
                f"{run_dir} already holds checkpoints (newest: {existing[-1][1].name}). Pass resume=auto to "
                "continue from the newest, resume=PATH for a given one, or choose another run.output_dir."
            )
        return None
    if config.resume == "auto":
        return ckpt.find_latest_checkpoint(run_dir)
    checkpoint = ckpt.resolve_checkpoint(run_dir, config.resume)
    step = ckpt.read_state(checkpoint)["step"]
    newer = [path.name for s, path in ckpt.list_checkpoints(run_dir) if s > step]
    if newer:
        warnings.warn(
            f"resuming from step {step} while {run_dir} holds later checkpoints ({', '.join(newer)}): "
            "they are replaced as training reaches their steps",
            stacklevel=2,
        )
    return checkpoint


def read_versions(prepared_dir: Path) -> dict[str, Any]:
    """espeak-ng / phonemizer versions of the prepared data, and the libraries training runs with."""
    import transformers

    from data import __version__

    prepared: dict[str, Any] = {}
    report = prepared_dir / "prep_report.json"
    if report.is_file():
        prepared = json.loads(report.read_text(encoding="utf-8")).get("versions", {})
    return {
        "espeak_ng": prepared.get("espeak_ng"),
        "phonemizer": prepared.get("phonemizer"),
        "phonetune_prepare": prepared.get("phonetune"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "phonetune": __version__,
    }


def load_data(config: Config) -> Data:
    """The prepared vocabulary and splits, with the training clips filtered by locale and duration."""
    import datasets

    prepared = Path(config.data.prepared_dir)
    if not (prepared / "dataset_dict.json").is_file():
        raise PhonetuneError(
            f"data.prepared_dir={prepared} is not a prepared dataset (no dataset_dict.json); "
            "create one with `phonetune prepare`"
        )
    vocab = load_vocab(prepared / "vocab.json")
    splits = datasets.load_from_disk(str(prepared))
    if config.data.train_split not in splits:
        raise PhonetuneError(
            f"{prepared} has no {config.data.train_split!r} split (it has: {', '.join(splits)}); "
            "set data.train_split"
        )
    train_split = PreparedSplit(splits[config.data.train_split])
    wanted = set(config.data.locales) if config.data.locales else None
    rows = np.arange(len(train_split))
    skipped: dict[str, int] = {}
    if wanted is not None:
        missing = wanted - set(train_split.locales)
        if missing:
            raise PhonetuneError(
                f"data.locales: {', '.join(sorted(missing))} not in the {config.data.train_split} split of "
                f"{prepared} (it has: {', '.join(sorted(set(train_split.locales)))})"
            )
        rows = rows[np.isin(train_split.locales[rows], list(wanted))]
    too_long = train_split.durations[rows] > config.data.max_duration
    skipped["longer_than_max_duration"] = int(too_long.sum())
    rows = rows[~too_long]
    unknown = unknown_phones(train_split.column("phones", rows), vocab)
    if unknown:
        raise PhonetuneError(
            f"phones of the {config.data.train_split} split are missing from {prepared}/vocab.json: "
            f"{' '.join(sorted(unknown))}. The prepared directory is inconsistent; prepare it again."
        )

    eval_split, eval_rows = None, np.zeros(0, dtype=np.int64)
    if config.data.eval_split in splits:
        eval_split = PreparedSplit(splits[config.data.eval_split])
        eval_rows = np.arange(len(eval_split))
        if wanted is not None:
            eval_rows = eval_rows[np.isin(eval_split.locales[eval_rows], list(wanted))]
        limit = config.data.eval_max_utterances
        if limit is not None and len(eval_rows) > limit:
            # an evenly spaced subset: every locale and length stays represented, the same every time
            eval_rows = eval_rows[
                np.unique(np.linspace(0, len(eval_rows) - 1, limit).round().astype(int))
            ]
    return Data(vocab, train_split, rows, eval_split, eval_rows, read_versions(prepared), skipped)


def drop_unalignable(data: Data, module: CTCModel, config: Config) -> None:
    """Skip training clips with fewer CTC frames than phones (+1 per repeated phone), and clips
    shorter than one SpecAugment time mask.

    The CTC loss of the first is infinite: with ctc_zero_infinity it is zeroed (a wasted clip),
    without it the whole step is lost. `phonetune prepare` already rejects them for the standard
    feature encoder; this catches models with another stride. transformers refuses to mask a batch
    whose longest clip has fewer frames than `mask_time_length`, which a batch of only very short
    clips (a small `prepare --min-duration`) would otherwise hit in the middle of a run.
    """
    samples = torch.from_numpy(data.train.num_samples()[data.train_rows])
    frames = module.output_lengths(samples).numpy()
    needed = np.array(
        [_ctc_min_frames(text) for text in data.train.column("phones", data.train_rows)]
    )
    ok = (frames >= needed) & (needed > 0)
    data.skipped["fewer_frames_than_phones_or_no_phones"] = int((~ok).sum())
    if config.model.mask_time_prob > 0:
        maskable = frames >= config.model.mask_time_length
        data.skipped["shorter_than_mask_time_length"] = int((ok & ~maskable).sum())
        ok &= maskable
    data.train_rows = data.train_rows[ok]


def _ctc_min_frames(phones: str) -> int:
    tokens = phones.split()
    return len(tokens) + sum(1 for a, b in zip(tokens, tokens[1:], strict=False) if a == b)


def make_optimizer(module: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=config.train.lr,
        betas=tuple(config.train.betas),
        eps=config.train.eps,
        # One kernel for the whole update instead of a dozen per tensor (CPU and CUDA): on the tiny
        # CPU recipe this alone is ~8% of a step (BENCHMARKS.md, training section).
        fused=True,
    )


def check_resume_compatible(
    config: Config, checkpoint: Path, vocab: dict[str, int], say: Say
) -> None:
    """A different vocabulary or model is an error; other differences are reported as warnings."""
    saved_vocab = ckpt.read_checkpoint_vocab(checkpoint)
    if saved_vocab != vocab:
        only_old = sorted(set(saved_vocab) - set(vocab))[:10]
        only_new = sorted(set(vocab) - set(saved_vocab))[:10]
        raise PhonetuneError(
            f"cannot resume from {checkpoint}: it was trained with another vocabulary "
            f"({len(saved_vocab)} tokens vs {len(vocab)} in {config.data.prepared_dir}/vocab.json; "
            f"only in the checkpoint: {' '.join(only_old) or '-'}; only in the data: {' '.join(only_new) or '-'}"
            f"{'; same tokens, different ids' if not only_old and not only_new else ''}). "
            "Resume with the prepared data it was trained on, or start a new run."
        )
    saved_model = json.loads(
        (checkpoint / ckpt.MODEL_DIR / "config.json").read_text(encoding="utf-8")
    )
    expected = expected_architecture(config.model, len(vocab))
    if expected is None:
        say(
            f"warning: could not read {config.model.name_or_path}'s config to check it matches {checkpoint}"
        )
    else:
        differences = architecture_differences(saved_model, expected)
        if differences:
            raise PhonetuneError(
                f"cannot resume from {checkpoint}: the configured model differs from the checkpoint's "
                f"({'; '.join(differences)}). Resume with the model settings it was trained with."
            )
    saved_config_file = checkpoint / ckpt.CONFIG_FILE
    if saved_config_file.is_file():
        import yaml

        saved = yaml.safe_load(saved_config_file.read_text(encoding="utf-8")) or {}
        current = config_to_dict(config)
        saved.pop("resume", None)
        current.pop("resume", None)
        for key, old, new in config_differences(saved, current):
            say(f"warning: {key} differs from the checkpoint's config: {old!r} -> {new!r}")


# --- metrics --------------------------------------------------------------------------------------
@contextlib.contextmanager
def explain_write_failure(path: Path) -> Iterator[None]:
    """A full disk or a permission error on a run file: a clear error, not a traceback."""
    try:
        yield
    except OSError as error:
        raise PhonetuneError(
            f"cannot write {path}: {error.strerror or error}. Free disk space or fix the "
            "permissions, then continue with resume=auto (checkpoints already written are intact)."
        ) from error


class MetricsLogger:
    """metrics.jsonl always (main process); wandb and TensorBoard when asked, never fatal."""

    def __init__(
        self, run_dir: Path, config: Config, enabled: bool, resume_step: int | None
    ) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.wandb = self.tensorboard = None
        if not enabled:
            return
        keep_through = -1 if resume_step is None else resume_step
        if self.path.is_file():
            # Lines after the resumed checkpoint belong to the interrupted run's lost steps; the
            # resumed run writes them again, so drop them to keep one line per step.
            lines = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if _step_of(line) <= keep_through
            ]
            # Replaced atomically: a kill during the rewrite must not lose the history.
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            os.replace(partial, self.path)
        self.file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if "wandb" in config.log.report_to:
            self.wandb = _start_wandb(config, run_dir)
        if "tensorboard" in config.log.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except Exception as error:  # a reporter must never stop training
                warnings.warn(f"TensorBoard logging disabled: {error}", stacklevel=2)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with explain_write_failure(self.path):
            self.file.write(json.dumps(_finite(record), ensure_ascii=False, allow_nan=False) + "\n")
            self.file.flush()
        scalars = _flatten_scalars(record)
        step = record["step"]
        if self.wandb is not None:
            try:
                self.wandb.log(scalars, step=step)
            except Exception as error:
                warnings.warn(f"wandb logging failed, disabling it: {error}", stacklevel=2)
                self.wandb = None
        if self.tensorboard is not None:
            try:
                for key, value in scalars.items():
                    self.tensorboard.add_scalar(key, value, step)
            except Exception as error:
                warnings.warn(f"TensorBoard logging failed, disabling it: {error}", stacklevel=2)
                self.tensorboard = None

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        for reporter, finish in ((self.wandb, "finish"), (self.tensorboard, "close")):
            if reporter is not None:
                with contextlib.suppress(Exception):
                    getattr(reporter, finish)()


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively: metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:
        return math.inf


def _flatten_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_flatten_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
            out[f"{prefix}{key}"] = value
    return out


def _start_wandb(config: Config, run_dir: Path):  # -> a wandb run or None
    """wandb in offline mode unless the user chose a mode or has a key; failures only warn."""
    try:
        if "WANDB_MODE" not in os.environ and not _wandb_key_available():
            os.environ["WANDB_MODE"] = "offline"
        import wandb

        id_file = run_dir / "wandb_run_id"  # the same wandb run across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=config.log.wandb_project,
            name=config.run.name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config_to_dict(config),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as error:  # logging must never stop training
        warnings.warn(f"wandb disabled: {error}", stacklevel=2)
        return None


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except Exception:  # no or unreadable ~/.netrc
        return False


# --- the training step ------------------------------------------------------------------------------
def ctc_loss(
    logits: torch.Tensor,
    output_lengths: torch.Tensor,
    labels: torch.Tensor,
    label_lengths: torch.Tensor,
    reduction: str,
    zero_infinity: bool,
) -> torch.Tensor:
    """Summed CTC loss of a batch, in fp32 whatever the autocast dtype (half-precision CTC gives NaN).

    reduction "sum": per-utterance losses summed; "mean": each divided by its label length first.
    The caller divides by the step's global token (or utterance) count.
    """
    with (
        torch.autocast(device_type=logits.device.type, enabled=False),
        torch.backends.cudnn.flags(enabled=False),
    ):
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        targets = labels[labels != IGNORE_INDEX]
        losses = F.ctc_loss(
            log_probs,
            targets,
            output_lengths,
            label_lengths,
            blank=BLANK_ID,
            reduction="none",
            zero_infinity=zero_infinity,
        )
    if reduction == "mean":
        losses = losses / label_lengths.clamp(min=1)
    return losses.sum()


def count_infeasible(
    output_lengths: torch.Tensor, labels: torch.Tensor, label_lengths: torch.Tensor
) -> int:
    """Utterances whose CTC loss is infinite: fewer frames than phones plus repeated neighbours."""
    repeats = ((labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] != IGNORE_INDEX)).sum(dim=1)
    return int((output_lengths < label_lengths + repeats).sum())


@dataclass
class StepResult:
    loss: float  # global loss of the step (per token or per utterance), NaN if non-finite
    grad_norm: float
    skipped: bool
    audio_seconds: float  # all processes
    padded_seconds: float
    infeasible: int


def train_step(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: list[Batch],
    ghosts: list[bool],
    accelerator: Accelerator,
    config: Config,
    freeze_transformer: bool,
) -> StepResult:
    """Forward/backward over the step's batches (gradient accumulation), clip, update, schedule.

    `ghosts[i]` marks a zero-weight copy standing in for an empty share of a global batch (fewer
    clips than processes): it runs so that every process joins the gradient reduction, and counts
    for nothing.
    """
    device = accelerator.device
    unwrapped: CTCModel = accelerator.unwrap_model(module)
    deepspeed = zero.uses_deepspeed(accelerator)
    audio_dtype = input_dtype(unwrapped)
    mean_per_utterance = config.model.ctc_loss_reduction == "mean"
    real = [b for b, ghost in zip(batches, ghosts, strict=True) if not ghost]
    # The loss is normalised by the number of label tokens of the whole step: all accumulated batches
    # on all processes (or by the number of utterances with reduction "mean"). Long and short batches
    # thus weigh by their content, not equally, and the result does not depend on the process count.
    local_count = sum(
        len(b.rows) if mean_per_utterance else int(b.label_lengths.sum()) for b in real
    )
    global_count = accelerator.reduce(torch.tensor(float(local_count), device=device), "sum").clamp(
        min=1.0
    )
    loss_sum = torch.zeros((), device=device)
    infeasible = 0
    for index, (batch, ghost) in enumerate(zip(batches, ghosts, strict=True)):
        batch = batch.to(device, audio_dtype)
        last = index == len(batches) - 1
        if deepspeed:  # the last backward of the step reduces the gradients
            module.set_gradient_accumulation_boundary(last)
        with contextlib.nullcontext() if last else accelerator.no_sync(module):
            logits = module(
                batch.input_values, batch.attention_mask, freeze_transformer=freeze_transformer
            )
            output_lengths = unwrapped.output_lengths(batch.input_lengths)
            loss = ctc_loss(
                logits,
                output_lengths,
                batch.labels,
                batch.label_lengths,
                config.model.ctc_loss_reduction,
                config.model.ctc_zero_infinity,
            )
            # DDP, FSDP and ZeRO average gradients over processes: scaling by the process count
            # makes that average the gradient of (sum of all losses) / global_count.
            weight = 0.0 if ghost else accelerator.num_processes
            if deepspeed:  # already normalised over the accumulated batches: no 1/grad_accum
                module.backward(loss * weight / global_count, scale_wrt_gas=False)
            else:
                accelerator.backward(loss * weight / global_count)
        if not ghost:
            loss_sum += loss.detach()
            infeasible += count_infeasible(output_lengths, batch.labels, batch.label_lengths)

    if deepspeed:
        grad_norm, skipped = zero.step(module)
    else:
        grad_norm, skipped = clip_and_update(module, optimizer, accelerator, config)
    finite = math.isfinite(grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    totals = torch.tensor(
        [
            float(loss_sum),
            float(infeasible),
            sum(b.audio_seconds for b in real),
            sum(b.padded_seconds for b in real),
        ],
        dtype=torch.float64,
        device=device,
    )
    totals = accelerator.reduce(totals, "sum")
    loss_value = float(totals[0] / global_count.double())
    return StepResult(
        loss=loss_value if finite and math.isfinite(loss_value) else math.nan,
        grad_norm=grad_norm,
        skipped=skipped,
        audio_seconds=float(totals[2]),
        padded_seconds=float(totals[3]),
        infeasible=int(totals[1]),
    )


def clip_and_update(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    config: Config,
) -> tuple[float, bool]:
    """Clip to train.max_grad_norm and update unless the gradient is NaN/inf; the norm before
    clipping and whether the update was skipped."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    max_norm = config.train.max_grad_norm if config.train.max_grad_norm > 0 else math.inf
    grad_norm = accelerator.clip_grad_norm_(parameters, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # under FSDP a DTensor: the norm of the whole gradient
        grad_norm = grad_norm.full_tensor()
    finite = bool(torch.isfinite(grad_norm))
    skipped = not finite
    if finite or accelerator.scaler is not None:
        optimizer.step()  # with fp16 the grad scaler skips an overflowing step itself and lowers its scale
        skipped = skipped or accelerator.optimizer_step_was_skipped
    return float(grad_norm), skipped


def input_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the model's weights are in, for the audio fed to it: fp32, except under DeepSpeed
    with bf16, which casts the model itself instead of using autocast."""
    return next(module.parameters()).dtype


class BatchStream:
    """This process's shares of the global batches, `grad_accum` at a time, across epochs, from a
    resumable position; with each, whether it is a zero-weight copy (`DurationBatchSampler.is_ghost`)."""

    def __init__(
        self, data: Data, sampler: DurationBatchSampler, config: Config, pin_memory: bool
    ) -> None:
        self.data, self.sampler, self.config, self.pin_memory = data, sampler, config, pin_memory
        self.iterator = None

    def next_step(self, state: TrainState) -> tuple[list[Batch], list[bool]]:
        accum = self.config.train.grad_accum
        if state.position >= self.sampler.batches_per_epoch():
            state.epoch, state.position = state.epoch + 1, 0
            self.iterator = None
        if self.iterator is None:
            self.sampler.set_epoch(state.epoch, state.position)
            loader = make_loader(
                self.data.train,
                self.sampler,
                self.data.vocab,
                self.config.data.num_workers,
                self.pin_memory,
                self.config.train.pad_to_multiple_of,
            )
            self.iterator = iter(loader)
        batches = [next(self.iterator) for _ in range(accum)]
        ghosts = [self.sampler.is_ghost(state.position + i) for i in range(accum)]
        state.position += accum
        return batches, ghosts


# --- evaluation -------------------------------------------------------------------------------------
def evaluate(
    module: torch.nn.Module, data: Data, accelerator: Accelerator, config: Config
) -> dict[str, Any] | None:
    """Dev PER per locale and overall, blank fraction, a few decoded examples (main process only).

    Each process decodes a disjoint share of the clips; the shares are gathered whole, so no clip
    is dropped or counted twice however the split divides among processes.
    """
    from accelerate.utils import gather_object

    from train.per import greedy_decode, score_predictions

    if data.eval is None or len(data.eval_rows) == 0:
        return None
    unwrapped: CTCModel = accelerator.unwrap_model(module)
    id_to_token = {index: token for token, index in data.vocab.items()}
    batch_seconds = config.train.eval_batch_seconds or config.train.batch_seconds
    durations = data.eval.durations[data.eval_rows]
    count, index = accelerator.num_processes, accelerator.process_index
    mine = plan_eval(durations, batch_seconds, count, index)
    fillers = 0
    if is_sharded(accelerator):
        # Under FSDP each forward pass gathers the weights from all processes, so all must run
        # the same number: a process with one batch fewer decodes the first batch again, unscored.
        everyone = plan_eval(durations, batch_seconds)
        fillers = math.ceil(len(everyone) / count) - len(mine)
        mine = mine + [everyone[0]] * fillers
    loader = make_loader(
        data.eval, [data.eval_rows[b] for b in mine], None, config.data.num_workers
    )
    records: list[tuple[int, str, str, str]] = []
    blank_frames = total_frames = 0
    audio_dtype = input_dtype(unwrapped)
    unwrapped.eval()
    try:
        for number, batch in enumerate(loader):
            batch = batch.to(accelerator.device, audio_dtype)
            with torch.no_grad(), accelerator.autocast():
                logits = unwrapped(
                    batch.input_values, batch.attention_mask, freeze_transformer=True
                )
            if number >= len(mine) - fillers:
                continue
            ids = logits.argmax(dim=-1).cpu()
            lengths = unwrapped.output_lengths(batch.input_lengths).cpu()
            for i, row in enumerate(batch.rows):
                frames = ids[i, : int(lengths[i])]
                blank_frames += int((frames == BLANK_ID).sum())
                total_frames += len(frames)
                records.append(
                    (
                        row,
                        batch.locales[i],
                        batch.phones[i],
                        greedy_decode(frames.tolist(), id_to_token),
                    )
                )
    finally:
        unwrapped.train()
    if accelerator.num_processes > 1:
        records = gather_object(records)
    frame_counts = accelerator.reduce(
        torch.tensor([blank_frames, total_frames], dtype=torch.float64, device=accelerator.device),
        "sum",
    )
    if not accelerator.is_main_process:
        return None
    records.sort(key=lambda record: record[0])
    scores = score_predictions(
        [r[3] for r in records], [r[2] for r in records], [r[1] for r in records]
    )
    return {
        "eval_per": scores["overall"]["per"],
        "eval_per_locale": {loc: counts["per"] for loc, counts in scores["per_locale"].items()},
        "eval_counts": scores["overall"],
        "eval_counts_per_locale": scores["per_locale"],
        "eval_blank_fraction": float(frame_counts[0] / frame_counts[1].clamp(min=1)),
        "eval_utterances": len(records),
        "eval_examples": pick_examples(records, config.train.eval_num_examples),
    }


def pick_examples(records: list[tuple[int, str, str, str]], count: int) -> list[dict[str, str]]:
    """The first clip of each locale in turn, `count` in all (the same clips at every evaluation)."""
    by_locale: dict[str, list[tuple[int, str, str, str]]] = {}
    for record in records:
        by_locale.setdefault(record[1], []).append(record)
    picked: list[dict[str, str]] = []
    depth = 0
    while len(picked) < count and any(depth < len(v) for v in by_locale.values()):
        for locale in sorted(by_locale):
            if depth < len(by_locale[locale]) and len(picked) < count:
                _, _, reference, prediction = by_locale[locale][depth]
                picked.append({"locale": locale, "reference": reference, "prediction": prediction})
        depth += 1
    return picked


# --- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: DurationBatchSampler,
    accelerator: Accelerator,
    config: Config,
    data: Data,
) -> Path:
    """Write checkpoints/step_<n>/ atomically (every process adds its RNG state), then prune.

    If a write fails on any process (disk full, permission denied), every process raises a
    PhonetuneError; the part written is removed and the earlier checkpoints stay as they were.
    """
    tmp = ckpt.checkpoints_dir(run_dir) / (ckpt.step_dir_name(state.step) + ".tmp")
    error = None
    if accelerator.is_main_process:
        error = guard.attempt(ckpt.begin_checkpoint, run_dir, state.step)
    guard.settle_save(accelerator, run_dir, state.step, error)
    weights, optimizer_state = gather_training_state(module, optimizer, accelerator)
    error = guard.attempt(ckpt.write_rng_state, tmp, accelerator.process_index)
    if accelerator.is_main_process and error is None:
        scaler = accelerator.scaler
        payload = {
            **asdict(state),
            "eval_per": state.eval_per if state.eval_step == state.step else None,
            # The batches consumed, not the sampler's own position: DataLoader workers read ahead.
            "sampler": {
                "epoch": state.epoch,
                "position": state.position,
                "seed": config.train.seed,
                "num_processes": accelerator.num_processes,
                "global_batch_seconds": config.train.batch_seconds * accelerator.num_processes,
                "grad_accum": config.train.grad_accum,
                "batches_per_epoch": sampler.batches_per_epoch(),
            },
            "num_processes": accelerator.num_processes,
            "versions": data.versions,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        error = guard.attempt(
            ckpt.write_checkpoint_files,
            tmp,
            model=accelerator.unwrap_model(module).model,
            vocab=data.vocab,
            config_yaml=dump_config(config),
            state=payload,
            optimizer_state=optimizer_state,
            scheduler_state=scheduler.state_dict(),
            scaler_state=scaler.state_dict() if scaler is not None else None,
            model_state=weights,
        )
    guard.settle_save(accelerator, run_dir, state.step, error)
    final = ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(state.step)
    if accelerator.is_main_process:
        error = guard.attempt(ckpt.commit_checkpoint, tmp)
        error = error or guard.attempt(ckpt.update_best, run_dir)
        error = error or guard.attempt(ckpt.prune_checkpoints, run_dir, config.train.keep_last)
    guard.settle_save(accelerator, run_dir, state.step, error, discard=False)
    return final


def gather_training_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole model weights (Wav2Vec2ForCTC names) and optimizer state, on the main process.

    Every process must call this: under FSDP and ZeRO-2 both are gathered from the shards. The
    optimizer state is keyed by parameter name, not position, so a checkpoint resumes under one
    process, DDP, FSDP or ZeRO-2 alike.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if zero.uses_deepspeed(accelerator):
        weights, optimizer_state = zero.gather_state(module, keep=accelerator.is_main_process)
    else:
        weights = accelerator.get_state_dict(module)
        optimizer_state = get_optimizer_state_dict(
            module,
            _torch_optimizer(optimizer),
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
    # CTCModel names: "model." + Wav2Vec2ForCTC's
    return {name.removeprefix("model."): t for name, t in weights.items()}, optimizer_state


def restore_optimizer(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    path: Path,
    accelerator: Accelerator,
) -> None:
    """Load a name-keyed optimizer state (see gather_training_state), sharding it under FSDP or
    ZeRO-2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if any(isinstance(key, int) for key in saved.get("state", {})):
        raise PhonetuneError(
            f"{path}/optimizer.pt keys its state by position (a phonetune before FSDP support wrote "
            "it), and this version cannot continue from it. Export it (phonetune export) and start "
            "a new run from the export with model.name_or_path=EXPORT_DIR."
        )
    if zero.uses_deepspeed(accelerator):
        zero.restore_optimizer(module, saved)
        return
    set_optimizer_state_dict(
        module,
        _torch_optimizer(optimizer),
        optim_state_dict=saved,
        options=StateDictOptions(full_state_dict=True),
    )


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's AcceleratedOptimizer


def load_checkpoint(
    checkpoint: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    sampler: DurationBatchSampler,
    accelerator: Accelerator,
    config: Config,
    say: Say,
) -> TrainState:
    """Restore optimizer, scheduler, scaler, sampler position and this process's RNG state.

    (The weights were loaded with the model.) RNG comes last, so nothing drawn during setup leaks
    into the continued run.
    """
    saved = ckpt.read_state(checkpoint)
    known = {f for f in TrainState.__dataclass_fields__}
    state = TrainState(**{key: value for key, value in saved.items() if key in known})
    restore_optimizer(
        module, optimizer, ckpt.load_tensors(checkpoint, "optimizer.pt"), checkpoint, accelerator
    )
    scheduler.load_state_dict(ckpt.load_tensors(checkpoint, "scheduler.pt"))
    scaler_state = ckpt.load_tensors(checkpoint, "scaler.pt")
    if accelerator.scaler is not None and scaler_state is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    continue_sampler(state, saved.get("sampler", {}), sampler, accelerator, config, say)
    rng = ckpt.load_tensors(checkpoint, f"rng_state_{accelerator.process_index}.pt")
    if rng is None:
        say(
            f"warning: {checkpoint} has no RNG state for process {accelerator.process_index}; seeding it afresh"
        )
        seed_everything(config.train.seed + 1000 * accelerator.process_index + state.step)
    else:
        ckpt.restore_rng_state(rng)
    return state


def continue_sampler(
    state: TrainState,
    saved: dict[str, Any],
    sampler: DurationBatchSampler,
    accelerator: Accelerator,
    config: Config,
    say: Say,
) -> None:
    """Put the sampler where the checkpoint's run stopped, re-sharding it if the layout changed.

    The global batches depend on the global budget (batch_seconds × processes), not on the process
    count: with the same global budget and accumulation the epoch's batches are the same, and the
    run continues at the same global batch, now split over another number of processes. Otherwise
    the batches differ and the run continues at the same fraction of the epoch.
    """
    processes = accelerator.num_processes
    global_seconds = config.train.batch_seconds * processes
    sampler.set_epoch(state.epoch)
    same_batches = (
        saved.get("global_batch_seconds") == global_seconds
        and saved.get("grad_accum") == config.train.grad_accum
        and saved.get("batches_per_epoch") == sampler.batches_per_epoch()
    )
    if same_batches and saved.get("num_processes") != processes:
        say(
            f"warning: resuming a {saved.get('num_processes')}-process run with {processes}: the same "
            "global batches, now split differently, so floating-point sums (and the random draws of "
            "masking and dropout) differ from an uninterrupted run"
        )
    elif not same_batches:
        fraction = state.position / max(saved.get("batches_per_epoch") or 1, 1)
        accum = config.train.grad_accum
        state.position = min(
            int(fraction * sampler.batches_per_epoch()) // accum * accum,
            sampler.batches_per_epoch(),
        )
        say(
            f"warning: the checkpoint's batching differs ({saved.get('num_processes')} process(es) × "
            f"{saved.get('global_batch_seconds', '?')} s global budget, grad_accum "
            f"{saved.get('grad_accum')}; now {processes} × {global_seconds:g} s, grad_accum "
            f"{config.train.grad_accum}): continuing at the same fraction of the epoch "
            f"({state.position}/{sampler.batches_per_epoch()}), in a different data order. Keep "
            "train.batch_seconds × processes and train.grad_accum unchanged to continue exactly."
        )
    sampler.set_epoch(state.epoch, state.position)


# --- the run ----------------------------------------------------------------------------------------
# What a run directory may hold; anything else means run.output_dir points at someone's files.
RUN_DIR_ENTRIES = {
    "config.yaml",
    METRICS_FILE,
    ckpt.CHECKPOINTS_DIR,
    METRICS_FILE + ".tmp",
    ckpt.BEST_FILE,
    guard.LOCK_FILE,
    "wandb",
    "wandb_run_id",
    "tensorboard",
}


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run.output_dir that is a file, or a folder holding files of something else."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PhonetuneError(f"run.output_dir={run_dir} is a file; give a directory")
    if run_dir.is_dir():
        foreign = sorted(
            entry.name
            for entry in run_dir.iterdir()
            if entry.name not in RUN_DIR_ENTRIES and not entry.name.startswith(".")
        )
        if foreign:
            raise PhonetuneError(
                f"run.output_dir={run_dir} holds files that are not a phonetune run "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); training would "
                "write its config, metrics and checkpoints among them. Choose a new or empty directory."
            )


def train(config: Config) -> dict[str, Any]:
    """Train as `config` says; returns a summary (final step, last evaluation, checkpoint paths)."""
    accelerator = make_accelerator(config)
    run_dir = Path(config.run.output_dir).resolve()
    check_run_dir(run_dir)
    # One run per directory (a second would delete this one's checkpoint writes); released at the
    # end, or by the kernel if the process dies.
    guard.lock_run_dir(run_dir, accelerator)
    try:
        return train_locked(config, accelerator, run_dir)
    finally:
        guard.unlock_run_dir(run_dir)


def train_locked(config: Config, accelerator: Accelerator, run_dir: Path) -> dict[str, Any]:
    """The run itself, once this process holds the run directory."""
    main_process = accelerator.is_main_process
    say = accelerator.print
    if main_process:
        for line in ckpt.clean_interrupted_saves(run_dir):
            say(f"{run_dir}: {line}")
    accelerator.wait_for_everyone()  # everyone looks for the checkpoint after the clean-up
    resume_from = find_resume_checkpoint(config, run_dir)
    data = load_data(config)
    if resume_from is not None:
        check_resume_compatible(config, resume_from, data.vocab, say)

    # Model: the same initialisation on every process (DDP also broadcasts rank 0's weights).
    seed_everything(config.train.seed)
    if resume_from is not None:
        model, _ = load_checkpoint_model(resume_from, config.model)
        origin = f"checkpoint {resume_from}"
    else:
        model, origin = build_model(config.model, data.vocab)
    module = CTCModel(model)
    if is_sharded(accelerator):
        check_fsdp_wrapping(accelerator, module)
    drop_unalignable(data, module, config)
    trainable, total = count_parameters(module)
    optimizer = make_optimizer(module, config)
    t = config.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_multiplier(
            t.lr_schedule,
            t.max_steps,
            t.warmup_ratio,
            t.hold_ratio,
            t.init_lr_scale,
            t.final_lr_scale,
        ),
    )
    # DeepSpeed casts the model to bf16 and builds its fp32 masters from that: keep them exact.
    fp32_weights = zero.trainable_fp32_weights(module) if zero.uses_deepspeed(accelerator) else None
    module, optimizer = accelerator.prepare(module, optimizer)
    if fp32_weights is not None:
        zero.set_fp32_masters(module, fp32_weights)
        del fp32_weights
    sampler = DurationBatchSampler(
        data.train_rows,
        data.train.durations[data.train_rows],
        t.batch_seconds,
        t.seed,
        accelerator.num_processes,
        accelerator.process_index,
        t.grad_accum,
        t.bucket_width,
        t.longest_first,
    )
    steps_per_epoch = sampler.batches_per_epoch() // t.grad_accum
    if steps_per_epoch == 0:
        raise PhonetuneError(
            f"the {config.data.train_split} split ({len(data.train_rows)} usable clips, "
            f"{data.train.durations[data.train_rows].sum():.0f} s) fills less than one optimizer step of "
            f"{accelerator.num_processes} process(es) × {t.grad_accum} batch(es) of ≤{t.batch_seconds:g} s; "
            "lower train.batch_seconds or train.grad_accum"
        )

    if main_process:
        with explain_write_failure(run_dir / "config.yaml"):
            write_config(config, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    logger = MetricsLogger(
        run_dir,
        config,
        main_process,
        None if resume_from is None else ckpt.read_state(resume_from)["step"],
    )

    # Masking and dropout draw from the RNGs: seed each process differently, or restore them.
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, module, optimizer, scheduler, sampler, accelerator, config, say
        )
    else:
        state = TrainState()
        seed_everything(config.train.seed + 1000 * accelerator.process_index)

    print_summary(
        say,
        config,
        data,
        origin,
        trainable,
        total,
        accelerator,
        sampler,
        steps_per_epoch,
        run_dir,
        resume_from,
        state,
    )
    stream = BatchStream(data, sampler, config, pin_memory=accelerator.device.type == "cuda")
    progress = _progress_bar(config, main_process, state.step)
    last_saved: Path | None = None
    last_eval: dict[str, Any] | None = None
    started, last_log_time = time.time(), time.time()
    session_audio = 0.0
    module.train()
    # SIGTERM/SIGINT only set a flag: every process stops at the same step boundary, after saving.
    stop = guard.StopRequest(announce=main_process)
    stop.install()
    saved_step, stop_signal = state.step, 0  # (step 0: nothing to save)
    try:
        while state.step < t.max_steps:
            stop_signal = stop.agreed(accelerator)
            if stop_signal:
                break
            batches, ghosts = stream.next_step(state)
            frozen = state.step < t.freeze_finetune_updates
            lr = optimizer.param_groups[0][
                "lr"
            ]  # the rate this step uses (the scheduler then moves on)
            result = train_step(
                module, optimizer, scheduler, batches, ghosts, accelerator, config, frozen
            )
            state.step += 1
            state.audio_seconds += result.audio_seconds
            state.ctc_infeasible += result.infeasible
            state.interval_audio += result.audio_seconds
            state.interval_padded += result.padded_seconds
            if result.skipped:
                state.skipped_steps += 1
                state.consecutive_nonfinite += 1
                if state.consecutive_nonfinite >= t.max_consecutive_nonfinite:
                    latest = ckpt.find_latest_checkpoint(run_dir)
                    raise PhonetuneError(
                        f"stopped at step {state.step}: {state.consecutive_nonfinite} steps in a row had a "
                        f"NaN/inf gradient and were skipped ({state.skipped_steps} in all; "
                        f"train.max_consecutive_nonfinite={t.max_consecutive_nonfinite}). Likely causes: "
                        "a learning rate too high for the model (lower train.lr or lengthen "
                        "train.warmup_ratio); fp16 overflow (train.mixed_precision=bf16 or no); clips with "
                        "fewer frames than phones while model.ctc_zero_infinity=false; NaN/inf in the "
                        "audio (prepare the data again). "
                        f"Last checkpoint: {latest or 'none'} (continue from it with resume=auto)."
                    )
            else:
                state.consecutive_nonfinite = 0
                state.interval_loss += result.loss
                state.interval_steps += 1

            session_audio += result.audio_seconds
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{result.loss:.3f}",
                    lr=f"{lr:.2e}",
                    refresh=False,
                    audio_s_per_s=f"{session_audio / max(time.time() - started, 1e-9):.1f}",
                )
            if state.step % config.log.every_steps == 0 or state.step == t.max_steps:
                now = time.time()
                record = {
                    "step": state.step,
                    "loss": state.interval_loss / state.interval_steps
                    if state.interval_steps
                    else None,
                    "lr": lr,
                    "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
                    "epoch": state.epoch + state.position / max(sampler.batches_per_epoch(), 1),
                    "audio_seconds": state.interval_audio,
                    "audio_seconds_per_second": state.interval_audio
                    / max(now - last_log_time, 1e-9),
                    "padding_fraction": 1.0
                    - state.interval_audio / max(state.interval_padded, 1e-9),
                    "frozen_transformer": frozen,
                    "skipped_steps": state.skipped_steps,
                    "ctc_infeasible": state.ctc_infeasible,
                }
                logger.log(record)
                state.interval_loss, state.interval_steps = 0.0, 0
                state.interval_audio = state.interval_padded = 0.0
                last_log_time = now

            at_end = state.step == t.max_steps
            if state.step % t.eval_steps == 0 or at_end:
                last_eval = evaluate(module, data, accelerator, config)
                if last_eval is not None:
                    state.eval_per, state.eval_step = last_eval["eval_per"], state.step
                    logger.log({"step": state.step, **last_eval})
                    _print_eval(progress, state.step, last_eval)
            if state.step % t.save_steps == 0 or at_end:
                last_saved = save_checkpoint(
                    run_dir, state, module, optimizer, scheduler, sampler, accelerator, config, data
                )
                saved_step = state.step
        if stop_signal:
            if state.step != saved_step:
                last_saved = save_checkpoint(
                    run_dir, state, module, optimizer, scheduler, sampler, accelerator, config, data
                )
            checkpoint = last_saved or resume_from
            (progress.write if progress is not None else say)(
                guard.explain_stop(stop_signal, state.step, t.max_steps, checkpoint, run_dir)
            )
            raise guard.TrainingStopped(stop_signal, state.step, checkpoint)
    finally:
        stop.uninstall()
        if progress is not None:
            progress.close()
        logger.close()

    best = ckpt.find_best_checkpoint(run_dir)
    say(
        f"done: {state.step} steps in {time.time() - started:.0f} s"
        + (f", {state.skipped_steps} skipped (non-finite)" if state.skipped_steps else "")
        + f"\n  run directory: {run_dir}\n  metrics:       {run_dir / METRICS_FILE}"
        + f"\n  last checkpoint: {last_saved or ckpt.find_latest_checkpoint(run_dir)}"
        + (
            f"\n  best checkpoint: {best} (dev PER {ckpt.read_state(best)['eval_per']:.4f})"
            if best
            else ""
        )
    )
    return {
        "step": state.step,
        "run_dir": str(run_dir),
        "last_checkpoint": str(last_saved) if last_saved else None,
        "best_checkpoint": str(best) if best else None,
        "eval": last_eval,
        "skipped_steps": state.skipped_steps,
    }


def _progress_bar(config: Config, main_process: bool, initial: int):  # -> tqdm or None
    if not (main_process and config.log.progress_bar):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=config.train.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True
    )


def _print_eval(progress: Any, step: int, result: dict[str, Any]) -> None:
    write = progress.write if progress is not None else print
    per_locale = "  ".join(f"{loc} {per:.3f}" for loc, per in result["eval_per_locale"].items())
    write(
        f"step {step}: dev PER {result['eval_per']:.4f} ({result['eval_utterances']} clips; "
        f"blank frames {result['eval_blank_fraction']:.0%})  {per_locale}"
    )
    for example in result["eval_examples"]:
        write(
            f"  [{example['locale']}] ref: {example['reference']}\n  {' ' * (len(example['locale']) + 2)} hyp: "
            f"{example['prediction']}"
        )


def print_summary(
    say: Say,
    config: Config,
    data: Data,
    origin: str,
    trainable: int,
    total: int,
    accelerator: Accelerator,
    sampler: DurationBatchSampler,
    steps_per_epoch: int,
    run_dir: Path,
    resume_from: Path | None,
    state: TrainState,
) -> None:
    t = config.train
    train_seconds = float(data.train.durations[data.train_rows].sum())
    locales = sorted(set(data.train.locales[data.train_rows]))
    skipped = ", ".join(
        f"{count} {reason.replace('_', ' ')}" for reason, count in data.skipped.items() if count
    )
    effective = t.batch_seconds * accelerator.num_processes * t.grad_accum
    sharding = ""
    if is_sharded(accelerator):
        sharding = ", FSDP (weights and optimizer state sharded)"
    elif zero.uses_deepspeed(accelerator):
        sharding = ", DeepSpeed ZeRO-2 (optimizer state and gradients sharded)"
    say(
        "phonetune train\n"
        f"  run directory:   {run_dir} (config.yaml, {METRICS_FILE}, checkpoints/)\n"
        f"  data:            {config.data.prepared_dir}: {config.data.train_split} {len(data.train_rows)} clips, "
        f"{train_seconds / 3600:.2f} h, {len(locales)} locale(s) ({', '.join(locales)})"
        + (f"; skipped {skipped}" if skipped else "")
        + (
            f"\n                   {config.data.eval_split}: {len(data.eval_rows)} clips"
            if data.eval is not None
            else f"\n                   no {config.data.eval_split!r} split: no evaluation"
        )
        + f"\n  vocabulary:      {len(data.vocab)} tokens (blank <pad> = 0)\n"
        f"  model:           {origin}\n"
        f"  parameters:      {trainable / 1e6:.2f}M trainable / {total / 1e6:.2f}M total "
        f"(feature encoder frozen"
        + (
            f"; transformer frozen for the first {t.freeze_finetune_updates} steps"
            if t.freeze_finetune_updates
            else ""
        )
        + ")\n"
        f"  processes:       {accelerator.num_processes} on {accelerator.device.type}{sharding}, mixed precision {t.mixed_precision}\n"
        f"  batch:           ≤{t.batch_seconds:g} s audio per process × {accelerator.num_processes} process(es) × "
        f"{t.grad_accum} accumulation = ≤{effective:g} s per optimizer step\n"
        f"  steps per epoch: {steps_per_epoch} ({t.max_steps} steps ≈ {t.max_steps / steps_per_epoch:.1f} epochs)\n"
        f"  schedule:        {t.lr_schedule}, peak lr {t.lr:g}, warm-up {t.warmup_ratio:g} / hold {t.hold_ratio:g} "
        f"of the steps\n"
        + (
            f"  resumed from:    {resume_from} (step {state.step}, epoch {state.epoch})\n"
            if resume_from
            else ""
        )
    )
