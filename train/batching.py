"""From a prepared split to padded batches: the duration-bucketed sampler and the collate function.

The training step only slices memory-mapped int16 arrays and pads a batch of similar lengths:
- durations for batching come from the prepared `duration` column (nothing is decoded to measure);
- a batch holds at most `batch_seconds` of audio *including padding* (fairseq's max_tokens);
- an epoch's order is a pure function of (seed, epoch), so a resumed run replays it exactly from a
  saved position without touching the data it skips;
- every process computes the same global batches and takes its own share of each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from data.errors import PhonetuneError

SAMPLE_RATE = 16_000
IGNORE_INDEX = -100  # label padding: ignored by the CTC loss, never mistaken for the blank (id 0)


# --- audio normalisation --------------------------------------------------------------------------
def normalize_audio(samples: np.ndarray) -> np.ndarray:
    """One utterance -> float32 with zero mean and unit variance over its samples.

    The same computation as `Wav2Vec2FeatureExtractor(do_normalize=True)` (what the released model's
    processor applies at inference): float32, `(x - mean) / sqrt(var + 1e-7)`. int16 PCM is first
    scaled to [-1, 1) as the feature extractor would receive it from an audio decoder. This is the one
    place training normalises audio; export and inference must match it.
    """
    audio = np.asarray(samples, dtype=np.float32)
    if samples.dtype == np.int16:
        audio = audio / np.float32(32768.0)
    return (audio - audio.mean()) / np.sqrt(audio.var() + np.float32(1e-7))


# --- reading a prepared split ---------------------------------------------------------------------
class PreparedSplit:
    """One split of a prepared dataset, read column by column from its memory-mapped Arrow table.

    `rows` everywhere are row numbers of the split as saved by `phonetune prepare`.
    """

    def __init__(self, dataset) -> None:  # noqa: ANN001 - datasets.Dataset
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

    def column(self, name: str, rows: Sequence[int]) -> list:
        return (
            self.dataset.data.table.column(name).take(np.asarray(rows, dtype=np.int64)).to_pylist()
        )


def encode_phones(phones: str, vocab: Mapping[str, int]) -> list[int]:
    """Space-separated phones -> ids. A phone missing from the vocabulary is a KeyError."""
    return [vocab[phone] for phone in phones.split()]


def unknown_phones(phones: Sequence[str], vocab: Mapping[str, int]) -> set[str]:
    return {phone for text in phones for phone in text.split() if phone not in vocab}


# --- collate --------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A padded batch. Audio is normalised per utterance, padded with 0; labels padded with -100."""

    input_values: torch.Tensor  # (batch, samples) float32
    attention_mask: torch.Tensor  # (batch, samples) int64: 1 for real samples, 0 for padding
    input_lengths: torch.Tensor  # (batch,) int64 real samples per utterance
    labels: (
        torch.Tensor | None
    )  # (batch, max phones) int64, IGNORE_INDEX-padded; None for evaluation
    label_lengths: torch.Tensor | None  # (batch,) int64
    rows: list[int] = field(default_factory=list)
    locales: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)

    @property
    def audio_seconds(self) -> float:
        return float(self.input_lengths.sum()) / SAMPLE_RATE

    @property
    def padded_seconds(self) -> float:
        return self.input_values.numel() / SAMPLE_RATE

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Batch:
        """On `device`, the audio in `dtype` (the other tensors keep theirs)."""
        move = {"non_blocking": True}
        return Batch(
            input_values=self.input_values.to(device, dtype, **move),
            attention_mask=self.attention_mask.to(device, **move),
            input_lengths=self.input_lengths.to(device, **move),
            labels=None if self.labels is None else self.labels.to(device, **move),
            label_lengths=None
            if self.label_lengths is None
            else self.label_lengths.to(device, **move),
            rows=self.rows,
            locales=self.locales,
            phones=self.phones,
        )


def collate(
    split: PreparedSplit,
    rows: Sequence[int],
    vocab: Mapping[str, int] | None = None,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """Slice, normalise and pad the audio of `rows` (to the longest clip, rounded up to a multiple
    of `pad_to_multiple_of` samples); encode and pad their phones if `vocab` is given."""
    rows = [int(row) for row in rows]
    waves = split.audio(rows)
    lengths = np.array([len(wave) for wave in waves], dtype=np.int64)
    width = -(-int(lengths.max(initial=1)) // pad_to_multiple_of) * pad_to_multiple_of
    input_values = np.zeros((len(rows), width), dtype=np.float32)
    attention_mask = np.zeros(input_values.shape, dtype=np.int64)
    for i, wave in enumerate(waves):
        input_values[i, : len(wave)] = normalize_audio(wave)
        attention_mask[i, : len(wave)] = 1
    phones = split.column("phones", rows)
    labels = label_lengths = None
    if vocab is not None:
        encoded = [encode_phones(text, vocab) for text in phones]
        label_lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        longest = max((len(ids) for ids in encoded), default=0)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for i, ids in enumerate(encoded):
            labels[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return Batch(
        input_values=torch.from_numpy(input_values),
        attention_mask=torch.from_numpy(attention_mask),
        input_lengths=torch.from_numpy(lengths),
        labels=labels,
        label_lengths=label_lengths,
        rows=rows,
        locales=[str(locale) for locale in split.locales[rows]] if rows else [],
        phones=phones,
    )


# --- planning batches -----------------------------------------------------------------------------
def pack_batches(
    order: np.ndarray, durations: np.ndarray, batch_seconds: float
) -> list[np.ndarray]:
    """Cut `order` (positions into `durations`) greedily into batches whose padded size
    (clips × longest clip) stays within `batch_seconds`. A clip longer than the budget gets a batch alone."""
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


def plan_epoch(
    durations: np.ndarray,
    batch_seconds: float,
    seed: int,
    epoch: int,
    num_replicas: int = 1,
    grad_accum: int = 1,
    bucket_width: float = 0.5,
    longest_first: bool = True,
) -> list[list[np.ndarray]]:
    """The global batches of one epoch, each split into one share per process.

    A pure function of its arguments. `batch_seconds` is the budget of one process, so a global
    batch holds at most `batch_seconds × num_replicas` of padded audio: N processes with budget B
    cut exactly the batches that one process with budget N×B cuts, and (with the loss normalised by
    the step's global token count) train the same model up to floating-point summation order.
    Clips are sorted by duration bucket (random order inside a bucket) and packed into global
    batches; the batches are shuffled (the longest first if asked) and each is split into
    `num_replicas` consecutive shares of near-equal clip counts. A share can thus exceed the
    per-process budget by one clip when the clip count is not a multiple of the process count.
    A global batch with fewer clips than processes leaves shares empty: the sampler gives those
    processes a zero-weight copy of a clip (see `DurationBatchSampler`). Batches beyond a multiple
    of `grad_accum` are left to the next epoch's reshuffle. Values are positions into `durations`.
    """
    if len(durations) == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    buckets = np.floor(durations / bucket_width)
    order = np.lexsort((rng.random(len(durations)), buckets))
    batches = pack_batches(order, durations, batch_seconds * num_replicas)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if longest_first:
        longest = max(range(len(batches)), key=lambda i: durations[batches[i]].max())
        batches.insert(0, batches.pop(longest))
    batches = batches[: len(batches) - len(batches) % grad_accum]
    return [np.array_split(batch, num_replicas) for batch in batches]


def plan_eval(
    durations: np.ndarray, batch_seconds: float, num_replicas: int = 1, rank: int = 0
) -> list[np.ndarray]:
    """Evaluation batches of this process: longest first, each clip in exactly one process's batches."""
    order = np.argsort(-durations, kind="stable")
    batches = pack_batches(order, durations, batch_seconds)
    return batches[rank::num_replicas]


def padding_fraction(durations: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Fraction of the padded audio of `batches` that is padding."""
    real = sum(float(durations[b].sum()) for b in batches)
    padded = sum(float(durations[b].max()) * len(b) for b in batches)
    return 0.0 if padded == 0 else 1.0 - real / padded


class DurationBatchSampler:
    """Yields this process's share (dataset rows) of each global batch of `plan_epoch`, from a
    resumable position.

    `position` is where iteration starts: the global batches of the epoch already consumed (the same
    number on every process). The consumer counts what it consumed (DataLoader workers read
    ahead) and restores it with `set_epoch(epoch, position)` or `load_state_dict`.
    """

    def __init__(
        self,
        rows: np.ndarray,
        durations: np.ndarray,
        batch_seconds: float,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        bucket_width: float = 0.5,
        longest_first: bool = True,
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_seconds = batch_seconds
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.grad_accum = grad_accum
        self.bucket_width = bucket_width
        self.longest_first = longest_first
        self.epoch = 0
        self.position = 0
        self._plan: list[list[np.ndarray]] = []
        self._planned_epoch: int | None = None

    def plan(self) -> list[list[np.ndarray]]:
        """This epoch's global batches split into shares (positions into `rows`), planned once."""
        if self._planned_epoch != self.epoch:
            self._plan = plan_epoch(
                self.durations,
                self.batch_seconds,
                self.seed,
                self.epoch,
                self.num_replicas,
                self.grad_accum,
                self.bucket_width,
                self.longest_first,
            )
            self._planned_epoch = self.epoch
        return self._plan

    def batches_per_epoch(self) -> int:
        return len(self.plan())

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch = epoch
        self.position = position
        if not 0 <= position <= self.batches_per_epoch():
            raise PhonetuneError(
                f"sampler position {position} is outside epoch {epoch}, which has "
                f"{self.batches_per_epoch()} global batches"
            )

    def __iter__(self) -> Iterator[np.ndarray]:
        for shares in self.plan()[self.position :]:
            # An empty share still needs a forward/backward pass, or the other processes would
            # wait for this one's gradients: it gets a copy of the batch's first clip, which the
            # training step weighs by zero (`is_ghost`).
            share = shares[self.rank]
            yield self.rows[share if len(share) else shares[0][:1]]

    def is_ghost(self, position: int) -> bool:
        """Whether this process's batch at `position` of the epoch is a zero-weight copy."""
        return len(self.plan()[position][self.rank]) == 0

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]))


# --- DataLoader plumbing ----------------------------------------------------------------------
class BatchReader(torch.utils.data.Dataset):
    """A map-style dataset whose keys are whole batches of rows (the sampler's output)."""

    def __init__(
        self, split: PreparedSplit, vocab: Mapping[str, int] | None, pad_to_multiple_of: int = 1
    ) -> None:
        self.split = split
        self.vocab = vocab
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, rows: np.ndarray) -> Batch:
        return collate(self.split, rows, self.vocab, self.pad_to_multiple_of)


def _as_is(batch: Batch) -> Batch:
    return batch


def make_loader(
    split: PreparedSplit,
    batches: Sequence[np.ndarray] | DurationBatchSampler,
    vocab: Mapping[str, int] | None,
    num_workers: int = 0,
    pin_memory: bool = False,
    pad_to_multiple_of: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader that collates each batch of rows (in `num_workers` processes if > 0)."""
    return torch.utils.data.DataLoader(
        BatchReader(split, vocab, pad_to_multiple_of),
        batch_size=None,
        sampler=batches,
        num_workers=num_workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        # Its own generator: creating an iterator must not draw from the global torch RNG, or a
        # resumed run (which creates one at a different moment) would mask and drop out differently.
        generator=torch.Generator(),
    )
