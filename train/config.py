"""The training configuration: typed dataclasses, YAML loading, `key=value` overrides, validation.

A config file has the sections `data`, `model`, `train`, `run` and `log`, plus the top-level key
`resume`. Every field below is documented where it is declared. Overrides use dotted keys
(`train.max_steps=40`, `model.config.hidden_size=256`) and their values are read as YAML scalars
(`true`, `1e-3`, `[0.9, 0.98]`, `null`).

Everything is checked before any work starts: unknown keys (the message names the valid ones),
wrong types and contradictions are collected and reported together in one `PhonetuneError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from phonetune.data.errors import PhonetuneError

LR_SCHEDULES = ("tri_stage", "linear", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16", "bf16-weights")
CTC_IMPLEMENTATIONS = ("pytorch", "triton")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
REPORTERS = ("wandb", "tensorboard")
CTC_REDUCTIONS = ("sum", "mean")
# The linear layers of a wav2vec 2.0 encoder layer (Wav2Vec2ForCTC module names): attention
# projections and the two feed-forward layers. LoRA on all of them is the usual choice for speech
# encoders; the feature projection and the CTC head are left out (the head is trained whole).
ADAPTABLE_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "intermediate_dense",
    "output_dense",
)
DEFAULT_ADAPTER_TARGETS = ADAPTABLE_MODULES


@dataclass
class DataConfig:
    """Where the prepared dataset is and which of its clips train and evaluate."""

    prepared_dir: str | None = None
    """Folder written by `phonetune prepare` (vocab.json, prep_report.json, the DatasetDict). Required."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "dev"
    """Split to compute the phone error rate on every `train.eval_steps`."""
    locales: list[str] | None = None
    """Train and evaluate only on these Common Voice locales; null = every locale of the dataset."""
    max_duration: float = 20.0
    """Training clips longer than this many seconds are skipped (attention cost grows with length²)."""
    language_sampling_alpha: float = 1.0
    """Each epoch draws training audio per locale with probability p ∝ hours^alpha (XLS-R, MMS):
    1 = the data's own proportions; smaller values upsample small locales and downsample large
    ones (0.5 is common), the epoch's total hours unchanged. The run summary prints the shares."""
    max_hours_per_locale: float | None = None
    """Train on at most this many hours of each locale (null = all): whole speakers in a fixed
    order (by a hash of their id), clips of the next speakers where no whole one fits. The same
    selection every run. The paper's Common Voice setting caps each language at 10 h."""
    eval_max_utterances: int | None = None
    """Evaluate on at most this many clips of the eval split (a fixed, evenly spaced subset); null = all."""
    num_workers: int = 0
    """DataLoader worker processes that slice and pad batches; 0 = in the training process."""


@dataclass
class ModelConfig:
    """The Wav2Vec2ForCTC to fine-tune. Regularisation settings keep their Hugging Face names."""

    name_or_path: str | None = None
    """Pretrained checkpoint: a Hugging Face hub id (e.g. facebook/wav2vec2-large-xlsr-53) or a local
    directory with config.json + weights. Exactly one of name_or_path and config is set."""
    config: dict[str, Any] | str | None = None
    """Build a randomly initialised model instead: Wav2Vec2Config arguments as a mapping, or the path
    of a config.json. vocab_size and pad_token_id come from the prepared vocab.json."""
    feature_encoder_init: str = "random"
    """With model.config only: "random" (Hugging Face's initialisation) or "filterbank": a feature
    encoder of ONE convolution (kernel 400 = 25 ms, stride 320 = 20 ms) whose filters are Hann-windowed
    cosines and sines at mel-spaced frequencies, in + and - pairs. The feature encoder is frozen, so a
    random one stays random forever; a filterbank gives a from-scratch model spectral features and
    lets a tiny model leave the all-blank plateau in a few hundred steps instead of thousands."""
    reset_head: bool = False
    """Start a new CTC output layer even if the checkpoint has one (by default a CTC checkpoint keeps
    the output rows of the phones its vocab.json shares with the prepared vocabulary)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: "sdpa" (PyTorch scaled-dot-product attention) or "eager"."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in the backward pass (non-reentrant) to save memory."""
    mask_time_prob: float = 0.05
    """SpecAugment: fraction of frames that start a masked time span (fairseq mask_prob)."""
    mask_time_length: int = 10
    """SpecAugment: frames per masked time span (fairseq mask_length)."""
    mask_time_min_masks: int = 2
    """SpecAugment: minimum number of masked time spans per utterance."""
    mask_feature_prob: float = 0.0
    """SpecAugment: fraction of feature channels that start a masked span (fairseq mask_channel_prob)."""
    mask_feature_length: int = 10
    """SpecAugment: channels per masked feature span (fairseq mask_channel_length)."""
    mask_feature_min_masks: int = 0
    """SpecAugment: minimum number of masked feature spans."""
    layerdrop: float = 0.1
    """Probability of skipping a whole transformer layer in a training step."""
    hidden_dropout: float = 0.1
    """Dropout on transformer hidden states (fairseq dropout)."""
    activation_dropout: float = 0.1
    """Dropout inside the feed-forward blocks (fairseq activation_dropout)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (fairseq attention_dropout)."""
    feat_proj_dropout: float = 0.0
    """Dropout after the feature projection (fairseq dropout_input)."""
    final_dropout: float = 0.1
    """Dropout before the CTC output layer (fairseq final_dropout)."""
    ctc_loss_reduction: str = "sum"
    """"sum": summed CTC loss divided by the number of label tokens in the whole optimizer step
    (fairseq's sentence_avg=false). "mean": each utterance's loss divided by its label length,
    averaged over the utterances of the step."""
    ctc_zero_infinity: bool = True
    """Zero the loss of clips too short to align with their phones instead of poisoning the step."""
    adapter: Literal["lora"] | None = None
    """Train a LoRA adapter (peft) instead of the whole model: the model.name_or_path model is frozen
    but for its CTC output layer (extended by the prepared vocabulary's new phones, as always), and
    low-rank updates of the adapter_target_modules are learned. For adding a language to a trained
    model in a fraction of the steps. Checkpoints and exports hold the merged weights (plain
    transformers folders); the adapter's own tensors are kept in each checkpoint to resume."""
    adapter_rank: int = 8
    """LoRA rank r (peft's `r`)."""
    adapter_alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / rank) * B @ A (peft's `lora_alpha`)."""
    adapter_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_ADAPTER_TARGETS))
    """Linear layers that get a LoRA update, by the last part of their name in Wav2Vec2ForCTC."""


@dataclass
class TrainConfig:
    """Optimisation, batching, evaluation and checkpoint frequency."""

    seed: int = 0
    """Seed of model initialisation, masking, dropout and the data order."""
    max_steps: int = 20000
    """Optimizer steps to train for (fairseq max_update)."""
    batch_seconds: float = 80.0
    """Seconds of audio (padding included) per batch per process (fairseq max_tokens / 16000).
    N processes cut global batches of N × batch_seconds and split each among themselves, so they
    train like one process with N × batch_seconds (a share may hold one clip more than its budget)."""
    batch_seconds_by_width: dict[float, float] | None = None
    """Budgets by batch width instead of one: {width in seconds: batch_seconds for batches whose
    longest clip is at most that wide}, e.g. {4: 160, 8: 120, 16: 90}; wider batches get
    batch_seconds. Attention memory grows with the square of the width, so batches of short clips
    can hold more audio than batches of long ones in the same memory (NeMo's OOMptimizer idea).
    null = batch_seconds for every width."""
    grad_accum: int = 1
    """Batches accumulated into one optimizer step (fairseq update_freq)."""
    bucket_width: float = 0.5
    """Clips whose durations fall in the same bucket of this many seconds are shuffled together
    before batching: smaller = less padding, larger = more varied batches."""
    pad_to_multiple_of: int = 1
    """Pad each training batch to its longest clip rounded up to a multiple of this many samples
    (1 = no rounding). On a GPU, fewer distinct batch shapes let cuDNN and cuBLAS reuse the plans
    they build per shape: 1600 (0.1 s) costs ~1% padding (BENCHMARKS.md, GPU section)."""
    pad_clips_to_budget: bool = False
    """Pad each batch's clip count up to what batch_seconds holds at its width, with zero-weight
    copies of a clip: every batch of a width then has one shape, so a run has at most as many
    batch shapes as widths (the run summary says how many). On a GPU each new shape costs new
    kernel plans and memory; on a CPU the filler rows are only extra work."""
    longest_first: bool = True
    """Put each epoch's longest batch first, so that running out of memory happens in minute one."""
    lr: float = 5e-5
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value; 0 = no clipping (the norm is still logged)."""
    lr_schedule: str = "tri_stage"
    """"tri_stage" (linear warm-up, hold, exponential decay; fairseq's), "linear" or "cosine"
    (warm-up, hold, then linear / cosine decay to final_lr_scale)."""
    warmup_ratio: float = 0.1
    """Fraction of max_steps spent warming up from init_lr_scale × lr to lr."""
    hold_ratio: float = 0.4
    """Fraction of max_steps held at the peak lr; the rest decays."""
    init_lr_scale: float = 0.01
    """Learning rate at step 0, as a fraction of lr."""
    final_lr_scale: float = 0.05
    """Learning rate at the last step, as a fraction of lr."""
    freeze_finetune_updates: int = 0
    """Steps during which the whole transformer is frozen and only the CTC output layer trains.
    (The convolutional feature encoder is always frozen.)"""
    compile: bool | str = False
    """torch.compile the blocks of the forward pass (feature encoder, projection, each encoder
    layer, the head): false, true (= "default"), or a torch.compile mode:
    "reduce-overhead" (CUDA graphs: for bounded batch shapes, see pad_clips_to_budget; LayerDrop
    then runs every layer and discards a dropped one's output, ~layerdrop more compute) or
    "max-autotune". The first steps of each new shape compile."""
    mixed_precision: str = "no"
    """"no", "bf16" or "fp16" autocast, or "bf16-weights": the model in bf16 without autocast and
    the optimizer on fp32 master weights (fewer kernels per step; one process or DDP; see
    train/masters.py). The CTC loss and its log-softmax always run in fp32."""
    ctc_implementation: str = "pytorch"
    """The CTC loss: "pytorch" (torch.nn.functional.ctc_loss, which on a GPU waits for the device
    while it copies the lengths there) or "triton" (train/ctc_triton.py: two Triton kernels that
    read the lengths on the device, so the loss does not wait; needs the triton package, which
    CUDA builds of PyTorch install; on a CPU Triton's interpreter runs it, slowly). The same loss
    and gradient to float32 rounding. Not yet measured on a GPU."""
    max_consecutive_nonfinite: int = 20
    """Stop training after this many steps in a row with a NaN/inf gradient (each one is skipped);
    checked at each logging step (log.every_steps), when the step counts reach the host."""
    eval_steps: int = 1000
    """Evaluate on the eval split every this many steps (and at the end)."""
    eval_batch_seconds: float | None = None
    """Seconds of audio per evaluation batch per process; null = batch_seconds."""
    eval_num_examples: int = 4
    """Decoded predictions printed and logged next to their references at each evaluation."""
    save_steps: int = 1000
    """Write a checkpoint every this many steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept, newest first; the best by eval PER is kept as well."""


@dataclass
class RunConfig:
    """Where the run writes."""

    output_dir: str | None = None
    """Run directory: config.yaml, metrics.jsonl, checkpoints/. Required."""
    name: str | None = None
    """Run name shown by wandb / TensorBoard; null = the run directory's name."""


@dataclass
class LogConfig:
    """What is reported, where and how often."""

    every_steps: int = 10
    """Write a training line to metrics.jsonl every this many steps."""
    report_to: list[str] = field(default_factory=list)
    """Extra reporters besides metrics.jsonl: "wandb" (offline unless WANDB_MODE/a key says
    otherwise) and/or "tensorboard"."""
    wandb_project: str = "phonetune"
    """wandb project name."""
    progress_bar: bool = True
    """Show progress bars (training steps, dev evaluation) on the main process, when its standard
    error is a terminal (never in log files)."""


@dataclass
class Config:
    """A whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: str = "none"
    """"none": start fresh (refused if the run directory already holds checkpoints); "auto": continue
    from the newest complete checkpoint of the run directory, or start fresh if there is none; or the
    path of a checkpoint directory (…/checkpoints/step_<n>)."""


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "run": RunConfig,
    "log": LogConfig,
}
TOP_LEVEL_KEYS = (*SECTIONS, "resume")

# Training settings that ModelConfig carries with their Hugging Face names; they are applied on top
# of whatever the checkpoint or model.config says, so they must not be given in model.config too.
HF_TRAINING_SETTINGS = (
    "mask_time_prob",
    "mask_time_length",
    "mask_time_min_masks",
    "mask_feature_prob",
    "mask_feature_length",
    "mask_feature_min_masks",
    "layerdrop",
    "hidden_dropout",
    "activation_dropout",
    "attention_dropout",
    "feat_proj_dropout",
    "final_dropout",
    "ctc_loss_reduction",
    "ctc_zero_infinity",
)


# --- the recipes shipped with the package -------------------------------------------------------
def shipped_config(name: str) -> Path:
    """A file of the `configs` package (a checkout's configs/, or the installed package's)."""
    return Path(str(resources.files("phonetune.configs") / name))


def shipped_recipes() -> dict[str, str]:
    """Recipe name -> the first sentence of its leading comment, for every shipped YAML recipe."""
    recipes = {}
    for path in sorted(shipped_config(".").glob("*.yaml")):
        comment = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#") or line.strip() == "#":
                break
            comment.append(line.lstrip("# ").rstrip())
        text = " ".join(comment)
        recipes[path.stem] = text.split(". ")[0].rstrip(".:")
    return recipes


def resolve_config_path(path: str | Path) -> Path:
    """The config file `--config` names: the path as given when it exists, else a shipped recipe
    of that name (`tiny_cpu`, `tiny_cpu.yaml` or `configs/tiny_cpu.yaml`), so the recipes work
    from any folder and from an installed package; otherwise an error listing them."""
    path = Path(path)
    if path.exists():
        return path
    if path.parent in (Path("."), Path("configs")):
        shipped = shipped_config(path.name if path.suffix else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    raise PhonetuneError(
        f"config file {path} does not exist. Shipped recipes (give the name, e.g. --config "
        f"tiny_cpu): {', '.join(shipped_recipes())}"
    )


# --- loading ------------------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file (a path or a shipped recipe's name), apply `key=value` overrides,
    check everything; raise all errors at once."""
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        if path.is_dir():
            raise PhonetuneError(
                f"config file {path} is a folder: give one of its YAML recipes "
                f"(shipped: {', '.join(shipped_recipes())})"
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise PhonetuneError(
                f"config file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                f"offset {error.start}): give a YAML recipe"
            ) from None
        except OSError as error:
            raise PhonetuneError(f"cannot read config file {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise PhonetuneError(f"config file {path} is not valid YAML: {error}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise PhonetuneError(
                f"config file {path} must be a mapping of sections, not {type(loaded).__name__}"
            )
        raw = loaded
    errors: list[str] = []
    for override in overrides:
        apply_override(raw, override, errors)
    config = build_config(raw, errors)
    errors += find_contradictions(config)
    if errors:
        listing = "\n".join(f"  - {error}" for error in errors)
        raise PhonetuneError(f"invalid training configuration ({source}):\n{listing}")
    return config


# PyYAML (YAML 1.1) reads these as booleans; on a command line only true/false are.
_YAML11_BOOLEAN_WORDS = {"yes", "no", "on", "off"}


def apply_override(raw: dict[str, Any], override: str, errors: list[str]) -> None:
    """Set `a.b.c=value` in the raw mapping; the value is parsed as a YAML scalar/flow value."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        errors.append(
            f"override {override!r} is not of the form key=value (e.g. train.max_steps=100)"
        )
        return
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an unbalanced bracket in a path): take it as a string
    if text.strip().lower() in _YAML11_BOOLEAN_WORDS:
        value = text.strip()  # train.mixed_precision=no means the word, not false
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            errors.append(f"override {key}: {'.'.join(parts[: depth + 1])} is not a mapping")
            return
        node = child
    node[parts[-1]] = value


def build_config(raw: dict[str, Any], errors: list[str]) -> Config:
    """Turn the raw mapping into dataclasses, appending unknown-key and type errors to `errors`."""
    unknown = [key for key in raw if key not in TOP_LEVEL_KEYS]
    for key in unknown:
        errors.append(
            f"unknown key {key!r}{_did_you_mean(key, None)}; valid top-level keys: "
            f"{', '.join(TOP_LEVEL_KEYS)}"
        )
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            errors.append(f"{name} must be a mapping of keys, not {values!r}")
            values = {}
        sections[name] = _build_section(name, cls, values, errors)
    resume = raw.get("resume", "none")
    if resume is None:
        resume = "none"
    if not isinstance(resume, str):
        errors.append(f"resume must be 'none', 'auto' or a checkpoint path, not {resume!r}")
        resume = "none"
    return Config(**sections, resume=resume)


def _did_you_mean(key: str, section: str | None) -> str:
    """ " (did you mean X?)" for the nearest valid key: in the same place, else the same name or a
    near one in another section (train.layerdrop -> model.layerdrop), else nothing."""
    everywhere = {
        f"{name}.{field.name}": field.name
        for name, cls in SECTIONS.items()
        for field in dataclasses.fields(cls)
    }
    if section is None:
        here = list(TOP_LEVEL_KEYS)
    else:
        here = [f.name for f in dataclasses.fields(SECTIONS[section])]
    close = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0] if section is None else f'{section}.{close[0]}'}?)"
    elsewhere = [full for full, short in everywhere.items() if short == key] or [
        full
        for full in everywhere
        if difflib.get_close_matches(key, [everywhere[full]], n=1, cutoff=0.8)
    ]
    return f" (did you mean {elsewhere[0]}?)" if elsewhere else ""


def _build_section(name: str, cls: type, values: dict[str, Any], errors: list[str]) -> Any:
    hints = _type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    accepted = {}
    for key, value in values.items():
        if key not in hints:
            errors.append(
                f"unknown key {name}.{key}{_did_you_mean(key, name)}; valid keys in {name}: "
                f"{', '.join(valid)}"
            )
            continue
        if _accepts_float(hints[key]) and isinstance(value, str):
            value = _parse_float(value)  # PyYAML reads 1e-3 (no dot) as a string
        problem = _type_problem(value, hints[key])
        if problem:
            errors.append(f"{name}.{key} {problem} (got {value!r})")
            continue
        if _accepts_float(hints[key]) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        accepted[key] = value
    return cls(**accepted)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _accepts_float(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _type_problem(value: Any, hint: Any) -> str | None:
    """None if `value` fits the annotation `hint`, else what was expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if any(_type_problem(value, option) is None for option in options):
            return None
        return "must be " + " or ".join(_describe(option) for option in options)
    if hint is type(None):
        return None if value is None else "must be null"
    if origin is Literal:
        return None if value in typing.get_args(hint) else f"must be one of {typing.get_args(hint)}"
    if origin is list:
        if not isinstance(value, list):
            return f"must be {_describe(hint)}"
        (item_hint,) = typing.get_args(hint)
        if any(_type_problem(item, item_hint) for item in value):
            return f"must be {_describe(hint)}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else "must be a mapping"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return (
            None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
        )
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):  # YAML reads .nan and .inf; so does float("nan")
            return "must be a finite number"
        return None if ok else "must be a number"
    if hint is str:
        if isinstance(value, bool):  # `mixed_precision: no` in a YAML file
            return "must be a string (YAML reads an unquoted no/yes/on/off as false/true: quote it)"
        return None if isinstance(value, str) else "must be a string"
    return None if isinstance(value, hint) else f"must be {_describe(hint)}"


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }
    return names.get(hint, str(hint))


# --- contradictions -----------------------------------------------------------------------------
def find_contradictions(config: Config) -> list[str]:
    """Values that are each well-typed but cannot work (together); every problem, not the first."""
    return [
        *_data_and_run_problems(config),
        *_model_problems(config.model),
        *_train_problems(config.train, config.data),
        *_log_problems(config.log),
        *_precision_problems(config),
    ]


def _data_and_run_problems(config: Config) -> list[str]:
    errors: list[str] = []
    data = config.data

    if not data.prepared_dir:
        errors.append("data.prepared_dir is required (the output folder of `phonetune prepare`)")
    if not config.run.output_dir:
        errors.append("run.output_dir is required (where checkpoints and metrics.jsonl go)")
    else:
        from phonetune.train.run_dir import run_dir_problem

        problem = run_dir_problem(Path(config.run.output_dir).resolve())
        if problem:
            errors.append(problem)
    if data.max_duration <= 0:
        errors.append(f"data.max_duration must be positive, not {data.max_duration}")
    if not 0 < data.language_sampling_alpha <= 1:
        errors.append(
            f"data.language_sampling_alpha must be in (0, 1] (1 = proportional), not {data.language_sampling_alpha}"
        )
    if data.max_hours_per_locale is not None and not data.max_hours_per_locale > 0:
        errors.append(
            f"data.max_hours_per_locale must be positive (or null for all), not {data.max_hours_per_locale}"
        )
    if data.eval_max_utterances is not None and data.eval_max_utterances < 1:
        errors.append("data.eval_max_utterances must be at least 1 (or null for all)")
    if data.num_workers < 0:
        errors.append("data.num_workers must be 0 or more")
    if data.locales is not None and not data.locales:
        errors.append("data.locales is an empty list: give locales or null for all")

    return errors


def _model_problems(model: ModelConfig) -> list[str]:
    errors: list[str] = []
    if (model.name_or_path is None) == (model.config is None):
        errors.append(
            "set exactly one of model.name_or_path (a pretrained checkpoint) and model.config "
            "(a random initialisation); "
            + ("both are set" if model.name_or_path is not None else "neither is set")
        )
    if isinstance(model.config, dict):
        errors += _check_hf_config_keys(model.config)
    if model.feature_encoder_init not in ("random", "filterbank"):
        errors.append(
            "model.feature_encoder_init must be 'random' or 'filterbank', "
            f"not {model.feature_encoder_init!r}"
        )
    elif model.feature_encoder_init == "filterbank":
        errors += _check_filterbank_encoder(model)
    if model.attn_implementation not in ("sdpa", "eager"):
        errors.append(
            f"model.attn_implementation must be 'sdpa' or 'eager', not {model.attn_implementation!r}"
        )
    for key in (
        "mask_time_prob",
        "mask_feature_prob",
        "layerdrop",
        "hidden_dropout",
        "activation_dropout",
        "attention_dropout",
        "feat_proj_dropout",
        "final_dropout",
    ):
        value = getattr(model, key)
        if not 0.0 <= value < 1.0:
            errors.append(f"model.{key} must be in [0, 1), not {value}")
    for key in ("mask_time_length", "mask_feature_length"):
        if getattr(model, key) < 1:
            errors.append(f"model.{key} must be at least 1, not {getattr(model, key)}")
    if isinstance(model.config, dict) and model.mask_feature_prob > 0:
        hidden_size = model.config.get("hidden_size", 768)  # Wav2Vec2Config's default
        if isinstance(hidden_size, int) and model.mask_feature_length > hidden_size:
            errors.append(
                f"model.mask_feature_length ({model.mask_feature_length}) is longer than the "
                f"{hidden_size} feature channels it masks (model.config.hidden_size): lower it"
            )
    for key in ("mask_time_min_masks", "mask_feature_min_masks"):
        if getattr(model, key) < 0:
            errors.append(f"model.{key} must be 0 or more")
    errors += _adapter_problems(model)
    if model.ctc_loss_reduction not in CTC_REDUCTIONS:
        errors.append(
            f"model.ctc_loss_reduction must be one of {', '.join(CTC_REDUCTIONS)}, not {model.ctc_loss_reduction!r}"
        )

    return errors


def _adapter_problems(model: ModelConfig) -> list[str]:
    if model.adapter is None:
        return []
    errors = []
    if model.name_or_path is None:
        errors.append(
            "model.adapter trains on top of a trained model: set model.name_or_path to it (an "
            "earlier `phonetune export` folder or a hub id) instead of model.config"
        )
    if model.adapter_rank < 1:
        errors.append(f"model.adapter_rank must be at least 1, not {model.adapter_rank}")
    if not model.adapter_alpha > 0:
        errors.append(f"model.adapter_alpha must be positive, not {model.adapter_alpha}")
    if not model.adapter_target_modules:
        errors.append("model.adapter_target_modules is empty: name the linear layers to adapt")
    unknown = sorted(set(model.adapter_target_modules) - set(ADAPTABLE_MODULES))
    if unknown:
        errors.append(
            f"model.adapter_target_modules: {', '.join(unknown)} not a linear layer of the encoder; "
            f"choose among {', '.join(ADAPTABLE_MODULES)}"
        )
    return errors


def _train_problems(train: TrainConfig, data: DataConfig) -> list[str]:
    errors: list[str] = []
    for key in (
        "max_steps",
        "grad_accum",
        "eval_steps",
        "save_steps",
        "keep_last",
        "max_consecutive_nonfinite",
    ):
        if getattr(train, key) < 1:
            errors.append(f"train.{key} must be at least 1, not {getattr(train, key)}")
    for key in ("freeze_finetune_updates", "eval_num_examples"):
        if getattr(train, key) < 0:
            errors.append(f"train.{key} must be 0 or more")
    errors += _budget_table_problems(train.batch_seconds_by_width)
    if train.batch_seconds <= 0:
        errors.append(f"train.batch_seconds must be positive, not {train.batch_seconds}")
    elif train.batch_seconds < data.max_duration:
        errors.append(
            f"train.batch_seconds ({train.batch_seconds}) is smaller than data.max_duration "
            f"({data.max_duration}): the longest clips could never fit in a batch; raise the first "
            "or lower the second"
        )
    if train.eval_batch_seconds is not None and train.eval_batch_seconds <= 0:
        errors.append("train.eval_batch_seconds must be positive (or null = train.batch_seconds)")
    if train.bucket_width <= 0:
        errors.append("train.bucket_width must be positive")
    if train.pad_to_multiple_of < 1:
        errors.append(
            f"train.pad_to_multiple_of must be at least 1 (samples), not {train.pad_to_multiple_of}"
        )
    if train.lr <= 0:
        errors.append(f"train.lr must be positive, not {train.lr}")
    if len(train.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in train.betas):
        errors.append(f"train.betas must be two numbers in [0, 1), not {train.betas}")
    if train.eps <= 0:
        errors.append("train.eps must be positive")
    if train.weight_decay < 0:
        errors.append("train.weight_decay must be 0 or more")
    if train.max_grad_norm < 0:
        errors.append("train.max_grad_norm must be 0 (no clipping) or positive")
    if train.lr_schedule not in LR_SCHEDULES:
        errors.append(
            f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {train.lr_schedule!r}"
        )
    for key in ("warmup_ratio", "hold_ratio"):
        if not 0.0 <= getattr(train, key) <= 1.0:
            errors.append(f"train.{key} must be in [0, 1], not {getattr(train, key)}")
    if train.warmup_ratio + train.hold_ratio > 1.0 + 1e-9:
        errors.append(
            f"train.warmup_ratio + train.hold_ratio = {train.warmup_ratio + train.hold_ratio:g} exceeds 1: "
            "the warm-up and hold phases cannot be longer than the whole run"
        )
    for key in ("init_lr_scale", "final_lr_scale"):
        if not 0.0 < getattr(train, key) <= 1.0:
            errors.append(f"train.{key} must be in (0, 1], not {getattr(train, key)}")
    if isinstance(train.compile, str) and train.compile not in COMPILE_MODES:
        errors.append(
            f"train.compile must be true, false or one of {', '.join(COMPILE_MODES)}, "
            f"not {train.compile!r}"
        )
    if train.mixed_precision not in MIXED_PRECISION:
        errors.append(
            f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {train.mixed_precision!r}"
        )
    if train.ctc_implementation not in CTC_IMPLEMENTATIONS:
        errors.append(
            f"train.ctc_implementation must be one of {', '.join(CTC_IMPLEMENTATIONS)}, "
            f"not {train.ctc_implementation!r}"
        )

    return errors


def _budget_table_problems(table: dict | None) -> list[str]:
    if not table:
        return []

    def positive(value: object) -> bool:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value) and value > 0

    bad = [f"{w!r}: {s!r}" for w, s in table.items() if not (positive(w) and positive(s))]
    if bad:
        return [
            "train.batch_seconds_by_width maps widths in seconds to budgets in seconds, both "
            f"positive numbers; not {', '.join(bad)}"
        ]
    small = [f"{w:g}: {s:g}" for w, s in table.items() if s < w]
    if small:
        return [
            f"train.batch_seconds_by_width: a budget must hold one clip of its width ({', '.join(small)})"
        ]
    return []


def _precision_problems(config: Config) -> list[str]:
    """What bf16-weights cannot do (train/masters.py)."""
    if config.train.mixed_precision == "bf16-weights" and config.model.adapter is not None:
        return [
            "train.mixed_precision=bf16-weights does not train adapters (model.adapter); use bf16"
        ]
    return []


def _log_problems(log: LogConfig) -> list[str]:
    errors: list[str] = []
    if log.every_steps < 1:
        errors.append("log.every_steps must be at least 1")
    for reporter in log.report_to:
        if reporter not in REPORTERS:
            errors.append(
                f"log.report_to: unknown reporter {reporter!r}; choose from {', '.join(REPORTERS)}"
            )
    return errors


def _check_filterbank_encoder(model: ModelConfig) -> list[str]:
    if not isinstance(model.config, dict):
        return [
            "model.feature_encoder_init=filterbank needs model.config as a mapping (random init)"
        ]
    kernels = model.config.get("conv_kernel")
    strides = model.config.get("conv_stride")
    dims = model.config.get("conv_dim")
    if kernels != [400] or strides != [320] or not dims or len(dims) != 1 or dims[0] % 4:
        return [
            "model.feature_encoder_init=filterbank needs a one-layer feature encoder: "
            "model.config.conv_kernel=[400], conv_stride=[320] and conv_dim=[N] with N a multiple of 4 "
            f"(got conv_kernel={kernels}, conv_stride={strides}, conv_dim={dims})"
        ]
    return []


def _check_hf_config_keys(values: dict[str, Any]) -> list[str]:
    from transformers import Wav2Vec2Config

    errors = []
    known = set(Wav2Vec2Config().to_dict())
    for key in values:
        if key in HF_TRAINING_SETTINGS:
            errors.append(
                f"model.config.{key}: set model.{key} instead (training settings live in model)"
            )
        elif key not in known:
            errors.append(f"model.config.{key} is not a Wav2Vec2Config argument")
    return errors


# --- saving and comparing -----------------------------------------------------------------------
def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (what config.yaml holds)."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def write_config(config: Config, path: Path) -> None:
    path.write_text(dump_config(config), encoding="utf-8")


def config_differences(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two config dicts."""
    differences = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and dotted != "model.config":
            differences += config_differences(a, b, dotted + ".")
        elif a != b:
            differences.append((dotted, a, b))
    return differences
