"""Decode any clip once: MP3, WAV, FLAC or OGG at any rate, mixed to mono, resampled to 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16_000

# wav2vec 2.0's feature encoder (kernel, stride) per convolution: 400-sample receptive field,
# 320-sample hop, so about 50 CTC output frames per second of 16 kHz audio.
_CONV_LAYERS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))

# Peak below which a clip is treated as silence (about -80 dBFS): nothing for CTC to align.
SILENCE_PEAK = 1e-4
# A file decoding to less than this fraction of the length its header announces is truncated.
TRUNCATED_FRACTION = 0.95


class AudioError(Exception):
    """A clip that cannot be used; `reason` is the short code written to prep_report.json."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return the clip at `path` as float32 mono samples at `sample_rate`.

    Raises AudioError with reason 'unreadable_audio' (cannot be decoded), 'empty_audio' (no
    samples), 'truncated_audio' (fewer samples than its header announces) or 'non_finite_audio'
    (NaN or infinite samples, which float WAVs can hold).
    """
    name = Path(path).name
    try:
        with soundfile.SoundFile(str(path)) as handle:
            source_rate, announced = handle.samplerate, handle.frames
            samples = handle.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        raise AudioError("unreadable_audio", f"{name}: {error}") from None
    if samples.shape[0] == 0:
        raise AudioError("empty_audio", f"{name} holds no samples")
    if _is_truncated(samples.shape[0], announced):
        raise AudioError(
            "truncated_audio",
            f"{name}: decoded {samples.shape[0] / source_rate:.2f} s of the "
            f"{announced / source_rate:.2f} s its header announces",
        )
    if not np.isfinite(samples).all():
        raise AudioError("non_finite_audio", f"{name} holds NaN or infinite samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != sample_rate:
        # soxr's "HQ" is a 20-bit-quality band-limited resampler (fast and transparent for speech).
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _is_truncated(decoded: int, announced: int) -> bool:
    """True when a file decodes to clearly fewer samples than its header announces.

    A download cut short still decodes, to its first part only; kept, that part would be labelled
    with the whole sentence. MP3s with a Xing/LAME header (what LAME and ffmpeg write) and FLACs
    record their length, and then decode to exactly that many samples. Files without a recorded
    length report an estimate: the 5 % margin keeps estimates from rejecting whole files.
    """
    if announced <= 0 or announced >= 2**62:  # unknown length (libsndfile's SF_COUNT_MAX)
        return False
    return decoded < TRUNCATED_FRACTION * announced


def is_silent(samples: np.ndarray) -> bool:
    """No sound above about -80 dBFS once any DC offset is removed: nothing for CTC to align.

    (A constant offset alone would pass a plain peak test and normalise to all zeros.)
    """
    if len(samples) == 0:
        return True
    return float(np.abs(samples - samples.mean()).max()) < SILENCE_PEAK


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 PCM (clipped: decoded MP3s can overshoot slightly)."""
    return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).round().astype(np.int16)


def count_ctc_frames(num_samples: int) -> int:
    """CTC output frames wav2vec 2.0's feature encoder produces for `num_samples` at 16 kHz."""
    length = num_samples
    for kernel, stride in _CONV_LAYERS:
        if length < kernel:
            return 0
        length = (length - kernel) // stride + 1
    return length


def count_ctc_minimum(phones: list[str]) -> int:
    """Fewest CTC frames that can carry `phones`: one per phone plus a blank between repeats."""
    repeats = sum(
        1 for previous, current in zip(phones, phones[1:], strict=False) if previous == current
    )
    return len(phones) + repeats
