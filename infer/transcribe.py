"""`phonetune transcribe`: print the phones of audio files (any rate; WAV, FLAC, MP3, OGG), and
with `--timestamps` when each phone is said.

Recordings longer than a window are read block by block and recognised in overlapping windows
(attention cost grows with the square of the length), whose frames are stitched at a frame both
windows call blank (FrameStitcher): memory stays flat in a recording's length and no phone at a
join is doubled or lost. Short recordings are read whole and batched together by duration.
A file that cannot be read is reported and skipped; the others are still transcribed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phonetune.data import ctc
from phonetune.data.audio import (
    SAMPLE_RATE,
    AudioError,
    announced_seconds,
    load_audio,
    stream_audio,
)
from phonetune.data.errors import PhonetuneError
from phonetune.data.options import positive_number, require_positive
from phonetune.data.prepared import batches_longest_first
from phonetune.data.progress import progress_bar
from phonetune.data.vocab import BLANK_ID
from phonetune.infer.align import (
    FrameTiming,
    PhoneSpan,
    add_output_options,
    format_table,
    greedy_spans,
    make_textgrid_folder,
    textgrid_paths,
    write_textgrid,
)
from phonetune.infer.beam import BeamDecoder, BeamSearch, add_beam_options, beam_search_from_args
from phonetune.infer.recognize import (
    DEFAULT_BATCH_SECONDS,
    LoadedModel,
    add_batch_seconds_option,
    add_model_argument,
    chosen_checkpoint,
    frame_log_probs,
    load_model,
)

DEFAULT_CHUNK_SECONDS = 20.0
MIN_CHUNK_SECONDS = 0.5
# Context each window shares with its neighbour: the frames near a window's edges see only one
# side, so the cut between two windows goes near the middle of their overlap, where each has
# about a second of context on either side.
DEFAULT_OVERLAP_SECONDS = 2.0
# Seconds of a file decoded at a time when it is streamed.
STREAM_BLOCK_SECONDS = 5.0
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
    spans: list[PhoneSpan] | None = None  # the phones in time (--timestamps, --textgrid)

    def to_json(self, timestamps: bool = False) -> dict:
        """{path, phones, duration[, note]} or {path, error}; with `timestamps`, phones is the list
        of {phone, start, end, confidence}."""
        result = {"path": self.path, "phones": self.phones, "duration": self.duration}
        result.update(error=self.error, note=self.note)
        if timestamps and self.spans is not None:
            result["phones"] = [span.to_json() for span in self.spans]
        return {key: value for key, value in result.items() if value is not None}


@dataclass(frozen=True)
class WindowPlan:
    """How a recording is cut: windows of `size` samples starting every `step` samples (so that
    neighbours share `size - step`), all multiples of the encoder's hop, so the frames of every
    window fall on one grid of frames of the whole recording."""

    size: int
    step: int
    hop: int

    @classmethod
    def of(cls, chunk_seconds: float, overlap_seconds: float, hop: int) -> WindowPlan:
        size = max(1, round(chunk_seconds * SAMPLE_RATE / hop)) * hop
        # At most a third of a window overlaps each neighbour: the cut sits in the middle third.
        overlap = min(round(overlap_seconds * SAMPLE_RATE / hop), size // hop // 3) * hop
        return cls(size, size - overlap, hop)


def split_into_windows(blocks: Iterable[np.ndarray], plan: WindowPlan) -> Iterator[Window]:
    """Overlapping windows of a recording that arrives in blocks, in order, holding no more than
    a window and a block. The last window ends at the recording's end and starts a window
    before it (so it has as much context as any), overlapping its neighbour by more than usual;
    a recording no longer than a window is one window."""
    buffer = np.zeros(0, dtype=np.float32)
    buffer_start = 0  # sample of the recording where the buffer starts
    next_start = 0
    covered = 0  # end of the last window given out
    for block in blocks:
        buffer = np.concatenate([buffer, block])
        buffer_end = buffer_start + len(buffer)
        while buffer_end >= next_start + plan.size and buffer_end > plan.size:
            offset = next_start - buffer_start
            yield Window(next_start, buffer[offset : offset + plan.size])
            covered = next_start + plan.size
            next_start += plan.step
        # Keep what the next window, or a last window ending here or later, needs.
        keep = min(next_start, max(0, (buffer_end - plan.size) // plan.hop * plan.hop))
        buffer, buffer_start = buffer[keep - buffer_start :], keep
    buffer_end = buffer_start + len(buffer)
    if buffer_end > covered or covered == 0:
        start = max(0, (buffer_end - plan.size) // plan.hop * plan.hop)
        yield Window(start, buffer[start - buffer_start :])


@dataclass
class Window:
    start: int  # first sample, in the recording
    wave: np.ndarray


class FrameStitcher:
    """A recording's best path (the top id and its posterior per frame), put together from
    overlapping windows given in order.

    Where two windows overlap, each frame is taken from one of them: the earlier window's up to a
    cut, the later one's from it. The cut is a frame that both windows call blank, the one nearest
    the middle of the overlap (where each window has the most context on both sides). A phone
    never straddles a frame that both call blank, so each phone at a join comes from exactly one
    window: none is counted twice or lost. Only where the two windows share no blank frame (rare:
    CTC puts blanks between almost all phones) is the middle frame the cut, and a phone there may
    then be doubled or lost.

    With a beam `decoder`, each window's frames up to the cut (whose log posteriors `add` is then
    given) are beam-searched as soon as the cut is known and only the phones are kept, so memory
    stays flat; the search starts afresh at each cut, a frame both windows call blank.
    """

    def __init__(self, decoder: BeamDecoder | None = None) -> None:
        self.ids: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.decoder = decoder
        self.texts: list[str] = []  # with a decoder: the phones of each piece
        # first frame, ids, probs (and log posteriors, with a decoder)
        self.pending: tuple[int, np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def add(
        self,
        first_frame: int,
        ids: np.ndarray,
        probs: np.ndarray,
        log_probs: np.ndarray | None = None,
    ) -> None:
        if self.pending is None:
            self.pending = (first_frame, ids, probs, log_probs)
            return
        start, old_ids, old_probs, old_log_probs = self.pending
        overlap_end = min(start + len(old_ids), first_frame + len(ids))
        if overlap_end <= first_frame:  # no overlap (windows that do not touch): nothing to choose
            cut = first_frame
        else:
            frames = np.arange(first_frame, overlap_end)
            both_blank = (old_ids[frames - start] == BLANK_ID) & (
                ids[frames - first_frame] == BLANK_ID
            )
            middle = (first_frame + overlap_end - 1) / 2
            candidates = frames[both_blank] if both_blank.any() else frames
            cut = int(candidates[np.argmin(np.abs(candidates - middle))])
        keep = max(0, min(cut, start + len(old_ids)) - start)
        self.ids.append(old_ids[:keep])
        self.probs.append(old_probs[:keep])
        self._decode(old_log_probs, keep)
        gap = cut - (start + keep)  # frames neither window has (windows that do not touch)
        if gap > 0:
            self.ids.append(np.full(gap, BLANK_ID, dtype=old_ids.dtype))
            self.probs.append(np.ones(gap, dtype=old_probs.dtype))
        rest = log_probs[cut - first_frame :] if log_probs is not None else None
        self.pending = (cut, ids[cut - first_frame :], probs[cut - first_frame :], rest)

    def _decode(self, log_probs: np.ndarray | None, frames: int) -> None:
        if self.decoder is not None and log_probs is not None and frames > 0:
            self.texts.append(self.decoder.decode(log_probs[:frames]))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pending is not None:
            self.ids.append(self.pending[1])
            self.probs.append(self.pending[2])
            self._decode(self.pending[3], len(self.pending[1]))
            self.pending = None
        if not self.ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        return np.concatenate(self.ids), np.concatenate(self.probs)


@dataclass
class FileState:
    """What transcription keeps of one recording while its windows are recognised."""

    stitcher: FrameStitcher = field(default_factory=FrameStitcher)
    samples: int = 0
    audible: list[tuple[int, int]] = field(default_factory=list)  # windows run, (start, end)
    silent: list[tuple[int, int]] = field(default_factory=list)  # windows not run: silence

    def silent_seconds(self) -> float:
        """Seconds of the recording that lie in silent windows only (windows overlap)."""
        return (covered(self.silent + self.audible) - covered(self.audible)) / SAMPLE_RATE


def covered(spans: list[tuple[int, int]]) -> int:
    """Samples inside at least one of the (start, end) spans."""
    total, reach = 0, 0
    for start, end in sorted(spans):
        total += max(0, end - max(start, reach))
        reach = max(reach, end)
    return total


def transcribe_files(
    model: Path | LoadedModel,
    paths: Sequence[Path],
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    progress: bool = False,
    overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
    beam: BeamSearch | None = None,
) -> list[Transcript]:
    """One Transcript per path, in order, with its phones in time (`spans`); unreadable files carry
    `error` instead of `phones`, and files too short to recognise a `note`. `progress` draws a bar
    over the audio (on a terminal). `beam` (infer/beam.py) replaces greedy decoding by beam search;
    its phones have no times (`spans` stays None).

    Recordings no longer than a window (by their header) are read whole and batched together;
    longer ones (and those whose header does not say) are read block by block, one at a time, in
    overlapping windows: memory does not grow with a recording's length.
    """
    if not (math.isfinite(chunk_seconds) and chunk_seconds >= MIN_CHUNK_SECONDS):
        raise PhonetuneError(
            f"--chunk-seconds must be at least {MIN_CHUNK_SECONDS:g} (and finite), not {chunk_seconds}"
        )
    require_positive(batch_seconds, "--batch-seconds")
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model))
    timing = FrameTiming.of(loaded.conv_layers)
    plan = WindowPlan.of(chunk_seconds, overlap_seconds, round(timing.hop * SAMPLE_RATE))
    transcripts = [Transcript(path=str(path)) for path in paths]
    decoder = beam.build(loaded.id_to_token) if beam is not None else None
    states = {index: FileState(FrameStitcher(decoder)) for index in range(len(paths))}
    known = [announced_seconds(path) for path in paths]
    # One window or less, by the header: read whole. Longer or unknown (a header without a
    # length, or a file that cannot be opened, which reading reports): streamed.
    whole = [seconds is not None and seconds * SAMPLE_RATE <= plan.size for seconds in known]
    total = round(sum(seconds or 0.0 for seconds in known), 1)
    with progress_bar(total, "transcribe", "s audio", show=progress) as bar:
        short: list[tuple[int, Window]] = []
        for index, path in enumerate(paths):
            if whole[index]:
                wave = read_whole(path, transcripts[index])
                if wave is not None and has_a_frame(len(wave), loaded, transcripts[index]):
                    short.extend((index, w) for w in split_into_windows([wave], plan))
                    states[index].samples = len(wave)
        recognize_windows(loaded, short, states, plan, batch_seconds, bar)
        for index, path in enumerate(paths):
            if not whole[index]:
                stream_file(
                    loaded, path, plan, batch_seconds, transcripts[index], states[index], bar
                )
    for index, transcript in enumerate(transcripts):
        if transcript.error is None and transcript.phones is None:
            finish_transcript(transcript, states[index], loaded, timing)
    return transcripts


def read_whole(path: Path, transcript: Transcript) -> np.ndarray | None:
    try:
        return load_audio(path)
    except AudioError as error:
        transcript.error = describe_audio_error(path, error)
    except Exception as error:  # any other failure: one bad file must not stop the others
        transcript.error = f"cannot read {path}: {error}"
    return None


def describe_audio_error(path: Path, error: AudioError) -> str:
    if error.detail == "no such file":
        return f"no such file: {path}"
    return f"cannot read {path}: {error.detail}"


def has_a_frame(samples: int, loaded: LoadedModel, transcript: Transcript) -> bool:
    """Whether a recording of `samples` yields an output frame; if not, a note says so."""
    transcript.duration = round(samples / SAMPLE_RATE, 3)
    if samples >= loaded.min_samples:
        return True
    transcript.phones, transcript.spans = "", []
    transcript.note = (
        f"too short: {samples / SAMPLE_RATE:.4f} s, the model needs at least "
        f"{loaded.min_samples / SAMPLE_RATE:.3f} s for one output frame"
    )
    return False


def stream_file(
    loaded: LoadedModel,
    path: Path,
    plan: WindowPlan,
    batch_seconds: float,
    transcript: Transcript,
    state: FileState,
    bar: object,
) -> None:
    """Recognise one recording window by window as it is read, a batch of windows at a time."""
    pending: list[tuple[int, Window]] = []
    windows = split_into_windows(stream_audio(path, STREAM_BLOCK_SECONDS), plan)
    while True:
        try:  # reading only: the model's own failures are not the file's
            window = next(windows, None)
        except AudioError as error:
            transcript.error = describe_audio_error(path, error)
            return
        except Exception as error:  # any other failure: one bad file must not stop the others
            transcript.error = f"cannot read {path}: {error}"
            return
        if window is None:
            break
        state.samples = max(state.samples, window.start + len(window.wave))
        pending.append((0, window))
        if sum(len(w.wave) for _, w in pending) >= batch_seconds * SAMPLE_RATE:
            recognize_windows(loaded, pending, {0: state}, plan, batch_seconds, bar)
            pending = []
    if has_a_frame(state.samples, loaded, transcript):
        recognize_windows(loaded, pending, {0: state}, plan, batch_seconds, bar)


def recognize_windows(
    loaded: LoadedModel,
    windows: list[tuple[int, Window]],
    states: dict[int, FileState],
    plan: WindowPlan,
    batch_seconds: float,
    bar: object,
) -> None:
    """Run the model over (file, window) pairs, batched by length, and hand each file's windows'
    best paths to its stitcher in time order. Silent windows are not run: all their frames are
    blank (on digital silence the model invents a phone or two)."""
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    audible: set[int] = set()
    for position, (_, window) in enumerate(windows):
        if is_silent(window.wave):
            frames = int(ctc.count_frames(len(window.wave), loaded.conv_layers))
            results[position] = (
                np.zeros(frames, dtype=np.int64),
                np.ones(frames, np.float32),
                None,
            )
        else:
            audible.add(position)
    run = sorted(audible)
    seconds = [len(windows[p][1].wave) / SAMPLE_RATE for p in run]
    for batch in batches_longest_first(seconds, batch_seconds):
        positions = [run[i] for i in batch.tolist()]
        waves = [windows[p][1].wave for p in positions]
        for position, log_probs in zip(positions, frame_log_probs(loaded, waves), strict=True):
            best = log_probs.argmax(axis=-1)
            results[position] = (best, np.exp(log_probs[np.arange(len(best)), best]), log_probs)
    hop, step = plan.hop, plan.step
    for position, (owner, window) in enumerate(windows):
        state = states[owner]
        span = (window.start, window.start + len(window.wave))
        (state.audible if position in audible else state.silent).append(span)
        ids, probs, log_probs = results[position]
        state.stitcher.add(window.start // hop, ids, probs, log_probs)
        bar.update(round(min(len(window.wave), step) / SAMPLE_RATE, 1))


def finish_transcript(
    transcript: Transcript, state: FileState, loaded: LoadedModel, timing: FrameTiming
) -> None:
    ids, probs = state.stitcher.finish()
    transcript.duration = round(state.samples / SAMPLE_RATE, 3)
    if state.stitcher.decoder is not None:
        transcript.phones = " ".join(text for text in state.stitcher.texts if text)
    else:
        transcript.spans = greedy_spans(
            ids, probs, loaded.id_to_token, timing, state.samples / SAMPLE_RATE
        )
        transcript.phones = " ".join(span.phone for span in transcript.spans)
    if state.silent:
        transcript.note = describe_silence(state)


def is_silent(wave: np.ndarray) -> bool:
    """RMS level below SILENT_RMS_DBFS (decibels relative to full scale, where 1.0 is 0 dB)."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return rms < 10 ** (SILENT_RMS_DBFS / 20)


def describe_silence(state: FileState) -> str:
    if not state.audible:
        return f"silence: the recording is below {SILENT_RMS_DBFS:g} dBFS (RMS), no phones"
    windows = len(state.silent) + len(state.audible)
    return (
        f"silence: {len(state.silent)} of {windows} windows ({state.silent_seconds():.1f} s) "
        f"below {SILENT_RMS_DBFS:g} dBFS (RMS), not transcribed"
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
        "--timestamps",
        action="store_true",
        help="when each phone is said: start, end (seconds) and confidence, as a table or, with "
        '--json, as "phones": [{phone, start, end, confidence}, ...]',
    )
    add_output_options(parser)
    parser.add_argument(
        "--chunk-seconds",
        type=positive_number,
        default=DEFAULT_CHUNK_SECONDS,
        help="recognise longer recordings in overlapping windows of this many seconds "
        f"(default {DEFAULT_CHUNK_SECONDS:g}; neighbours share up to {DEFAULT_OVERLAP_SECONDS:g} s)",
    )
    add_batch_seconds_option(parser)
    add_beam_options(parser)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    beam = beam_search_from_args(args)
    if beam is not None and (args.timestamps or args.textgrid is not None):
        raise PhonetuneError(
            "--timestamps and --textgrid time the phones of greedy decoding; beam search gives "
            "phones without times: leave out --beam for them"
        )
    if args.textgrid is not None:
        make_textgrid_folder(args.textgrid)
    loaded = load_model(args.model, chosen_checkpoint(args))
    transcripts = transcribe_files(
        loaded, args.audio, args.chunk_seconds, args.batch_seconds, progress=True, beam=beam
    )
    done = [t for t in transcripts if t.error is None]
    if args.textgrid is not None:
        for transcript, path in zip(
            done, textgrid_paths([t.path for t in done], args.textgrid), strict=True
        ):
            write_textgrid(path, transcript.spans or [], transcript.duration or 0.0)
    if args.json:
        payload = [t.to_json(args.timestamps) for t in transcripts]
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    elif args.timestamps:
        for transcript in done:
            print(f"{transcript.path}\t{transcript.duration:.3f} s")
            print(format_table(transcript.spans or []))
    else:
        for transcript in done:
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
