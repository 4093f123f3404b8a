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


class AudioError(Exception):
    """A clip that cannot be used; `reason` is the short code written to prep_report.json."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return the clip at `path` as float32 mono samples at `sample_rate`.

    Raises AudioError('unreadable_audio' | 'empty_audio', ...) for files that cannot be decoded
    or hold no samples.
    """
    try:
        samples, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        raise AudioError("unreadable_audio", f"{Path(path).name}: {error}") from None
    if samples.shape[0] == 0:
        raise AudioError("empty_audio", f"{Path(path).name} holds no samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != sample_rate:
        # soxr's "HQ" is a 20-bit-quality band-limited resampler (fast and transparent for speech).
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


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
