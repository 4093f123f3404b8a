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
from pathlib import Path
from typing import Any

import numpy as np

from phonetune.data.errors import PhonetuneError
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
    datasets.disable_progress_bars()
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise PhonetuneError(
            f"{option}={path}: the prepared dataset cannot be read ({error}); prepare it again"
        ) from None


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


def pack_batches(
    order: np.ndarray, durations: np.ndarray, batch_seconds: float
) -> list[np.ndarray]:
    """Cut `order` (positions into `durations`) greedily into batches whose padded size
    (clips × longest clip) stays within `batch_seconds`. A clip longer than the budget gets a batch
    alone. Sorted by duration, consecutive clips pad little; `durations` already rounded to a
    width grid make the budget count the padding that grid adds."""
    batches: list[np.ndarray] = []
    start, longest = 0, 0.0
    for i, position in enumerate(order):
        duration = durations[position]
        longest_if_added = max(longest, duration)
        if i > start and (i - start + 1) * longest_if_added > batch_seconds:
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
