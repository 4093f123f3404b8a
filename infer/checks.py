"""What `phonetune export` checks before it keeps a folder: the model card's own loading code on
the folder gives the checkpoint's logits on real audio (weight-norm parameters changed names across
transformers versions, and a silently re-initialised layer still loads), its tokenizer decodes as
training does, and ONNX Runtime computes what PyTorch does. The audio: --audio, clips of the
training data, or espeak-ng speech."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from phonetune.data.audio import SAMPLE_RATE
from phonetune.data.ctc import conv_layers, count_frames, greedy_decode
from phonetune.data.errors import PhonetuneError
from phonetune.data.prepared import PreparedSplit, open_prepared
from phonetune.data.vocab import SPECIAL_TOKENS
from phonetune.infer.recognize import normalize_batch
from phonetune.train.checkpoint import Checkpoint, load_model_folder

if TYPE_CHECKING:
    from transformers import Wav2Vec2ForCTC

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


# --- audio the checks run on ------------------------------------------------------------------
def load_check_audio(
    checkpoint: Checkpoint, audio: Path | None = None
) -> tuple[list[np.ndarray], str]:
    """Real speech for the parity checks: --audio, else clips of the training data, else espeak-ng."""
    if audio is not None:
        from phonetune.data.audio import AudioError, load_audio

        try:
            wave = load_audio(audio)
        except AudioError as error:
            raise PhonetuneError(f"--audio {audio}: {error}") from None
        return split_for_check([wave]), str(audio)
    prepared = checkpoint.prepared_dir()
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

    from phonetune.data.espeak import Synthesizer, synthesis_voice

    synth = Synthesizer()
    name = synthesis_voice(voice)
    return [
        soxr.resample(synth.speak(text, name), synth.sample_rate, SAMPLE_RATE).astype(np.float32)
        for text in sentences
    ]


def read_prepared_clips(prepared_dir: Path, count: int = CHECK_CLIPS) -> list[np.ndarray]:
    """The first clips of dev (or test, or train), as float32 16 kHz samples."""
    dataset = open_prepared(prepared_dir, "the checkpoint's data.prepared_dir")
    for split in ("dev", "test", "train"):
        if split in dataset and len(dataset[split]) > 0:
            audio = PreparedSplit(dataset[split]).audio(range(min(count, len(dataset[split]))))
            return split_for_check([np.asarray(a, dtype=np.float32) / 32768.0 for a in audio])
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
    quantized: list = field(default_factory=list)  # infer.quantize.QuantizedCheck, one per file


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

    processor = Wav2Vec2Processor.from_pretrained(str(export_dir))
    # from_pretrained as in the model card, plus a check that no weight was left out
    exported = load_model_folder(export_dir)
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
            valid = count_frames(len(clip), conv_layers(model.config))
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
