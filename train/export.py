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

Nothing is trusted because it loads: the folder is reloaded through the model card's own code and its
logits are compared with the checkpoint's on real audio (weight-norm parameters changed names across
transformers versions, and a silently re-initialised layer still loads). The folder is written
under a temporary name and only moved into place once every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from data.errors import PhonetuneError
from train.checkpoint import (
    BEST_FILE,
    CHECKPOINTS_DIR,
    STATE_FILE,
    checkpoints_dir,
    find_best_checkpoint,
    is_complete,
    list_checkpoints,
    read_state,
)

if TYPE_CHECKING:  # transformers is imported where it is used: `phonetune --help` stays instant
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Processor

SAMPLE_RATE = 16_000
BLANK_TOKEN = "<pad>"
SPECIAL_TOKENS_MAP = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
}
# Reloading the same float32 weights must reproduce the logits up to float noise; anything larger
# means a weight was lost or renamed on the way.
LOGITS_TOLERANCE = 1e-4
# ONNX Runtime fuses and reorders float32 operations, so logits differ by float noise that grows with
# depth: measured 4e-7 for a 2-layer model and 5e-6 for the 24-layer XLSR-53 architecture (random
# weights, whose logits are small; trained ones are larger). Real export errors move logits by whole
# units, so 1e-3 separates the two with room to spare.
ONNX_TOLERANCE = 1e-3
ONNX_OPSET = 17
# Longest stretch of each reference clip the checks run on: enough to exercise the
# positional convolution and attention, short enough to keep a large model's export quick on a CPU.
CHECK_CLIP_SECONDS = 8.0
CHECK_CLIPS = 3
# Files an export folder may hold: --overwrite only ever replaces a folder made of these.
EXPORT_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "vocab.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "README.md",
        "model.onnx",
        "model.onnx.data",
        "generation_config.json",
    }
)
_STEP_DIR = re.compile(r"^step_(\d+)$")


# --- which checkpoint -------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """One complete `checkpoints/step_<n>/` folder written by `phonetune train`."""

    path: Path
    step: int
    state: dict

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def vocab_path(self) -> Path:
        return self.path / "vocab.json"

    @property
    def run_dir(self) -> Path | None:
        """The run folder holding `checkpoints/` (None for a step folder copied elsewhere)."""
        parent = self.path.parent
        return parent.parent if parent.name == CHECKPOINTS_DIR else None


def find_checkpoint(source: Path, *, best: bool = False, step: int | None = None) -> Checkpoint:
    """Resolve RUN_DIR (newest, best or a given step) or a step folder to one complete checkpoint.

    Completeness is train.checkpoint's rule: `step_<n>.tmp` folders and folders without state.json
    are interrupted saves and never used.
    """
    source = Path(source)
    if not source.exists():
        raise PhonetuneError(f"{source} does not exist: give a run folder or a checkpoint folder")
    if best and step is not None:
        raise PhonetuneError(
            "--best and --step choose the checkpoint in two ways: give one of them"
        )
    if source.name.startswith("step_") or (source / STATE_FILE).is_file():
        if not is_complete(source):
            raise PhonetuneError(
                f"{source} is not a complete checkpoint: a save that finished is a folder named "
                f"step_<n> holding {STATE_FILE} (an interrupted one is step_<n>.tmp or lacks it)"
            )
        if best or step is not None:
            raise PhonetuneError(
                f"{source} is one checkpoint; --best and --step choose among a run's checkpoints: "
                f"give the run folder ({source.parent.parent}) instead"
            )
        return _read_checkpoint(source)

    run_dir = source.parent if source.name == CHECKPOINTS_DIR else source
    available = dict(list_checkpoints(run_dir))
    if not available:
        root = checkpoints_dir(run_dir)
        incomplete = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        hint = f" (only interrupted saves: {', '.join(incomplete)})" if incomplete else ""
        raise PhonetuneError(
            f"no complete checkpoint in {source}{hint}: expected {root}/step_<n>/ folders "
            "written by `phonetune train`"
        )
    steps = ", ".join(str(s) for s in sorted(available))
    if step is not None:
        if step not in available:
            raise PhonetuneError(
                f"{run_dir} has no complete checkpoint for step {step}; available steps: {steps}"
            )
        return _read_checkpoint(available[step])
    if best:
        chosen = find_best_checkpoint(run_dir)
        if chosen is None:
            best_file = checkpoints_dir(run_dir) / BEST_FILE
            reason = (
                f"{best_file} names a checkpoint that is not complete any more"
                if best_file.is_file()
                else f"{best_file} does not exist (the run never evaluated on a dev set)"
            )
            raise PhonetuneError(
                f"--best: {reason}; available steps: {steps} (choose one with --step)"
            )
        return _read_checkpoint(chosen)
    return _read_checkpoint(available[max(available)])


def _read_checkpoint(path: Path) -> Checkpoint:
    for needed in (path / "vocab.json", path / "model" / "config.json"):
        if not needed.is_file():
            raise PhonetuneError(
                f"checkpoint {path} has no {needed.relative_to(path)}: it cannot be exported"
            )
    try:
        state = read_state(path)
    except json.JSONDecodeError as error:
        raise PhonetuneError(f"{path / STATE_FILE} is not valid JSON ({error})") from None
    match = _STEP_DIR.match(path.name)
    step = int(state.get("step", match.group(1) if match else 0))
    return Checkpoint(path=path, step=step, state=state)


def read_vocab(path: Path) -> dict[str, int]:
    """token -> id, checked: <pad> must be id 0 because it is the CTC blank the model was trained with."""
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise PhonetuneError(f"cannot read the vocabulary {path}: {error}") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise PhonetuneError(f"{path}: expected a flat JSON object token -> id")
    if vocab.get(BLANK_TOKEN) != 0:
        raise PhonetuneError(
            f"{path}: {BLANK_TOKEN} must have id 0 (the CTC blank), got {vocab.get(BLANK_TOKEN)}"
        )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise PhonetuneError(f"{path}: ids must run from 0 to {len(vocab) - 1} without gaps")
    return vocab


def load_ctc_model(model_dir: Path, *, safetensors_only: bool = False) -> Wav2Vec2ForCTC:
    """Load a Wav2Vec2ForCTC in float32, eval mode, failing on any weight that was not in the files.

    `safetensors_only` for folders phonetune wrote (checkpoints): any other weights file there
    is foreign and never read. Elsewhere a pytorch_model.bin is read with weights_only=True.
    """
    from train.model import load_pretrained

    model, info = load_pretrained(
        str(model_dir),
        dtype=torch.float32,
        output_loading_info=True,
        use_safetensors=True if safetensors_only else None,
    )
    missing = list(info.get("missing_keys", []))
    if missing:
        raise PhonetuneError(
            f"{model_dir}: weights missing from the saved model (they would be random): "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return model.eval()


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


# --- audio the checks run on ------------------------------------------------------------------
def load_check_audio(
    checkpoint: Checkpoint, audio: Path | None = None
) -> tuple[list[np.ndarray], str]:
    """Real speech for the parity checks: --audio, else clips of the training data, else espeak-ng."""
    if audio is not None:
        from data.audio import AudioError, load_audio

        try:
            wave = load_audio(audio)
        except AudioError as error:
            raise PhonetuneError(f"--audio {audio}: {error}") from None
        return split_for_check([wave]), str(audio)
    prepared = find_prepared_dir(checkpoint)
    if prepared is not None:
        clips = read_prepared_clips(prepared)
        if clips:
            return clips, f"{len(clips)} clips of {prepared}"
    return synthesize_check_audio(), "speech synthesised by espeak-ng"


def split_for_check(waves: list[np.ndarray]) -> list[np.ndarray]:
    """Cut long recordings so a large model's check stays quick; keep two lengths to exercise padding."""
    limit = int(CHECK_CLIP_SECONDS * SAMPLE_RATE)
    clips = [wave[:limit] for wave in waves]
    if len(clips) == 1 and len(clips[0]) > SAMPLE_RATE:
        clips.append(clips[0][: len(clips[0]) * 2 // 3])
    return clips


def speak_sentences(sentences: Sequence[str], voice: str = "en-us") -> list[np.ndarray]:
    """`sentences` spoken by espeak-ng, as float32 16 kHz waveforms (run in a child process)."""
    import soxr

    from data.espeak import Synthesizer, synthesis_voice

    synth = Synthesizer()
    name = synthesis_voice(voice)
    return [
        soxr.resample(synth.speak(text, name), synth.sample_rate, SAMPLE_RATE).astype(np.float32)
        for text in sentences
    ]


def read_training_config(checkpoint: Checkpoint) -> dict:
    for path in (
        checkpoint.path / "config.yaml",
        (checkpoint.run_dir or checkpoint.path) / "config.yaml",
    ):
        if path.is_file():
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                return loaded
    return {}


def find_prepared_dir(checkpoint: Checkpoint) -> Path | None:
    """The prepared dataset the checkpoint was trained on, if it is still where the config says."""
    data = read_training_config(checkpoint).get("data") or {}
    configured = data.get("prepared_dir") if isinstance(data, dict) else None
    if not configured:
        return None
    candidates = [Path(configured)]
    if checkpoint.run_dir is not None and not Path(configured).is_absolute():
        candidates.append(checkpoint.run_dir / configured)
    return next((c for c in candidates if (c / "dataset_dict.json").is_file()), None)


def read_prepared_clips(prepared_dir: Path, count: int = CHECK_CLIPS) -> list[np.ndarray]:
    """A few clips of distinct lengths from dev (or test, or train), as float32 16 kHz samples."""
    import datasets

    dataset = datasets.load_from_disk(str(prepared_dir))
    for split in ("dev", "test", "train"):
        if split in dataset and len(dataset[split]) > 0:
            rows = dataset[split].select(range(min(count, len(dataset[split]))))
            return split_for_check(
                [np.asarray(a, dtype=np.float32) / 32768.0 for a in rows["audio"]]
            )
    return []


CHECK_SENTENCES = ("the quick brown fox jumps over the lazy dog", "she sells sea shells")


def synthesize_check_audio() -> list[np.ndarray]:
    """Speech from espeak-ng (no data needed); a voiced, amplitude-modulated tone if that fails.

    espeak-ng holds one synthesis callback per process: a second Synthesizer in a process that
    already has one (the demo, a test session) would leave the first calling a freed callback and
    crash. So the speech is made in a child process of its own.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(speak_sentences, CHECK_SENTENCES).result()
    except (OSError, RuntimeError, ValueError):
        # No usable espeak-ng library: a speech-like signal still exercises the whole model.
        time = np.arange(int(2.5 * SAMPLE_RATE)) / SAMPLE_RATE
        pitch = 120 * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * time))
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8)) * (
            0.5 + 0.5 * np.sin(2 * np.pi * 3 * time)
        )
        wave = (0.1 * voiced).astype(np.float32)
        return [wave, wave[: len(wave) // 2]]


# --- the checks -------------------------------------------------------------------------------
@dataclass
class ExportCheck:
    """What the reload and ONNX checks measured (written into the model card)."""

    audio: str
    clips: int
    seconds: float
    max_abs_diff: float
    onnx_max_abs_diff: float | None = None
    onnx_argmax_agreement: float | None = None
    sample_transcription: str = ""
    notes: list[str] = field(default_factory=list)


def check_reload(
    checkpoint_model: Wav2Vec2ForCTC,
    export_dir: Path,
    clips: list[np.ndarray],
    id_to_token: dict[int, str],
) -> tuple[float, str]:
    """Run the model card's code on the folder and compare with the checkpoint fed as in training.

    Returns the largest logit difference and the first clip's transcription; raises on a mismatch.
    """
    from transformers import Wav2Vec2Processor

    from train.evaluate import normalize_batch
    from train.per import SPECIAL_TOKENS, greedy_decode

    processor = Wav2Vec2Processor.from_pretrained(str(export_dir))
    # from_pretrained as in the model card, plus a check that no weight was left out
    exported = load_ctc_model(export_dir)
    uses_mask = checkpoint_model.config.feat_extract_norm == "layer"
    worst = 0.0
    first_transcription = ""
    # One clip at a time, exactly as the model card does (group-normalised models take no mask,
    # so batching them changes the result for both models alike and proves nothing more).
    for index, clip in enumerate(clips):
        input_values = processor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        with torch.inference_mode():
            export_logits = exported(input_values).logits
            batch = normalize_batch([clip], uses_mask)
            reference = checkpoint_model(**batch).logits
        if export_logits.shape != reference.shape:
            raise PhonetuneError(
                f"export check failed: the exported model gives logits of shape {tuple(export_logits.shape)}, "
                f"the checkpoint {tuple(reference.shape)}"
            )
        diff = float((export_logits - reference).abs().max())
        worst = max(worst, diff)
        if not diff <= LOGITS_TOLERANCE:
            raise PhonetuneError(
                f"export check failed: reloaded logits differ from the checkpoint's by {diff:.3g} "
                f"(tolerance {LOGITS_TOLERANCE:g}) on clip {index}: weights or preprocessing were not "
                "carried over faithfully (a renamed weight loads as random); nothing was written"
            )
        ids = torch.argmax(export_logits, dim=-1)
        decoded = processor.batch_decode(ids)[0]
        # The tokenizer keeps <s>, </s>, <unk> as the released one does; training's decoder drops them.
        phones = " ".join(p for p in decoded.split(" ") if p not in SPECIAL_TOKENS)
        expected = greedy_decode(ids[0].tolist(), id_to_token)
        if phones != expected or "  " in decoded:
            raise PhonetuneError(
                f"export check failed: the exported tokenizer decodes clip {index} as {decoded!r}, "
                f"training's greedy decoding gives {expected!r}"
            )
        if index == 0:
            first_transcription = decoded
    return worst, first_transcription


class _LogitsOnly(torch.nn.Module):
    """ONNX graphs take and return plain tensors: unwrap the model's output object."""

    def __init__(self, model: torch.nn.Module, uses_attention_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.uses_attention_mask = uses_attention_mask

    def forward(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.uses_attention_mask:
            return self.model(input_values, attention_mask=attention_mask).logits
        return self.model(input_values).logits


def export_onnx(model: Wav2Vec2ForCTC, path: Path, uses_attention_mask: bool) -> None:
    """Write `model.onnx`: inputs input_values (+ attention_mask), output logits; batch and length dynamic."""
    from train.evaluate import normalize_batch

    wrapper = _LogitsOnly(model, uses_attention_mask).eval()
    # Two clips of different lengths, so the traced graph sees real padding.
    example = normalize_batch(
        [
            np.random.default_rng(0).standard_normal(n).astype(np.float32)
            for n in (SAMPLE_RATE, SAMPLE_RATE // 2)
        ],
        uses_attention_mask,
    )
    names = ["input_values"] + (["attention_mask"] if uses_attention_mask else [])
    axes = {name: {0: "batch", 1: "samples"} for name in names}
    axes["logits"] = {0: "batch", 1: "frames"}
    with warnings.catch_warnings():
        # The tracer warns about Python-side shape branches; check_onnx verifies the graph on other
        # batch sizes and lengths, which is what those warnings are about.
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter needs no onnxscript and handles wav2vec2's dynamic lengths.
        torch.onnx.export(
            wrapper,
            tuple(example[name] for name in names),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
        )
    model.eval()  # the exporter restores the wrapper's mode; make sure no dropout is left on


def check_onnx(path: Path, model: Wav2Vec2ForCTC, clips: list[np.ndarray]) -> tuple[float, float]:
    """Compare ONNX Runtime with PyTorch on one padded batch of real clips (dynamic batch and length).

    Returns (largest logit difference over real frames, argmax agreement); raises above ONNX_TOLERANCE.
    """
    import onnxruntime

    from train.evaluate import count_output_frames, normalize_batch

    uses_mask = model.config.feat_extract_norm == "layer"
    # Group-normalised models take no mask: padding would change their output, so run them one by one.
    batches = [clips] if uses_mask else [[clip] for clip in clips]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, agree, frames = 0.0, 0, 0
    for batch_clips in batches:
        batch = normalize_batch(batch_clips, uses_mask)
        with torch.inference_mode():
            reference = model(**batch).logits.numpy()
        result = session.run(["logits"], {name: tensor.numpy() for name, tensor in batch.items()})[
            0
        ]
        if result.shape != reference.shape:
            raise PhonetuneError(
                f"ONNX check failed: logits of shape {result.shape}, PyTorch gives {reference.shape}"
            )
        for row, clip in enumerate(batch_clips):
            valid = count_output_frames(model, len(clip))
            diff = np.abs(result[row, :valid] - reference[row, :valid])
            worst = max(worst, float(diff.max()))
            agree += int(
                (result[row, :valid].argmax(-1) == reference[row, :valid].argmax(-1)).sum()
            )
            frames += valid
    if not worst <= ONNX_TOLERANCE:
        raise PhonetuneError(
            f"ONNX check failed: ONNX Runtime logits differ from PyTorch by {worst:.3g} "
            f"(tolerance {ONNX_TOLERANCE:g}); the graph does not compute the model faithfully"
        )
    return worst, agree / max(frames, 1)


# --- the model card ---------------------------------------------------------------------------
def read_prep_report(prepared_dir: Path | None) -> dict:
    if prepared_dir is None or not (prepared_dir / "prep_report.json").is_file():
        return {}
    try:
        return json.loads((prepared_dir / "prep_report.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def train_hours_per_locale(report: dict) -> dict[str, float]:
    """Hours of kept training audio per locale, from prep_report.json (its format still moves: read gently)."""
    hours = {}
    for locale, entry in (report.get("per_locale") or {}).items():
        if not isinstance(entry, dict):
            continue
        train = (entry.get("splits") or {}).get("train")
        if isinstance(train, dict) and "hours" in train:
            hours[locale] = float(train["hours"])
        elif "hours" in entry:
            hours[locale] = float(entry["hours"])
    return hours


def read_training_dev_per(checkpoint: Checkpoint) -> tuple[float | None, dict[str, float]]:
    """Dev PER training measured at this step: overall from state.json, per locale from metrics.jsonl."""
    overall = checkpoint.state.get("eval_per")
    per_locale: dict[str, float] = {}
    metrics = (checkpoint.run_dir / "metrics.jsonl") if checkpoint.run_dir else None
    if metrics is None or not metrics.is_file():
        return overall, per_locale
    for line in metrics.read_text(encoding="utf-8").splitlines():
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
        try:
            metrics = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise PhonetuneError(
                f"--metrics {path}: cannot read evaluate's JSON ({error})"
            ) from None
        if "overall" not in metrics or "per_locale" not in metrics:
            raise PhonetuneError(
                f"--metrics {path}: not `phonetune evaluate` output (no overall / per_locale)"
            )
        by_split[str(metrics.get("split", "test"))] = metrics
    return by_split


def find_metrics_files(checkpoint: Checkpoint) -> list[Path]:
    """Results `phonetune evaluate` left next to the checkpoint (eval_<split>.json)."""
    return sorted(checkpoint.path.glob("eval_*.json"))


def _format_per(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.2f} %"


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

    prepared = find_prepared_dir(checkpoint)
    report = read_prep_report(prepared)
    training_config = read_training_config(checkpoint)
    hours = train_hours_per_locale(report)
    dev_overall, dev_locale = read_training_dev_per(checkpoint)
    if "dev" in metrics:  # a full evaluate run beats the dev PER logged during training
        dev_overall = metrics["dev"]["overall"]["per"]
        dev_locale = {loc: m["per"] for loc, m in metrics["dev"]["per_locale"].items()}
    test = metrics.get("test")
    locales = sorted(set(hours) | set(dev_locale) | set(test["per_locale"] if test else {}))
    data_versions = report.get("versions") or {}
    train_versions = checkpoint.state.get("versions") or {}
    settings = report.get("settings") or {}
    voices = ", ".join(
        f"{locale} -> {entry['espeak_language']}"
        for locale, entry in (report.get("per_locale") or {}).items()
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
        f"| export | | | {transformers.__version__} | {torch.__version__} | {_phonetune_version()} |",
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
    return "\n".join(lines) + "\n"


def _phonetune_version() -> str:
    from data import __version__

    return __version__


# --- the whole export -------------------------------------------------------------------------
def export_model(
    source: Path,
    out: Path,
    *,
    onnx: bool = False,
    best: bool = False,
    step: int | None = None,
    overwrite: bool = False,
    audio: Path | None = None,
    metrics: Sequence[Path] = (),
    evaluate_splits: Sequence[str] = (),
    verbose: bool = True,
) -> Path:
    """Export a checkpoint of `source` (a run folder or a step folder) to `out`; returns `out`.

    `audio` replaces the clips the checks run on; `metrics` are `phonetune evaluate` JSON files for
    the model card (eval_<split>.json next to the checkpoint are picked up too); `evaluate_splits`
    evaluates the export on those splits of the training data first and puts the results in the card.
    """
    say = print if verbose else (lambda *_args, **_kwargs: None)
    out = Path(out)
    checkpoint = find_checkpoint(Path(source), best=best, step=step)
    check_out_dir(out, overwrite, protected=[checkpoint.path])
    say(f"exporting {checkpoint.path} (step {checkpoint.step}) -> {out}")

    vocab = read_vocab(checkpoint.vocab_path)
    model = load_ctc_model(checkpoint.model_dir, safetensors_only=True)
    if model.config.vocab_size != len(vocab) or model.config.pad_token_id != 0:
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
            exported = load_ctc_model(staging)
            export_onnx(exported, staging / "model.onnx", uses_mask)
            check.onnx_max_abs_diff, check.onnx_argmax_agreement = check_onnx(
                staging / "model.onnx", exported, clips
            )
            say(
                f"ONNX check: ONNX Runtime vs PyTorch max |logit difference| {check.onnx_max_abs_diff:.2g} "
                f"(tolerance {ONNX_TOLERANCE:g}), argmax agreement {100 * check.onnx_argmax_agreement:.2f} %"
            )
        metrics_by_split = read_metrics_files(list(find_metrics_files(checkpoint)) + list(metrics))
        metrics_by_split.update(evaluate_export(staging, checkpoint, evaluate_splits, say))
        card = render_model_card(checkpoint, model.config, out.name, check, metrics_by_split)
        (staging / "README.md").write_text(card, encoding="utf-8")
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"sample transcription: {sample[:100]!r}{' ...' if len(sample) > 100 else ''}")
    summarize_folder(out, say)
    return out


def evaluate_export(
    staging: Path, checkpoint: Checkpoint, splits: Sequence[str], say: Callable[..., None]
) -> dict[str, dict]:
    """PER of the exported folder on the training data's splits (for the model card)."""
    if not splits:
        return {}
    prepared = find_prepared_dir(checkpoint)
    if prepared is None:
        raise PhonetuneError(
            "--evaluate needs the prepared dataset named in the checkpoint's config.yaml (data.prepared_dir), "
            "which was not found; run `phonetune evaluate` separately and pass --metrics"
        )
    from train.evaluate import evaluate_model

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
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--best",
        action="store_true",
        help="export the checkpoint with the lowest dev PER (checkpoints/best.json)",
    )
    which.add_argument(
        "--step", type=int, default=None, help="export the checkpoint of this training step"
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx (dynamic batch and length), checked with ONNX Runtime",
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
    parser.add_argument(
        "--evaluate",
        nargs="+",
        default=[],
        metavar="SPLIT",
        help="evaluate the export on these splits of the training data for the model card, e.g. dev test",
    )


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    export_model(
        args.source,
        args.out,
        onnx=args.onnx,
        best=args.best,
        step=args.step,
        overwrite=args.overwrite,
        audio=args.audio,
        metrics=args.metrics,
        evaluate_splits=args.evaluate,
    )
    return 0
