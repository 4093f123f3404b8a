"""A prepared dataset on disk, as every later stage reads it (layout: docs/formats.md).

    PREP_DIR/dataset_dict.json, train/, dev/, test/   the Arrow DatasetDict (int16 16 kHz audio, phones)
    PREP_DIR/vocab.json                              token -> id, <pad> = 0 is the CTC blank
    PREP_DIR/prep_report.json                        what was kept and rejected, versions, settings

Also the one way clips are cut into padded batches by seconds of audio (`pack_batches`), which the
training sampler and evaluation and transcription share.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phonetune.data.errors import PhonetuneError
from phonetune.data.files import damaged, read_json
from phonetune.data.vocab import VOCAB_FILE, load_vocab

DATASET_FILE = "dataset_dict.json"
REPORT_FILE = "prep_report.json"


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / DATASET_FILE).is_file()


def open_prepared(path: str | Path, option: str) -> Any:
    """The DatasetDict of a prepared dataset (memory-mapped); `option` names where the path came
    from, for the error message (e.g. "data.prepared_dir", "--data")."""
    import datasets

    path = Path(path)
    if not is_prepared(path):
        raise PhonetuneError(
            f"{option}={path} is not a prepared dataset (no {DATASET_FILE}): give the folder "
            "`phonetune prepare --out` wrote"
        )
    files = check_layout(path, option)
    datasets.disable_progress_bars()
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        damaged = find_damaged_table(files)
        problem = f"{damaged[0]} is damaged ({damaged[1]})" if damaged else str(error)
        raise PhonetuneError(
            f"{option}={path}: the prepared dataset cannot be read: {problem}. Prepare it again."
        ) from None


def check_layout(path: Path, option: str) -> list[Path]:
    """The Arrow files of a prepared dataset, after checking that the JSON files which list them
    (dataset_dict.json, each split's state.json and dataset_info.json) are what `datasets` wrote:
    `load_from_disk` trusts their shape and fails with a bare TypeError or KeyError otherwise."""
    hint = f"Prepare {option}={path} again."
    splits = read_json(path / DATASET_FILE, dict, hint).get("splits")
    if not isinstance(splits, list) or not all(isinstance(split, str) for split in splits):
        raise damaged(path / DATASET_FILE, "no list of split names under 'splits'", hint)
    files = []
    for split in splits:
        read_json(path / split / "dataset_info.json", dict, hint)
        state = read_json(path / split / "state.json", dict, hint)
        listed = state.get("_data_files")
        if not isinstance(listed, list) or not all(
            isinstance(item, dict) and isinstance(item.get("filename"), str) for item in listed
        ):
            raise damaged(path / split / "state.json", "no list of data files", hint)
        files += [path / split / item["filename"] for item in listed]
    return files


def find_damaged_table(files: Sequence[Path]) -> tuple[Path, str] | None:
    """The first Arrow file that cannot be read whole, and why (memory-mapped: nothing is copied)."""
    import pyarrow as pa

    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException) as error:
            return file, str(error).strip() or type(error).__name__
    return None


def read_vocab(path: str | Path) -> dict[str, int]:
    return load_vocab(Path(path) / VOCAB_FILE)


def read_report(path: str | Path | None) -> dict[str, Any]:
    """prep_report.json of a prepared dataset, or {} where there is none or it is unreadable (it
    only describes the data: versions, hours, settings)."""
    if path is None:
        return {}
    try:
        report = json.loads((Path(path) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def split_hours_per_locale(report: dict, split: str = "train") -> dict[str, float]:
    """Hours of kept audio per locale in one split, from prep_report.json (read gently: {} for what
    it does not hold)."""
    hours = {}
    for locale, entry in (report.get("per_locale") or {}).items():
        if not isinstance(entry, dict):
            continue
        counts = (entry.get("splits") or {}).get(split)
        if isinstance(counts, dict) and "hours" in counts:
            hours[locale] = float(counts["hours"])
    return hours


def open_split(path: str | Path, split: str, option: str) -> PreparedSplit:
    """One split of a prepared dataset; a clear error naming the splits there are."""
    splits = open_prepared(path, option)
    if split not in splits:
        raise PhonetuneError(
            f"{path} has no {split!r} split (it has: {', '.join(splits)}); a split with no kept "
            "clip is absent"
        )
    return PreparedSplit(splits[split])


class PreparedSplit:
    """One split of a prepared dataset, read column by column from its memory-mapped Arrow table.

    `rows` everywhere are row numbers of the split as saved by `phonetune prepare`.
    """

    def __init__(self, dataset: Any) -> None:  # a datasets.Dataset
        if dataset._indices is not None:  # a selected/filtered view: make rows contiguous again
            dataset = dataset.flatten_indices()
        self.dataset = dataset
        table = dataset.data.table
        self.durations = table.column("duration").to_numpy().astype(np.float64)
        self.locales = np.asarray(table.column("locale").to_pylist(), dtype=object)
        self._audio_chunks: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._chunk_starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.durations)

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver re-open the memory map instead of copying it.
        state = self.__dict__.copy()
        state["_audio_chunks"] = state["_chunk_starts"] = None
        return state

    def _chunks(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        if self._audio_chunks is None:
            chunks = []
            for chunk in self.dataset.data.table.column("audio").chunks:
                # offsets index into `values`, which spans the whole chunk buffer (zero copy, mmap).
                chunks.append(
                    (chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=True))
                )
            self._audio_chunks = chunks
            self._chunk_starts = np.cumsum([0] + [len(offsets) - 1 for offsets, _ in chunks])
        return self._audio_chunks, self._chunk_starts

    def num_samples(self) -> np.ndarray:
        """Exact length in samples of every row, from the Arrow offsets (nothing is decoded)."""
        chunks, _ = self._chunks()
        if not chunks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(offsets).astype(np.int64) for offsets, _ in chunks])

    def audio(self, rows: Sequence[int]) -> list[np.ndarray]:
        """int16 views into the memory-mapped audio of `rows` (no copy)."""
        chunks, starts = self._chunks()
        out = []
        for row in rows:
            index = int(np.searchsorted(starts, row, side="right")) - 1
            offsets, values = chunks[index]
            local = int(row) - int(starts[index])
            out.append(values[offsets[local] : offsets[local + 1]])
        return out

    def column(self, name: str, rows: Sequence[int] | None = None) -> list:
        """A column's values for `rows` (all rows when None)."""
        column = self.dataset.data.table.column(name)
        if rows is not None:
            column = column.take(np.asarray(rows, dtype=np.int64))
        return column.to_pylist()


@dataclass(frozen=True)
class BatchBudget:
    """Seconds of padded audio a batch may hold, by its width (the longest clip, in seconds).

    Memory does not grow with a batch's audio alone: attention grows with the square of the width,
    so a batch of long clips needs more memory per second of audio than one of short clips. A
    budget by width lets short-clip batches hold more audio and long-clip ones less, each filling
    the device (NeMo's OOMptimizer idea). `by_width` holds (width, seconds) pairs sorted by width:
    a batch gets the seconds of the narrowest entry at least as wide as it, or `default`.
    """

    default: float
    by_width: tuple[tuple[float, float], ...] = ()

    def __call__(self, width: float) -> float:
        for limit, seconds in self.by_width:
            if width <= limit:
                return seconds
        return self.default

    def __mul__(self, factor: float) -> BatchBudget:
        """The budget of `factor` processes together."""
        return BatchBudget(self.default * factor, tuple((w, s * factor) for w, s in self.by_width))


def pack_batches(
    order: np.ndarray, durations: np.ndarray, batch_seconds: float | BatchBudget
) -> list[np.ndarray]:
    """Cut `order` (positions into `durations`) greedily into batches whose padded size
    (clips × longest clip) stays within `batch_seconds` (a budget by width: the batch's own). A clip
    longer than the budget gets a batch alone. Sorted by duration, consecutive clips pad little;
    `durations` already rounded to a width grid make the budget count the padding that grid adds."""
    budget = batch_seconds if isinstance(batch_seconds, BatchBudget) else BatchBudget(batch_seconds)
    batches: list[np.ndarray] = []
    start, longest = 0, 0.0
    for i, position in enumerate(order):
        duration = durations[position]
        longest_if_added = max(longest, duration)
        if i > start and (i - start + 1) * longest_if_added > budget(longest_if_added):
            batches.append(order[start:i])
            start, longest_if_added = i, duration
        longest = longest_if_added
    if start < len(order):
        batches.append(order[start:])
    return batches


def batches_longest_first(durations: Sequence[float], batch_seconds: float) -> list[np.ndarray]:
    """Positions into `durations` in batches of similar lengths within `batch_seconds`, the longest
    batch first, so that running out of memory happens at once rather than at the end."""
    durations = np.asarray(durations, dtype=np.float64)
    return pack_batches(np.argsort(-durations, kind="stable"), durations, batch_seconds)
