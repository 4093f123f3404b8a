"""Audio in every stage: decode any clip once (MP3, WAV, FLAC or OGG at any rate, mixed to mono,
resampled to 16 kHz), and normalise and pad waveforms exactly as the model was trained to see them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16_000

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


def normalize_audio(samples: np.ndarray) -> np.ndarray:
    """One utterance -> float32 with zero mean and unit variance over its samples.

    The same computation as `Wav2Vec2FeatureExtractor(do_normalize=True)` (what the released model's
    processor applies at inference): float32, `(x - mean) / sqrt(var + 1e-7)`. int16 PCM is first
    scaled to [-1, 1) as the feature extractor would receive it from an audio decoder. Training,
    evaluation, transcription and the export checks all normalise through here.
    """
    audio = np.asarray(samples, dtype=np.float32)
    if samples.dtype == np.int16:
        audio = audio / np.float32(32768.0)
    return (audio - audio.mean()) / np.sqrt(audio.var() + np.float32(1e-7))


def pad_waves(
    waves: list[np.ndarray], pad_to_multiple_of: int = 1, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise each wave and zero-pad them into one (len(waves), width) float32 array; returns it
    and the waves' lengths in samples (int64). The width is the longest wave rounded up to a
    multiple of `pad_to_multiple_of`, or `width` when given (it must hold the longest)."""
    lengths = np.array([len(wave) for wave in waves], dtype=np.int64)
    longest = int(lengths.max(initial=1))
    if width is None:
        width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    elif width < longest:
        raise ValueError(f"width {width} cannot hold a wave of {longest} samples")
    batch = np.zeros((len(waves), width), dtype=np.float32)
    for i, wave in enumerate(waves):
        batch[i, : len(wave)] = normalize_audio(wave)
    return batch, lengths
