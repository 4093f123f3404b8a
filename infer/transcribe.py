"""`phonetune transcribe`: print the phones of audio files (any rate; WAV, FLAC, MP3, OGG).

Long recordings are cut into fixed windows (attention cost grows with the square of the length)
and the windows' phones are joined. All windows of all files are batched together by duration.
A file that cannot be read is reported and skipped; the others are still transcribed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from phonetune.data.audio import SAMPLE_RATE, AudioError, load_audio
from phonetune.data.errors import PhonetuneError
from phonetune.data.options import positive_number, require_positive
from phonetune.data.prepared import batches_longest_first
from phonetune.data.progress import progress_bar
from phonetune.infer.beam import BeamSearch, add_beam_options, beam_search_from_args
from phonetune.infer.recognize import (
    DEFAULT_BATCH_SECONDS,
    LoadedModel,
    add_batch_seconds_option,
    add_model_argument,
    chosen_checkpoint,
    load_model,
    recognize,
)

DEFAULT_CHUNK_SECONDS = 20.0
MIN_CHUNK_SECONDS = 0.5
# A last window shorter than this fraction of a window joins the previous one: a short tail carries
# too little context to be recognised on its own (and under 25 ms the feature encoder gives nothing).
MIN_TAIL_FRACTION = 0.1
# A window quieter than this is silence, not speech: speech sits around -20 to -35 dBFS (RMS) even
# when recorded softly, digital silence at minus infinity, the hiss of a quiet room near -70. The
# model is not run on such windows: on silence it invents a phone or two per window.
SILENT_RMS_DBFS = -60.0


@dataclass
class Transcript:
    path: str
    phones: str | None = None
    duration: float | None = None
    error: str | None = None
    note: str | None = None  # why the phones are empty although the file was read


def split_into_chunks(wave: np.ndarray, chunk_seconds: float) -> list[np.ndarray]:
    """Consecutive windows of `chunk_seconds`; a tail under a tenth of that joins the window before."""
    size = int(chunk_seconds * SAMPLE_RATE)
    if len(wave) <= size:
        return [wave]
    starts = list(range(0, len(wave), size))
    if len(wave) - starts[-1] < MIN_TAIL_FRACTION * size:
        starts.pop()
    ends = starts[1:] + [len(wave)]
    return [wave[start:end] for start, end in zip(starts, ends, strict=True)]


def transcribe_files(
    model: Path | LoadedModel,
    paths: Sequence[Path],
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    progress: bool = False,
    beam: BeamSearch | None = None,
) -> list[Transcript]:
    """One Transcript per path, in order; unreadable files carry `error` instead of `phones`, and
    files too short to recognise a `note`. `progress` draws a bar over the audio (on a terminal).
    `beam` (infer/beam.py) replaces greedy decoding by beam search."""
    if not (math.isfinite(chunk_seconds) and chunk_seconds >= MIN_CHUNK_SECONDS):
        raise PhonetuneError(
            f"--chunk-seconds must be at least {MIN_CHUNK_SECONDS:g} (and finite), not {chunk_seconds}"
        )
    require_positive(batch_seconds, "--batch-seconds")
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model))
    decoder = beam.build(loaded.id_to_token) if beam is not None else None
    transcripts = [Transcript(path=str(path)) for path in paths]
    chunks: list[np.ndarray] = []
    owners: list[int] = []  # chunk -> index of its file
    for index, path in enumerate(paths):
        try:
            wave = load_audio(path)
        except AudioError as error:
            transcripts[index].error = (
                f"no such file: {path}"
                if error.detail == "no such file"
                else f"cannot read {path}: {error.detail}"
            )
            continue
        except Exception as error:  # any other failure: one bad file must not stop the others
            transcripts[index].error = f"cannot read {path}: {error}"
            continue
        transcripts[index].duration = round(len(wave) / SAMPLE_RATE, 3)
        if len(wave) < loaded.min_samples:
            transcripts[index].phones = ""
            transcripts[index].note = (
                f"too short: {len(wave) / SAMPLE_RATE:.4f} s, the model needs at least "
                f"{loaded.min_samples / SAMPLE_RATE:.3f} s for one output frame"
            )
            continue
        transcripts[index].phones = ""
        windows = split_into_chunks(wave, chunk_seconds)
        silent = [chunk for chunk in windows if is_silent(chunk)]
        if silent:
            transcripts[index].note = describe_silence(silent, windows)
        for chunk in windows:
            if not is_silent(chunk):  # the model would invent phones in digital silence
                chunks.append(chunk)
                owners.append(index)

    phones = [""] * len(chunks)
    seconds = [len(c) / SAMPLE_RATE for c in chunks]
    with progress_bar(round(sum(seconds), 1), "transcribe", "s audio", show=progress) as bar:
        for indices in batches_longest_first(seconds, batch_seconds):
            for chunk_index, text in zip(
                indices.tolist(),
                recognize(loaded, [chunks[i] for i in indices], decoder),
                strict=True,
            ):
                phones[chunk_index] = text
            bar.update(round(sum(seconds[i] for i in indices.tolist()), 1))
    pieces: dict[int, list[str]] = {}
    for chunk_index, owner in enumerate(owners):  # chunks were appended in time order
        pieces.setdefault(owner, []).append(phones[chunk_index])
    for owner, texts in pieces.items():
        transcripts[owner].phones = " ".join(text for text in texts if text)
    return transcripts


def is_silent(wave: np.ndarray) -> bool:
    """RMS level below SILENT_RMS_DBFS (decibels relative to full scale, where 1.0 is 0 dB)."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return rms < 10 ** (SILENT_RMS_DBFS / 20)


def describe_silence(silent: list[np.ndarray], windows: list[np.ndarray]) -> str:
    seconds = sum(len(chunk) for chunk in silent) / SAMPLE_RATE
    if len(silent) == len(windows):
        return f"silence: the recording is below {SILENT_RMS_DBFS:g} dBFS (RMS), no phones"
    return (
        f"silence: {len(silent)} of {len(windows)} windows ({seconds:.1f} s) below "
        f"{SILENT_RMS_DBFS:g} dBFS (RMS), not transcribed"
    )


# --- command line -----------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "audio",
        type=Path,
        nargs="+",
        metavar="AUDIO",
        help="audio files: WAV, FLAC, MP3, OGG at any sample rate (stereo is mixed to mono)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document: [{path, phones, duration[, note]} or {path, error}, ...]",
    )
    parser.add_argument(
        "--chunk-seconds",
        type=positive_number,
        default=DEFAULT_CHUNK_SECONDS,
        help=f"cut longer recordings into windows of this many seconds (default {DEFAULT_CHUNK_SECONDS:g})",
    )
    add_batch_seconds_option(parser)
    add_beam_options(parser)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    beam = beam_search_from_args(args)
    loaded = load_model(args.model, chosen_checkpoint(args))
    transcripts = transcribe_files(
        loaded, args.audio, args.chunk_seconds, args.batch_seconds, progress=True, beam=beam
    )
    if args.json:
        payload = [{k: v for k, v in asdict(t).items() if v is not None} for t in transcripts]
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        for transcript in transcripts:
            if transcript.error is None:
                print(f"{transcript.path}\t{transcript.phones}")
    for transcript in transcripts:
        if transcript.note is not None:
            print(
                f"phonetune transcribe: note: {transcript.path}: {transcript.note}", file=sys.stderr
            )
    failed = [t for t in transcripts if t.error is not None]
    for transcript in failed:
        print(f"phonetune transcribe: error: {transcript.error}", file=sys.stderr)
    return 1 if failed else 0
