"""Smaller ONNX models for CPU inference: `phonetune export --onnx --quantize int8` writes
`model.int8.onnx`, `--onnx-fp16` writes `model.fp16.onnx`, both made from the checked `model.onnx`.

int8 is ONNX Runtime's dynamic quantization (int8 weights, activations quantized per batch at run
time) of the MatMul nodes only: the transformer's linear layers and the CTC head, most of a large
model's compute. The convolutional feature encoder stays in float32: quantizing it too (ConvInteger)
raised the demo model's dev PER from 22.1 % to 28.4 % and made it slower on ONNX Runtime's CPU
kernels. fp16 is onnxruntime.transformers' float16 conversion with float32 inputs and outputs:
half the file, and ONNX Runtime's CPU provider runs it (casting where it has no fp16 kernel).

Quantization moves logits by design, so the parity check is not a logit tolerance but what users
see: the PER of the quantized model and of the float32 PyTorch model on the same real clips (the
first PARITY_CLIPS clips, at most PARITY_SECONDS of audio, of the dev split of the checkpoint's
prepared dataset), which may differ by at most PER_TOLERANCE. Without that dataset the check clips have no reference phones: the PER of
the quantized model's output against PyTorch's is reported instead, and nothing is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from phonetune.data.audio import SAMPLE_RATE
from phonetune.data.errors import PhonetuneError
from phonetune.data.per import score_predictions
from phonetune.data.prepared import batches_longest_first, open_prepared
from phonetune.infer.recognize import LoadedModel, load_model, recognize

QUANTIZED_FILES = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
PER_TOLERANCE = 0.005  # 0.5 points of PER, absolute
PARITY_CLIPS = 200
# Enough phones (thousands) to resolve a tenth of a PER point; for XLSR-53 on a CPU, running three
# models over 10 minutes of audio already takes minutes.
PARITY_SECONDS = 600.0
PARITY_BATCH_SECONDS = 60.0


def write_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's advice before quantizing: shape inference and graph optimisation first, so
    # that fused MatMuls are quantized as such. Its symbolic shape inference is skipped: ONNX's
    # own covers the dynamic batch and length.
    prepared = target.with_name(f".{target.name}.prepared")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(
            str(prepared), str(target), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8
        )
    finally:
        prepared.unlink(missing_ok=True)


def write_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


WRITERS = {"int8": write_int8, "fp16": write_fp16}


class OnnxCTC:
    """An ONNX Runtime session called like the PyTorch model (`model(**batch).logits`), so that
    recognition (infer/recognize.py) and evaluation run on it unchanged."""

    def __init__(self, path: Path, config: object, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [node.name for node in self.session.get_inputs()]
        self.config = config

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        feeds = {name: batch[name].numpy() for name in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feeds)[0]))


def load_onnx_model(export_dir: Path, file_name: str, threads: int | None = None) -> LoadedModel:
    """An export folder's vocabulary and configuration, with the ONNX file as the model."""
    loaded = load_model(Path(export_dir))
    path = Path(export_dir) / file_name
    if not path.is_file():
        raise PhonetuneError(f"{export_dir} has no {file_name}: export it with --onnx")
    loaded.model = OnnxCTC(path, loaded.model.config, threads)
    loaded.source = str(path)
    return loaded


@dataclass
class ParityClips:
    """Real clips for the parity check, with their reference phones where there are any."""

    waves: list[np.ndarray]
    references: list[str] | None
    source: str


def read_parity_clips(
    prepared_dir: Path | None, fallback: Sequence[np.ndarray], fallback_source: str
) -> ParityClips:
    """The first PARITY_CLIPS clips of the dev split (else test, else train) of `prepared_dir`;
    without one, `fallback` (the export's check clips) without references."""
    if prepared_dir is not None:
        from phonetune.data.prepared import PreparedSplit

        dataset = open_prepared(prepared_dir, "the checkpoint's data.prepared_dir")
        for split in ("dev", "test", "train"):
            if split in dataset and len(dataset[split]) > 0:
                clips = PreparedSplit(dataset[split])
                within = np.cumsum(clips.durations[:PARITY_CLIPS]) <= PARITY_SECONDS
                rows = list(range(max(1, int(within.sum()))))
                waves = [np.asarray(a, dtype=np.float32) / 32768.0 for a in clips.audio(rows)]
                return ParityClips(
                    waves,
                    clips.column("phones", rows),
                    f"{len(rows)} clips of the {split} split of {prepared_dir}",
                )
    return ParityClips(list(fallback), None, fallback_source)


def transcribe_clips(loaded: LoadedModel, waves: Sequence[np.ndarray]) -> list[str]:
    """Greedy phones of each clip, batched by duration as evaluation batches them."""
    phones = [""] * len(waves)
    seconds = [len(wave) / SAMPLE_RATE for wave in waves]
    for indices in batches_longest_first(seconds, PARITY_BATCH_SECONDS):
        for index, text in zip(
            indices.tolist(), recognize(loaded, [waves[i] for i in indices]), strict=True
        ):
            phones[index] = text
    return phones


@dataclass
class QuantizedCheck:
    """What the parity check of one quantized file measured (written into the model card)."""

    kind: str  # int8 or fp16
    file: str
    megabytes: float
    clips: str
    reference_per: float | None  # float32 PyTorch's PER, where the clips have references
    per: float | None
    disagreement: float  # PER of the quantized model's phones against PyTorch's

    def describe(self) -> str:
        size = f"`{self.file}` ({self.kind}, {self.megabytes:.1f} MB)"
        if self.per is None:
            return (
                f"{size}: on {self.clips} (no reference phones) its phones differ from PyTorch's "
                f"by a PER of {100 * self.disagreement:.2f} %."
            )
        return (
            f"{size}: PER {100 * self.per:.2f} % against {100 * self.reference_per:.2f} % for "
            f"PyTorch float32 on {self.clips} (tolerance {100 * PER_TOLERANCE:.1f} points); its "
            f"phones differ from PyTorch's by a PER of {100 * self.disagreement:.2f} %."
        )


def check_quantized(
    reference: LoadedModel, quantized: LoadedModel, clips: ParityClips, kind: str, path: Path
) -> QuantizedCheck:
    """PER of both models on the same clips; raises when the quantized one is worse by more than
    PER_TOLERANCE."""
    expected = transcribe_clips(reference, clips.waves)
    got = transcribe_clips(quantized, clips.waves)
    everywhere = ["all"] * len(got)
    disagreement = score_predictions(got, expected, everywhere)["overall"]["per"]
    reference_per = per = None
    if clips.references is not None:
        reference_per = score_predictions(expected, clips.references, everywhere)["overall"]["per"]
        per = score_predictions(got, clips.references, everywhere)["overall"]["per"]
    check = QuantizedCheck(
        kind, path.name, path.stat().st_size / 1e6, clips.source, reference_per, per, disagreement
    )
    if per is not None and not per - reference_per <= PER_TOLERANCE:
        raise PhonetuneError(
            f"{kind} check failed: {check.describe()} The {kind} model loses more than "
            f"{100 * PER_TOLERANCE:.1f} points of PER: use model.onnx (export without "
            f"{'--quantize int8' if kind == 'int8' else '--onnx-fp16'}); nothing was written"
        )
    return check


def write_quantized(
    folder: Path,
    kinds: Sequence[str],
    prepared_dir: Path | None,
    fallback: Sequence[np.ndarray],
    fallback_source: str,
) -> list[QuantizedCheck]:
    """Write and check each of `kinds` (int8, fp16) next to `folder`'s checked model.onnx."""
    if not kinds:
        return []
    clips = read_parity_clips(prepared_dir, fallback, fallback_source)
    reference = load_model(folder)
    checks = []
    for kind in kinds:
        path = folder / QUANTIZED_FILES[kind]
        WRITERS[kind](folder / "model.onnx", path)
        checks.append(
            check_quantized(reference, load_onnx_model(folder, path.name), clips, kind, path)
        )
    return checks
