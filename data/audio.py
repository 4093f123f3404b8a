"""Audio in every stage: decode any clip once (MP3, WAV, FLAC or OGG at any rate, mixed to mono,
resampled to 16 kHz), and normalise and pad waveforms exactly as the model was trained to see them."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16_000

# Peak below which a clip is treated as silence (about -80 dBFS): nothing for CTC to align.
SILENCE_PEAK = 1e-4
# A file decoding to less than this fraction of the length its header announces is truncated.
TRUNCATED_FRACTION = 0.95


NOT_REGULAR = "is not a regular file (a named pipe, device or socket): not opened"


class AudioError(Exception):
    """A clip that cannot be used; `reason` is the short code written to prep_report.json and
    `detail` says what is wrong with the file (callers name the file)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return the clip at `path` as float32 mono samples at `sample_rate`.

    Raises AudioError with reason 'missing_file' (no such file), 'unreadable_audio' (cannot be
    decoded, or not a regular file; the detail says why), 'empty_audio' (no samples), 'truncated_audio' (fewer samples
    than its header announces) or 'non_finite_audio' (NaN or infinite samples, which float WAVs
    can hold).
    """
    path = Path(path)
    check_regular_file(path)
    try:
        with quiet_native_stderr(), soundfile.SoundFile(str(path)) as handle:
            source_rate, announced = handle.samplerate, handle.frames
            samples = handle.read(dtype="float32", always_2d=True)
    except DECODE_ERRORS as error:
        raise AudioError("unreadable_audio", describe_undecodable(path, error)) from None
    check_complete(samples.shape[0], announced, source_rate)
    check_finite(samples)
    mono = to_mono(samples)
    if source_rate != sample_rate:
        # soxr's "HQ" is a 20-bit-quality band-limited resampler (fast and transparent for speech).
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


# What libsndfile (through soundfile) raises for a file it cannot decode.
DECODE_ERRORS = (soundfile.LibsndfileError, RuntimeError, ValueError, OSError)


def check_complete(decoded: int, announced: int, source_rate: int) -> None:
    """Raise for a clip that decoded to no samples, or to fewer than its header announces."""
    if decoded == 0:
        raise AudioError("empty_audio", "holds no samples")
    if _is_truncated(decoded, announced):
        raise AudioError(
            "truncated_audio",
            f"decoded {decoded / source_rate:.2f} s of the "
            f"{announced / source_rate:.2f} s its header announces",
        )


def check_finite(samples: np.ndarray) -> None:
    if not np.isfinite(samples).all():
        raise AudioError("non_finite_audio", "holds NaN or infinite samples")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(samples, channels) -> samples: the mean of the channels."""
    return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]


def check_regular_file(path: Path) -> None:
    if not path.is_file():
        if path.is_dir():
            raise AudioError("missing_file", "is a folder")
        if path.exists():  # opening a named pipe would wait for a writer: never opened
            raise AudioError("unreadable_audio", NOT_REGULAR)
        raise AudioError("missing_file", "no such file")


def announced_seconds(path: str | Path) -> float | None:
    """The length a file's header announces, in seconds; None where the header does not record it
    (or the file cannot be opened: reading it reports why)."""
    if not Path(path).is_file():  # opening a named pipe would wait for a writer: never opened
        return None
    try:
        with quiet_native_stderr(), soundfile.SoundFile(str(path)) as handle:
            frames, rate = handle.frames, handle.samplerate
    except Exception:  # reported, with its reason, when the file is read
        return None
    if frames <= 0 or frames >= 2**62:  # unknown length (libsndfile's SF_COUNT_MAX)
        return None
    return frames / rate


def stream_audio(
    path: str | Path, block_seconds: float, sample_rate: int = SAMPLE_RATE
) -> Iterator[np.ndarray]:
    """`load_audio`, block by block: float32 mono blocks at `sample_rate` whose concatenation is
    the clip, with the same checks (raised as AudioError when the block that shows the problem is
    reached: a truncation only at the end). Memory stays that of a block whatever the file's
    length.

    The file is read forward only, never seeked, so formats that cannot seek (MP3 in older
    libsndfile, OGG) stream the same way; their blocks are decoded as they come. A stream
    resampler (soxr) carries its filter state across blocks: the samples equal a one-pass
    resampling of the whole file up to float rounding.
    """
    path = Path(path)
    check_regular_file(path)
    try:
        with quiet_native_stderr():
            handle = soundfile.SoundFile(str(path))
    except DECODE_ERRORS as error:
        raise AudioError("unreadable_audio", describe_undecodable(path, error)) from None
    with handle:
        source_rate, announced = handle.samplerate, handle.frames
        resampler = (
            soxr.ResampleStream(source_rate, sample_rate, 1, dtype="float32", quality="HQ")
            if source_rate != sample_rate
            else None
        )
        block = max(1, int(block_seconds * source_rate))
        decoded = 0
        while True:
            try:
                with quiet_native_stderr():
                    samples = handle.read(block, dtype="float32", always_2d=True)
            except DECODE_ERRORS as error:
                raise AudioError("unreadable_audio", describe_undecodable(path, error)) from None
            last = samples.shape[0] < block
            decoded += samples.shape[0]
            check_finite(samples)
            if last:
                check_complete(decoded, announced, source_rate)
            mono = to_mono(samples)
            if resampler is not None:
                mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
            if len(mono):
                yield np.ascontiguousarray(mono, dtype=np.float32)
            if last:
                return


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send what C libraries write to file descriptor 2 to /dev/null for the block: libsndfile's
    mpg123 prints notes ("Illegal Audio-MPEG-Header", "Trying to resync") for damaged MP3s, and
    whatever it could not decode is reported as an AudioError instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def describe_undecodable(path: Path, error: Exception) -> str:
    """What is wrong with a file libsndfile cannot open, in words: its own message says "File does
    not exist" for any file it does not recognise."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"ID3") and len(head) >= 10:
        # ID3v2: a 10-byte header whose size is 4 bytes of 7 bits each, then the tag (+ a footer).
        size = 10 + sum(byte << (7 * (3 - i)) for i, byte in enumerate(head[6:10]))
        size += 10 if head[5] & 0x10 else 0
        if path.stat().st_size <= size:
            return "an MP3 with an ID3 tag and no audio after it (cut short?)"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "holds text, not audio"
        except UnicodeDecodeError as cut:
            if cut.start >= len(head) - 3:  # a character cut at the 4096-byte boundary
                return "holds text, not audio"
    message = str(error).strip().rstrip(".")
    return (
        "not audio that libsndfile can decode (WAV, FLAC, OGG, MP3), or damaged beyond "
        f"repair ({message})"
    )


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
