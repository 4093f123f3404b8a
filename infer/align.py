"""Phones in time: which output frames of a CTC model carry each phone, in seconds, with a
confidence; CTC forced alignment of a known phone sequence; and `phonetune align`.

Times come from the feature encoder's convolutions (data.ctc.conv_layers): output frame t sees the
samples [t * hop, t * hop + receptive field), and stands for the hop-long stretch centred on that
window. A phone spans the frames the model gives it, so with CTC's peaky outputs most phones span
one or two frames (20-40 ms) and the blank frames between phones belong to no phone. Confidence is
the mean posterior of the phone over its frames.

`transcribe --timestamps` takes the frames of the best path (greedy_spans); `align` takes the frames
of the best path that spells the given phones (forced_spans). Both write the same per-phone JSON
and, with `--textgrid`, Praat TextGrids (praatio).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phonetune.data import ctc
from phonetune.data.audio import SAMPLE_RATE, AudioError, load_audio
from phonetune.data.errors import PhonetuneError
from phonetune.data.prepared import batches_longest_first
from phonetune.data.progress import progress_bar
from phonetune.data.vocab import BLANK_ID, SPECIAL_TOKENS
from phonetune.infer.recognize import (
    DEFAULT_BATCH_SECONDS,
    LoadedModel,
    add_batch_seconds_option,
    add_model_argument,
    chosen_checkpoint,
    frame_log_probs,
    load_model,
)

# Forced alignment runs the model over a whole clip at once (attention grows with the square of
# the length) and keeps frames x (2 phones + 1) back-pointers: utterances, not recordings.
MAX_ALIGN_SECONDS = 120.0


# --- frames -> seconds ------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameTiming:
    """Where output frames sit in time, from the feature encoder's (kernel, stride) layers."""

    hop: float  # seconds between consecutive frames (the product of the strides)
    offset: float  # seconds from frame t's `t * hop` to the start of the stretch it stands for

    @classmethod
    def of(cls, layers: Sequence[tuple[int, int]]) -> FrameTiming:
        hop = int(np.prod([stride for _, stride in layers]))
        receptive_field = ctc.min_samples(layers)
        # Frame t stands for the hop centred on its receptive field's centre.
        return cls(hop / SAMPLE_RATE, (receptive_field - hop) / 2 / SAMPLE_RATE)

    def span(self, first: int, last: int, duration: float) -> tuple[float, float]:
        """Seconds from the start of frame `first` to the end of frame `last`, within the clip."""
        start = min(max(0.0, self.offset + first * self.hop), duration)
        end = min(max(0.0, self.offset + (last + 1) * self.hop), duration)
        return start, end


@dataclass
class PhoneSpan:
    phone: str
    start: float  # seconds
    end: float
    confidence: float  # mean posterior of the phone over its frames, in [0, 1]

    def to_json(self) -> dict:
        return {
            "phone": self.phone,
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "confidence": round(self.confidence, 3),
        }


def make_spans(
    runs: Sequence[tuple[str, int, int, float]], timing: FrameTiming, duration: float
) -> list[PhoneSpan]:
    """(phone, first frame, last frame, confidence) runs, in order -> PhoneSpans in seconds; a run
    that the clip's end leaves no time for (a frame of padding past it) is dropped."""
    spans = []
    for phone, first, last, confidence in runs:
        start, end = timing.span(first, last, duration)
        if end > start:
            spans.append(PhoneSpan(phone, start, end, min(1.0, max(0.0, confidence))))
    return spans


def greedy_spans(
    best_ids: np.ndarray,
    best_probs: np.ndarray,
    id_to_token: Mapping[int, str],
    timing: FrameTiming,
    duration: float,
) -> list[PhoneSpan]:
    """The phones of the best path (data.ctc.greedy_decode's, in the same order) with the frames
    each one spans: a run of equal non-blank ids is one phone, and its confidence is the mean of
    the frames' top posterior (`best_probs`)."""
    best_ids = np.asarray(best_ids)
    if len(best_ids) == 0:
        return []
    # Run boundaries: where the id changes.
    starts = np.flatnonzero(np.r_[True, best_ids[1:] != best_ids[:-1]])
    ends = np.r_[starts[1:], len(best_ids)] - 1
    sums = np.add.reduceat(np.asarray(best_probs, dtype=np.float64), starts)
    runs = []
    for first, last, total in zip(starts.tolist(), ends.tolist(), sums.tolist(), strict=True):
        token_id = int(best_ids[first])
        token = id_to_token.get(token_id, "<unk>")
        if token_id != BLANK_ID and token not in SPECIAL_TOKENS:
            runs.append((token, first, last, total / (last - first + 1)))
    return make_spans(runs, timing, duration)


# --- forced alignment -------------------------------------------------------------------------
def phone_ids(phones: Sequence[str], token_to_id: Mapping[str, int]) -> np.ndarray:
    """The vocabulary ids of `phones`; PhonetuneError naming every phone the model cannot output."""
    unknown = list(dict.fromkeys(p for p in phones if p not in token_to_id or p in SPECIAL_TOKENS))
    if unknown:
        raise PhonetuneError(
            f"phones not in the model's vocabulary: {' '.join(unknown)} (the model can never "
            "output them; give phones from its vocab.json, separated by spaces)"
        )
    return np.array([token_to_id[p] for p in phones], dtype=np.int64)


def viterbi_states(log_probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, float]:
    """The best path through the CTC topology of `targets` over frames of `log_probs` (T, V):
    for each frame its state in (blank, y1, blank, y2, ..., yL, blank), numbered 0 .. 2L, and
    the path's total log probability (-inf where no path exists).

    Written here rather than taken from a library: torchaudio.functional.forced_align does this,
    but torchaudio is in maintenance, its PyPI wheels are built against CUDA torch (they fail to
    load with a CPU torch 2.13), and ctc-segmentation (the other maintained package) solves a
    different problem (finding utterances in long audio, with a windowed approximation) and
    builds from source with Cython. The recursion is a few lines, vectorised over states; the
    loop over frames is in Python (30 s of audio: 1,500 steps, a few milliseconds each).
    """
    num_frames = log_probs.shape[0]
    states = np.full(2 * len(targets) + 1, BLANK_ID, dtype=np.int64)
    states[1::2] = targets
    emissions = log_probs[:, states]  # (T, S): each state's log posterior per frame
    # A phone may follow the phone before it directly (skipping the blank) unless they are equal.
    can_skip = np.zeros(len(states), dtype=bool)
    can_skip[3::2] = targets[1:] != targets[:-1]
    score = np.full(len(states), -np.inf)
    score[:2] = emissions[0, :2]  # start in the first blank or the first phone
    back = np.zeros((num_frames, len(states)), dtype=np.int8)  # 0 stay, 1 advance, 2 skip
    for t in range(1, num_frames):
        moves = np.full((3, len(states)), -np.inf)
        moves[0] = score
        moves[1, 1:] = score[:-1]
        moves[2, 2:] = np.where(can_skip[2:], score[:-2], -np.inf)
        back[t] = moves.argmax(axis=0)
        score = np.take_along_axis(moves, back[t][None].astype(np.int64), axis=0)[0]
        score = score + emissions[t]
    # End in the last phone or the blank after it.
    last = len(states) - 1 if len(states) == 1 else len(states) - 2 + int(score[-1] >= score[-2])
    total = float(score[last])
    path = np.empty(num_frames, dtype=np.int64)
    for t in range(num_frames - 1, -1, -1):
        path[t] = last
        last -= back[t, last]
    return path, total


def forced_spans(
    log_probs: np.ndarray,
    phones: Sequence[str],
    token_to_id: Mapping[str, int],
    timing: FrameTiming,
    duration: float,
) -> tuple[list[PhoneSpan], float]:
    """Each of `phones` with the frames the best CTC path spelling them gives it, and the
    alignment's score: the mean log posterior per frame of that path (0 where the model is sure
    of every frame; the lower, the less the audio sounds like these phones)."""
    targets = phone_ids(phones, token_to_id)
    num_frames = log_probs.shape[0]
    needed = ctc.count_min_frames(list(phones))
    if needed > num_frames:
        repeats = needed - len(phones)
        raise PhonetuneError(
            f"{len(phones)} phones"
            + (f" ({repeats} repeated neighbours need a blank between them)" if repeats else "")
            + f" need at least {needed} frames, but the audio gives {num_frames} "
            f"({duration:.2f} s at {1 / timing.hop:.0f} frames per second): the phones cannot "
            "all be in this clip; check that they belong to it"
        )
    path, total = viterbi_states(log_probs, targets)
    runs = []
    frames = np.arange(num_frames)
    for index, phone in enumerate(phones):
        mine = frames[path == 2 * index + 1]  # contiguous: the topology never returns to a state
        confidence = float(np.exp(log_probs[mine, targets[index]]).mean())
        runs.append((phone, int(mine[0]), int(mine[-1]), confidence))
    return make_spans(runs, timing, duration), total / num_frames


# --- Praat TextGrids --------------------------------------------------------------------------
def write_textgrid(
    path: Path,
    spans: Sequence[PhoneSpan],
    duration: float,
    words: Sequence[tuple[str, int, int]] | None = None,
) -> None:
    """A TextGrid with a "phones" interval tier and, where `words` (label, first phone index, last
    phone index) are given, a "words" tier spanning each word's phones. Time between phones is
    left unlabelled (blank frames: silence or transitions)."""
    from praatio import textgrid

    grid = textgrid.Textgrid()
    entries = [(round(s.start, 3), round(s.end, 3), s.phone) for s in spans]
    grid.addTier(textgrid.IntervalTier("phones", entries, 0.0, duration))
    if words is not None:
        entries = [(round(spans[a].start, 3), round(spans[b].end, 3), w) for w, a, b in words]
        grid.addTier(textgrid.IntervalTier("words", entries, 0.0, duration))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(str(path), format="long_textgrid", includeBlankSpaces=True)


def make_textgrid_folder(folder: Path) -> None:
    """Create --textgrid's folder before any work, so that a bad path fails at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PhonetuneError(
            f"--textgrid {folder} cannot be created: {error.strerror or error}"
        ) from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PhonetuneError(f"--textgrid {folder} is not a folder this user can write to")


def textgrid_paths(names: Sequence[str], folder: Path) -> list[Path]:
    """FOLDER/<name's stem>.TextGrid per name; a stem seen before gets -2, -3, ..."""
    seen: dict[str, int] = {}
    paths = []
    for name in names:
        stem = Path(name).stem or "clip"
        seen[stem] = seen.get(stem, 0) + 1
        suffix = f"-{seen[stem]}" if seen[stem] > 1 else ""
        paths.append(folder / f"{stem}{suffix}.TextGrid")
    return paths


def format_table(spans: Sequence[PhoneSpan]) -> str:
    """The readable form of a clip's phones: one line each, start, end, confidence, phone."""
    lines = ["   start      end   conf  phone"]
    lines += [f"{s.start:8.3f} {s.end:8.3f}  {s.confidence:5.3f}  {s.phone}" for s in spans]
    return "\n".join(lines)


# --- phonetune align --------------------------------------------------------------------------
@dataclass
class Alignment:
    """One clip to align and, once aligned, its phones in time (or why it could not be)."""

    name: str  # the audio file, or the prepared row's clip path
    phones: str | None = None
    text: str | None = None
    locale: str | None = None
    audio: Path | np.ndarray | None = None  # a file, or 16 kHz samples (prepared data)
    duration: float | None = None
    spans: list[PhoneSpan] | None = None
    score: float | None = None
    words: list[tuple[str, int, int]] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        if self.error is not None:
            return {"path": self.name, "error": self.error}
        result = {"path": self.name, "duration": self.duration}
        result["phones"] = [span.to_json() for span in self.spans or []]
        result["score"] = round(self.score, 4) if self.score is not None else None
        if self.words is not None and self.spans:
            result["words"] = [
                {
                    "word": w,
                    "start": round(self.spans[a].start, 3),
                    "end": round(self.spans[b].end, 3),
                }
                for w, a, b in self.words
            ]
        return result


def align_clips(
    loaded: LoadedModel,
    items: list[Alignment],
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    progress: bool = False,
) -> list[Alignment]:
    """Align each item's phones (or its text, phonemized as `prepare` does) to its audio; an item
    that cannot be aligned carries `error` and the others are still aligned."""
    phonemize_texts(items)
    token_to_id = {token: i for i, token in loaded.id_to_token.items()}
    waves: dict[int, np.ndarray] = {}
    for index, item in enumerate(items):
        if item.error is None:
            try:  # unknown phones are reported before any audio is read
                phone_ids((item.phones or "").split(), token_to_id)
            except PhonetuneError as error:
                item.error = f"{item.name}: {error}"
                continue
            wave = read_clip(item, loaded)
            if wave is not None:
                waves[index] = wave
    timing = FrameTiming.of(loaded.conv_layers)
    order = list(waves)
    seconds = [len(waves[i]) / SAMPLE_RATE for i in order]
    with progress_bar(round(sum(seconds), 1), "align", "s audio", show=progress) as bar:
        for batch in batches_longest_first(seconds, batch_seconds):
            indices = [order[i] for i in batch.tolist()]
            for index, log_probs in zip(
                indices, frame_log_probs(loaded, [waves[i] for i in indices]), strict=True
            ):
                item = items[index]
                try:
                    item.spans, item.score = forced_spans(
                        log_probs.astype(np.float64),
                        item.phones.split(),
                        token_to_id,
                        timing,
                        item.duration,
                    )
                except PhonetuneError as error:
                    item.error = f"{item.name}: {error}"
            bar.update(round(sum(seconds[i] for i in batch.tolist()), 1))
    return items


def phonemize_texts(items: list[Alignment]) -> None:
    """Phones (and words) for the items given as text, phonemized exactly as `prepare` does: the
    locale's espeak-ng voice, its script check, the same phonemizer settings."""
    from phonetune.data.locales import foreign_scripts, get_locale
    from phonetune.data.phonemize import phonemize_words

    by_language: dict[str, list[Alignment]] = {}
    for item in items:
        if item.phones is not None or item.error is not None:
            continue
        try:
            locale = get_locale(item.locale or "")
        except PhonetuneError as error:
            item.error = f"{item.name}: {error}"
            continue
        scripts = foreign_scripts(item.text or "", locale)
        if scripts:
            item.error = (
                f"{item.name}: {', '.join(scripts)} letters cannot be read by the "
                f"{locale.espeak!r} voice of {locale.code} (prepare rejects such sentences)"
            )
            continue
        by_language.setdefault(locale.espeak, []).append(item)
    for language, group in by_language.items():
        for item, words in zip(
            group, phonemize_words([i.text or "" for i in group], language), strict=True
        ):
            item.phones = " ".join(words) if words is not None else phonemize_plain(item, language)
            if not item.phones:
                item.error = (
                    f"{item.name}: espeak-ng ({language}) gives no phones for {item.text!r}"
                )
            elif words is not None:
                item.words = label_words(item.text or "", words)
                if item.words is None:
                    item.notes.append(
                        f"espeak-ng reads {len(words)} words where the text has "
                        f"{len((item.text or '').split())}: no words tier"
                    )
            else:
                item.notes.append(
                    "espeak-ng's word boundaries do not match its phones: no words tier"
                )


def phonemize_plain(item: Alignment, language: str) -> str:
    from phonetune.data.phonemize import phonemize_batch

    return phonemize_batch([item.text or ""], language)[0]


def label_words(text: str, words: Sequence[str]) -> list[tuple[str, int, int]] | None:
    """(written word, index of its first phone, of its last) where espeak-ng reads as many words as
    are written; None otherwise ("23" is read as two words: which phones are whose is unknown)."""
    written = text.split()
    if len(written) != len(words):
        return None
    labelled, first = [], 0
    for word, phones in zip(written, words, strict=True):
        count = len(phones.split())
        labelled.append((word, first, first + count - 1))
        first += count
    return labelled


def read_clip(item: Alignment, loaded: LoadedModel) -> np.ndarray | None:
    """The item's 16 kHz samples; None (and `error` set) where they cannot be used."""
    if isinstance(item.audio, np.ndarray):
        wave = item.audio
    else:
        try:
            wave = load_audio(item.audio)
        except AudioError as error:
            item.error = f"cannot read {item.name}: {error.detail}"
            return None
        except Exception as error:  # any other failure: one bad file must not stop the others
            item.error = f"cannot read {item.name}: {error}"
            return None
    item.duration = round(len(wave) / SAMPLE_RATE, 3)
    if len(wave) < loaded.min_samples:
        item.error = (
            f"{item.name}: too short ({len(wave) / SAMPLE_RATE:.4f} s): the model needs at least "
            f"{loaded.min_samples / SAMPLE_RATE:.3f} s for one output frame"
        )
        return None
    if len(wave) > MAX_ALIGN_SECONDS * SAMPLE_RATE:
        item.error = (
            f"{item.name}: {len(wave) / SAMPLE_RATE:.0f} s is longer than the "
            f"{MAX_ALIGN_SECONDS:g} s align takes at once: cut it into utterances"
        )
        return None
    return wave


def read_tsv(path: Path, locale: str | None) -> list[Alignment]:
    """Rows of a tab-separated file with a header: `audio` (relative to the file's folder) and
    `phones`, or `text` with `locale` (a column, or --locale for every row)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise PhonetuneError(f"--tsv {path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise PhonetuneError(f"--tsv {path} cannot be read as UTF-8 TSV: {error}") from None
    columns = set(rows[0]) if rows else set()
    if "audio" not in columns or not ({"phones", "text"} & columns):
        raise PhonetuneError(
            f"--tsv {path} needs a header line with the columns audio and phones (or audio, "
            f"text and locale); it has {', '.join(sorted(columns)) or 'no rows'}"
        )
    items = []
    for number, row in enumerate(rows, start=2):
        audio = (row.get("audio") or "").strip()
        item = Alignment(name=str(path.parent / audio), audio=path.parent / audio)
        if row.get("phones"):
            item.phones = " ".join(row["phones"].split())
        elif row.get("text"):
            item.text, item.locale = row["text"], row.get("locale") or locale
            if not item.locale:
                item.error = f"{path} line {number}: a text needs a locale (column or --locale)"
        else:
            item.error = f"{path} line {number}: no phones and no text"
        items.append(item)
    return items


def read_prepared(prepared_dir: Path, split: str) -> list[Alignment]:
    """The clips of a prepared split with their transcripts' phones (named by their clip path)."""
    from phonetune.infer.evaluate import load_split

    rows = load_split(prepared_dir, split, None)
    audio = rows.select_columns(["audio"]).with_format("numpy")
    items = []
    for index, (name, phones) in enumerate(zip(rows["path"], rows["phones"], strict=True)):
        samples = np.asarray(audio[index]["audio"], dtype=np.float32) / 32768.0
        items.append(Alignment(name=name, phones=phones, audio=samples))
    return items


# --- command line -----------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    source = parser.add_argument_group("what to align (one of)")
    source.add_argument("--audio", type=Path, help="one audio file (with --phones or --text)")
    source.add_argument(
        "--tsv",
        type=Path,
        help="a TSV with a header: audio and phones, or audio, text and locale (paths relative "
        "to the TSV's folder)",
    )
    source.add_argument("--data", type=Path, help="a prepared dataset (with --split)")
    parser.add_argument("--split", default="test", help="with --data (default test)")
    parser.add_argument("--phones", help='the phones of --audio, space-separated: "h ə l oʊ"')
    parser.add_argument("--text", help="the text of --audio, phonemized as prepare does")
    parser.add_argument("--locale", help="the Common Voice locale of --text (e.g. en, fr, zh-CN)")
    add_output_options(parser)
    add_batch_seconds_option(parser)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json and --textgrid, shared with transcribe."""
    parser.add_argument(
        "--json",
        action="store_true",
        help='print JSON: per clip "phones": [{phone, start, end, confidence}, ...] (seconds)',
    )
    parser.add_argument(
        "--textgrid",
        type=Path,
        metavar="DIR",
        help="write one Praat TextGrid per clip into DIR (a phones tier; a words tier with --text)",
    )


def collect_items(args: argparse.Namespace) -> list[Alignment]:
    given = [name for name in ("audio", "tsv", "data") if getattr(args, name) is not None]
    if len(given) != 1:
        raise PhonetuneError("give one of --audio FILE, --tsv FILE or --data PREP --split S")
    if args.audio is not None:
        if (args.phones is None) == (args.text is None):
            raise PhonetuneError('--audio needs --phones "p h o n e s" or --text "..." --locale xx')
        if args.text is not None and not args.locale:
            raise PhonetuneError("--text needs --locale (the Common Voice locale of the text)")
        item = Alignment(name=str(args.audio), audio=args.audio)
        if args.phones is not None:
            item.phones = " ".join(args.phones.split())
            if not item.phones:
                raise PhonetuneError("--phones is empty: give the phones, separated by spaces")
        else:
            item.text, item.locale = args.text, args.locale
        return [item]
    if args.phones is not None or args.text is not None:
        raise PhonetuneError(
            "--phones and --text go with --audio; a TSV or prepared data has its own"
        )
    if args.tsv is not None:
        return read_tsv(args.tsv, args.locale)
    return read_prepared(args.data, args.split)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    items = collect_items(args)
    if args.textgrid is not None:
        make_textgrid_folder(args.textgrid)
    loaded = load_model(args.model, chosen_checkpoint(args))
    align_clips(loaded, items, args.batch_seconds, progress=True)
    if args.textgrid is not None:
        done = [item for item in items if item.error is None]
        for item, path in zip(
            done, textgrid_paths([i.name for i in done], args.textgrid), strict=True
        ):
            write_textgrid(path, item.spans or [], item.duration, item.words)
    if args.json:
        print(json.dumps([item.to_json() for item in items], indent=2, ensure_ascii=False))
    else:
        for item in items:
            if item.error is None:
                print(f"{item.name}\tscore {item.score:.4f}\n{format_table(item.spans or [])}")
    for item in items:
        for note in item.notes:
            print(f"phonetune align: note: {item.name}: {note}", file=sys.stderr)
    failed = [item for item in items if item.error is not None]
    for item in failed:
        print(f"phonetune align: error: {item.error}", file=sys.stderr)
    return 1 if failed else 0
