"""What the model is fed: the clips that train, the duration-bucketed sampler, the collate function,
and the stream of each step's batches.

The training step only slices memory-mapped int16 arrays and pads a batch of similar lengths:
- durations for batching come from the prepared `duration` column (nothing is decoded to measure);
- a batch holds at most `batch_seconds` of audio *including padding* (fairseq's max_tokens);
- an epoch's order is a pure function of (seed, epoch), so a resumed run replays it exactly from a
  saved position without touching the data it skips;
- every process computes the same global batches and takes its own share of each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from phonetune.data.audio import SAMPLE_RATE, pad_waves
from phonetune.data.ctc import count_frames, count_min_frames
from phonetune.data.errors import PhonetuneError
from phonetune.data.prepared import (
    BatchBudget,
    PreparedSplit,
    batches_longest_first,
    open_prepared,
    pack_batches,
    read_report,
    read_vocab,
)

if TYPE_CHECKING:
    from phonetune.train.config import Config, TrainConfig
    from phonetune.train.resume import TrainState

IGNORE_INDEX = -100  # label padding: ignored by the CTC loss, never mistaken for the blank (id 0)


def encode_phones(phones: str, vocab: Mapping[str, int]) -> list[int]:
    """Space-separated phones -> ids. A phone missing from the vocabulary is a KeyError."""
    return [vocab[phone] for phone in phones.split()]


def unknown_phones(phones: Sequence[str], vocab: Mapping[str, int]) -> set[str]:
    return {phone for text in phones for phone in text.split() if phone not in vocab}


# --- the clips that train -------------------------------------------------------------------------
@dataclass
class TrainingData:
    """The prepared vocabulary and splits, with the rows (clips) that train and evaluate."""

    vocab: dict[str, int]
    train: PreparedSplit
    train_rows: np.ndarray
    eval: PreparedSplit | None
    eval_rows: np.ndarray
    versions: dict[str, Any]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> training clips left out


def read_versions(prepared_dir: Path) -> dict[str, Any]:
    """espeak-ng / phonemizer versions of the prepared data, and the libraries training runs with."""
    import transformers

    from phonetune import __version__

    prepared = read_report(prepared_dir).get("versions") or {}
    return {
        "espeak_ng": prepared.get("espeak_ng"),
        "phonemizer": prepared.get("phonemizer"),
        "phonetune_prepare": prepared.get("phonetune"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "phonetune": __version__,
    }


def load_training_data(config: Config) -> TrainingData:
    """The prepared vocabulary and splits, with the training clips filtered by locale and duration."""
    prepared = Path(config.data.prepared_dir)
    splits = open_prepared(prepared, "data.prepared_dir")
    vocab = read_vocab(prepared)
    if config.data.train_split not in splits:
        raise PhonetuneError(
            f"{prepared} has no {config.data.train_split!r} split (it has: {', '.join(splits)}); "
            "set data.train_split"
        )
    train_split = PreparedSplit(splits[config.data.train_split])
    wanted = set(config.data.locales) if config.data.locales else None
    rows = np.arange(len(train_split))
    skipped: dict[str, int] = {}
    if wanted is not None:
        missing = wanted - set(train_split.locales)
        if missing:
            raise PhonetuneError(
                f"data.locales: {', '.join(sorted(missing))} not in the {config.data.train_split} split of "
                f"{prepared} (it has: {', '.join(sorted(set(train_split.locales)))})"
            )
        rows = rows[np.isin(train_split.locales[rows], list(wanted))]
    too_long = train_split.durations[rows] > config.data.max_duration
    skipped["longer_than_max_duration"] = int(too_long.sum())
    rows = rows[~too_long]
    if config.data.max_hours_per_locale is not None:
        capped = cap_hours_per_locale(train_split, rows, config.data.max_hours_per_locale)
        skipped["over_max_hours_per_locale"] = len(rows) - len(capped)
        rows = capped
    unknown = unknown_phones(train_split.column("phones", rows), vocab)
    if unknown:
        raise PhonetuneError(
            f"phones of the {config.data.train_split} split are missing from {prepared}/vocab.json: "
            f"{' '.join(sorted(unknown))}. The prepared directory is inconsistent; prepare it again."
        )

    eval_split, eval_rows = None, np.zeros(0, dtype=np.int64)
    if config.data.eval_split in splits:
        eval_split = PreparedSplit(splits[config.data.eval_split])
        eval_rows = np.arange(len(eval_split))
        if wanted is not None:
            eval_rows = eval_rows[np.isin(eval_split.locales[eval_rows], list(wanted))]
        limit = config.data.eval_max_utterances
        if limit is not None and len(eval_rows) > limit:
            # an evenly spaced subset: every locale and length stays represented, the same every time
            eval_rows = eval_rows[
                np.unique(np.linspace(0, len(eval_rows) - 1, limit).round().astype(int))
            ]
    return TrainingData(
        vocab, train_split, rows, eval_split, eval_rows, read_versions(prepared), skipped
    )


def cap_hours_per_locale(split: PreparedSplit, rows: np.ndarray, max_hours: float) -> np.ndarray:
    """The rows of at most `max_hours` of audio per locale (see `data.max_hours_per_locale`).

    Speakers are taken whole, in the order of a hash of their Common Voice id (not of the file's
    order, so adding clips to a release moves few choices), while they fit; the hours left then
    take single clips of the speakers that did not fit, in the same order. A clip without a
    speaker id counts as a speaker of its own.
    """
    budget = max_hours * 3600
    durations = split.durations
    speakers = split.column("client_id", rows)
    locales = split.locales[rows]
    kept: list[int] = []
    for locale in sorted(set(locales)):
        groups: dict[str, list[int]] = {}
        for i in np.flatnonzero(locales == locale).tolist():
            groups.setdefault(speakers[i] or f"row {rows[i]}", []).append(int(rows[i]))
        order = sorted(groups, key=lambda speaker: hashlib.blake2b(speaker.encode()).digest())
        total, left_over = 0.0, []
        for speaker in order:
            seconds = float(durations[groups[speaker]].sum())
            if total + seconds <= budget:
                kept += groups[speaker]
                total += seconds
            else:
                left_over += groups[speaker]
        for row in left_over:
            if total + durations[row] <= budget:
                kept.append(row)
                total += float(durations[row])
    return np.array(sorted(kept), dtype=rows.dtype)


def drop_unalignable(
    data: TrainingData, conv_layers: Sequence[tuple[int, int]], config: Config
) -> None:
    """Skip training clips with fewer CTC frames than phones (+1 per repeated phone), and clips
    shorter than one SpecAugment time mask.

    The CTC loss of the first is infinite: with ctc_zero_infinity it is zeroed (a wasted clip),
    without it the whole step is lost. `phonetune prepare` already rejects them for the standard
    feature encoder; this catches models with another stride (`conv_layers`, the model's feature
    encoder). A time mask needs a clip at least `mask_time_length` frames long.
    """
    frames = count_frames(data.train.num_samples()[data.train_rows], conv_layers)
    needed = np.array(
        [count_min_frames(text.split()) for text in data.train.column("phones", data.train_rows)],
        dtype=np.int64,
    )
    ok = (frames >= needed) & (needed > 0)
    data.skipped["fewer_frames_than_phones_or_no_phones"] = int((~ok).sum())
    if config.model.mask_time_prob > 0:
        maskable = frames >= config.model.mask_time_length
        data.skipped["shorter_than_mask_time_length"] = int((ok & ~maskable).sum())
        ok &= maskable
    data.train_rows = data.train_rows[ok]


# --- collate --------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A padded batch. Audio is normalised per utterance, padded with 0; labels padded with -100.

    The tensors hold the real clips first, then any zero-weight filler rows (copies of a clip that
    make every process's batch the same shape); `rows`, `locales` and `phones` describe the real
    clips only.
    """

    input_values: torch.Tensor  # (batch, samples) float32
    input_lengths: torch.Tensor  # (batch,) int64 real samples per utterance
    weights: torch.Tensor  # (batch,) float32: 1 for a real clip, 0 for a filler row
    labels: torch.Tensor | None  # (batch, max phones) int64, IGNORE_INDEX-padded; None to evaluate
    label_lengths: torch.Tensor | None  # (batch,) int64
    # The lengths again as plain numbers, for what reads them on the host (PyTorch's CTC loss):
    # never read back from the device.
    samples: list[int] = field(default_factory=list)
    phone_counts: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    locales: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Batch:
        """On `device`, the audio in `dtype` (the other tensors keep theirs). Asynchronous from
        pinned memory (`pin_memory`), as the DataLoader gives it on a GPU."""
        return self._apply(
            lambda t, audio: t.to(device, dtype if audio else None, non_blocking=True)
        )

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        return self._apply(lambda t, audio: t.pin_memory())

    def _apply(self, function: Callable[[torch.Tensor, bool], torch.Tensor]) -> Batch:
        return Batch(
            input_values=function(self.input_values, True),
            input_lengths=function(self.input_lengths, False),
            weights=function(self.weights, False),
            labels=None if self.labels is None else function(self.labels, False),
            label_lengths=None
            if self.label_lengths is None
            else function(self.label_lengths, False),
            samples=self.samples,
            phone_counts=self.phone_counts,
            rows=self.rows,
            locales=self.locales,
            phones=self.phones,
        )


@dataclass(frozen=True)
class Share:
    """One process's part of a global batch: its real clips, then `fillers` zero-weight copies of
    `filler_row`, all padded to `width` samples (the same shape on every process)."""

    rows: np.ndarray
    fillers: int = 0
    filler_row: int = -1
    width: int | None = None


def collate(
    split: PreparedSplit,
    share: Share | Sequence[int],
    vocab: Mapping[str, int] | None = None,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """Slice, normalise and pad the audio of a share (or plain rows: no fillers, the longest clip
    rounded up to a multiple of `pad_to_multiple_of` samples); encode and pad their phones if
    `vocab` is given."""
    if not isinstance(share, Share):
        share = Share(np.asarray(share, dtype=np.int64))
    real = [int(row) for row in share.rows]
    rows = real + [int(share.filler_row)] * share.fillers
    input_values, lengths = pad_waves(split.audio(rows), pad_to_multiple_of, share.width)
    phones = split.column("phones", rows)
    labels = label_lengths = None
    phone_counts: list[int] = []
    if vocab is not None:
        encoded = [encode_phones(text, vocab) for text in phones]
        phone_counts = [len(ids) for ids in encoded]
        label_lengths = torch.tensor(phone_counts, dtype=torch.long)
        longest = max((len(ids) for ids in encoded), default=0)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for i, ids in enumerate(encoded):
            labels[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    weights = torch.zeros(len(rows), dtype=torch.float32)
    weights[: len(real)] = 1.0
    return Batch(
        input_values=torch.from_numpy(input_values),
        input_lengths=torch.from_numpy(lengths),
        weights=weights,
        labels=labels,
        label_lengths=label_lengths,
        samples=lengths.tolist(),
        phone_counts=phone_counts,
        rows=real,
        locales=[str(locale) for locale in split.locales[real]] if real else [],
        phones=phones[: len(real)],
    )


# --- planning batches -----------------------------------------------------------------------------
def plan_epoch(
    durations: np.ndarray,
    batch_seconds: float | BatchBudget,
    seed: int,
    epoch: int,
    num_replicas: int = 1,
    grad_accum: int = 1,
    bucket_width: float = 0.5,
    longest_first: bool = True,
    languages: np.ndarray | None = None,
    alpha: float = 1.0,
) -> list[list[np.ndarray]]:
    """The global batches of one epoch, each split into one share per process.

    A pure function of its arguments. `batch_seconds` is the budget of one process, so a global
    batch holds at most `batch_seconds × num_replicas` of padded audio: N processes with budget B
    cut exactly the batches that one process with budget N×B cuts, and (with the loss normalised by
    the step's global token count) train the same model up to floating-point summation order.
    A `BatchBudget` gives each batch the budget of its width.
    Clips are sorted by duration bucket (random order inside a bucket) and packed into global
    batches; the batches are shuffled (the longest first if asked) and each is split into
    `num_replicas` consecutive shares of near-equal clip counts. A share can thus exceed the
    per-process budget by one clip when the clip count is not a multiple of the process count.
    A global batch with fewer clips than processes leaves shares empty: the sampler gives those
    processes a zero-weight copy of a clip (see `DurationBatchSampler`). Batches beyond a multiple
    of `grad_accum` are left to the next epoch's reshuffle. Values are positions into `durations`.

    With `languages` (an integer per clip) and `alpha` < 1, the epoch's clips are first drawn per
    language (`draw_by_language`): a position can then appear more than once.
    """
    if len(durations) == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    pool = np.arange(len(durations))
    if languages is not None and alpha != 1.0:
        pool = draw_by_language(durations, languages, alpha, rng)
    # On a width grid, durations are multiples of the grid, and a division can land a hair below
    # the integer (1.4 / 0.1 = 13.9999...): without the allowance such a width falls into the
    # bucket below, shared with the next narrower width, and batches mix the two (BENCHMARKS.md:
    # 1.0% padding instead of 1.6% at 0.1 s).
    buckets = np.floor(durations[pool] / bucket_width + 1e-9)
    order = pool[np.lexsort((rng.random(len(pool)), buckets))]
    batches = pack_batches(order, durations, batch_seconds * num_replicas)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if longest_first:
        longest = max(range(len(batches)), key=lambda i: durations[batches[i]].max())
        batches.insert(0, batches.pop(longest))
    batches = batches[: len(batches) - len(batches) % grad_accum]
    return [np.array_split(batch, num_replicas) for batch in batches]


def language_shares(seconds: np.ndarray, alpha: float) -> np.ndarray:
    """Each language's share of an epoch, p_l ∝ n_l^alpha (n_l its seconds of audio): 1 keeps
    the data's own proportions, smaller values move towards equal shares (XLS-R, MMS)."""
    weights = seconds**alpha  # (0 stays 0: alpha > 0)
    return weights / weights.sum()


def draw_by_language(
    durations: np.ndarray, languages: np.ndarray, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """The positions of one epoch's clips when each language l gets `language_shares` p_l of the
    epoch's audio, whose total stays that of the data: a language above its share gives a random
    subset of its clips, one below it all of them as many whole times as fit plus a random subset.
    A subset takes clips in random order while they fit its seconds."""
    seconds = np.bincount(languages, weights=durations)
    targets = language_shares(seconds, alpha) * seconds.sum()
    pieces = []
    for language in np.flatnonzero(seconds > 0):  # in a fixed order: the same draws on resume
        members = np.flatnonzero(languages == language)
        whole, rest = divmod(float(targets[language]), float(seconds[language]))
        pieces += [members] * int(whole)
        shuffled = members[rng.permutation(len(members))]
        fits = np.cumsum(durations[shuffled]) <= rest
        pieces.append(shuffled[fits])
    return np.concatenate(pieces)


def plan_eval(
    durations: np.ndarray, batch_seconds: float, num_replicas: int = 1, rank: int = 0
) -> list[np.ndarray]:
    """Evaluation batches of this process: longest first, each clip in exactly one process's batches."""
    return batches_longest_first(durations, batch_seconds)[rank::num_replicas]


def padding_fraction(durations: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Fraction of the padded audio of `batches` that is padding."""
    real = sum(float(durations[b].sum()) for b in batches)
    padded = sum(float(durations[b].max()) * len(b) for b in batches)
    return 0.0 if padded == 0 else 1.0 - real / padded


class DurationBatchSampler:
    """Yields this process's `Share` of each global batch of `plan_epoch`, from a resumable
    position.

    Every process's share of a global batch has the same shape: padded to the width of the
    batch's longest clip (rounded up to a multiple of `pad_to_multiple_of` samples) and to the same
    number of rows, filled with zero-weight copies of a clip where a share has fewer clips. A step
    therefore costs every process the same (none waits for another's longer batch), and an empty
    share (fewer clips than processes) still joins the gradient reduction. With
    `pad_clips_to_budget`, every batch also holds as many rows as the budget fits at its width, so
    the number of distinct batch shapes is at most the number of widths (`shapes`): on a GPU each
    new shape costs new kernel plans and allocations.

    `position` is where iteration starts: the global batches of the epoch already consumed (the same
    number on every process). The consumer counts what it consumed (DataLoader workers read
    ahead) and restores it with `set_epoch(epoch, position)` or `load_state_dict`.
    """

    def __init__(
        self,
        rows: np.ndarray,
        durations: np.ndarray,
        batch_seconds: float | BatchBudget,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        bucket_width: float = 0.5,
        longest_first: bool = True,
        num_samples: np.ndarray | None = None,
        pad_to_multiple_of: int = 1,
        pad_clips_to_budget: bool = False,
        languages: np.ndarray | None = None,
        language_names: Sequence[str] = (),
        language_alpha: float = 1.0,
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        # An integer per clip, index into `language_names`: drawn by with language_alpha < 1,
        # counted by `step_totals` always.
        self.languages = languages
        self.language_names = list(language_names)
        self.durations = np.asarray(durations, dtype=np.float64)
        if num_samples is None:
            num_samples = np.round(self.durations * SAMPLE_RATE)
        self.samples = np.asarray(num_samples, dtype=np.int64)
        self.multiple = pad_to_multiple_of
        self.widths = -(-self.samples // pad_to_multiple_of) * pad_to_multiple_of
        # Batches are cut by padded seconds: on a width grid, by the rounded-up widths.
        self.packing_seconds = (
            self.durations if pad_to_multiple_of == 1 else self.widths / SAMPLE_RATE
        )
        self.batch_seconds = batch_seconds
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.grad_accum = grad_accum
        self.bucket_width = bucket_width
        self.longest_first = longest_first
        self.pad_clips_to_budget = pad_clips_to_budget
        self.language_alpha = language_alpha
        self.epoch = 0
        self.position = 0
        self._plan: list[list[np.ndarray]] = []
        self._planned_epoch: int | None = None

    def plan(self) -> list[list[np.ndarray]]:
        """This epoch's global batches split into shares (positions into `rows`), planned once."""
        if self._planned_epoch != self.epoch:
            self._plan = plan_epoch(
                self.packing_seconds,
                self.batch_seconds,
                self.seed,
                self.epoch,
                self.num_replicas,
                self.grad_accum,
                self.bucket_width,
                self.longest_first,
                self.languages,
                self.language_alpha,
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

    def shape(self, shares: list[np.ndarray]) -> tuple[int, int]:
        """(rows, samples) of every process's share of the global batch `shares`."""
        width = int(self.widths[np.concatenate(shares)].max())
        rows = max(len(share) for share in shares)
        if self.pad_clips_to_budget:
            seconds = self.batch_seconds
            if isinstance(seconds, BatchBudget):
                seconds = seconds(width / SAMPLE_RATE)
            capacity = int(seconds * self.num_replicas * SAMPLE_RATE) // width
            rows = max(rows, capacity // self.num_replicas)
        return rows, width

    def share(self, position: int) -> Share:
        """This process's share of the global batch at `position` of the epoch."""
        shares = self.plan()[position]
        rows, width = self.shape(shares)
        mine = shares[self.rank]
        first = next(share[0] for share in shares if len(share))
        return Share(self.rows[mine], rows - len(mine), int(self.rows[first]), width)

    def step_totals(self, positions: range, tokens: np.ndarray | None) -> dict[str, Any]:
        """What the global batches at `positions` hold, over every process: real audio, padded
        audio (filler rows count as padding), utterances and (with `tokens`, the label count of each
        of `rows`) label tokens. Known to every process without communication."""
        audio = padded = utterances = labels = 0
        by_language = np.zeros(len(self.language_names))
        for position in positions:
            shares = self.plan()[position]
            rows, width = self.shape(shares)
            everyone = np.concatenate(shares)
            audio += int(self.samples[everyone].sum())
            if self.languages is not None:
                by_language += np.bincount(
                    self.languages[everyone], self.samples[everyone], len(by_language)
                )
            padded += rows * width * self.num_replicas
            utterances += len(everyone)
            labels += int(tokens[everyone].sum()) if tokens is not None else 0
        return {
            "audio_seconds": audio / SAMPLE_RATE,
            "padded_seconds": padded / SAMPLE_RATE,
            "utterances": utterances,
            "tokens": labels,
            "language_seconds": {
                name: float(samples) / SAMPLE_RATE
                for name, samples in zip(self.language_names, by_language, strict=True)
            },
        }

    def plan_digest(self) -> str:
        """sha256 of this epoch's global batches (the dataset rows of each, batch after batch):
        the same for any process count that cuts the same global batches. A resumed run compares
        it with its checkpoint's to know it continues the same data order, whatever changed (the
        data, the batching settings or this sampler's code)."""
        digest = hashlib.sha256()
        for shares in self.plan():
            rows = self.rows[np.concatenate(shares)].astype("<i8")
            digest.update(np.int64(len(rows)).astype("<i8").tobytes())
            digest.update(rows.tobytes())
        return digest.hexdigest()

    def shapes(self) -> set[tuple[int, int]]:
        """The distinct (rows, samples) batch shapes of this epoch."""
        return {self.shape(shares) for shares in self.plan()}

    def __iter__(self) -> Iterator[Share]:
        for position in range(self.position, self.batches_per_epoch()):
            yield self.share(position)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]))


def batch_budget(train: TrainConfig) -> float | BatchBudget:
    """`train.batch_seconds`, or with `train.batch_seconds_by_width` the budget by width."""
    if not train.batch_seconds_by_width:
        return train.batch_seconds
    table = sorted((float(w), float(s)) for w, s in train.batch_seconds_by_width.items())
    return BatchBudget(train.batch_seconds, tuple(table))


def make_sampler(
    data: TrainingData, config: Config, num_replicas: int = 1, rank: int = 0
) -> DurationBatchSampler:
    """The sampler of `config.train`'s batches over the training clips, for process `rank`."""
    t = config.train
    names, languages = np.unique(data.train.locales[data.train_rows], return_inverse=True)
    return DurationBatchSampler(
        data.train_rows,
        data.train.durations[data.train_rows],
        batch_budget(t),
        t.seed,
        num_replicas,
        rank,
        t.grad_accum,
        t.bucket_width,
        t.longest_first,
        num_samples=data.train.num_samples()[data.train_rows],
        pad_to_multiple_of=t.pad_to_multiple_of,
        pad_clips_to_budget=t.pad_clips_to_budget,
        languages=languages,
        language_names=[str(name) for name in names],
        language_alpha=config.data.language_sampling_alpha,
    )


# --- DataLoader plumbing ----------------------------------------------------------------------
class BatchReader(torch.utils.data.Dataset):
    """A map-style dataset whose keys are whole batches (the sampler's shares, or rows)."""

    def __init__(
        self, split: PreparedSplit, vocab: Mapping[str, int] | None, pad_to_multiple_of: int = 1
    ) -> None:
        self.split = split
        self.vocab = vocab
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, share: Share | np.ndarray) -> Batch:
        return collate(self.split, share, self.vocab, self.pad_to_multiple_of)


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


@dataclass
class StepBatches:
    """One optimizer step's batches of this process, and what the whole step holds over every
    process (from the plan: the same numbers everywhere, no communication)."""

    batches: list[Batch]
    normaliser: float  # label tokens of the step (or utterances, with ctc_loss_reduction "mean")
    audio_seconds: float
    padded_seconds: float
    locale_seconds: dict[str, float] = field(default_factory=dict)  # of audio_seconds


class BatchStream:
    """This process's shares of the global batches, `grad_accum` at a time, across epochs, from a
    resumable position."""

    def __init__(
        self,
        data: TrainingData,
        sampler: DurationBatchSampler,
        config: Config,
        pin_memory: bool,
    ) -> None:
        self.data, self.sampler, self.config, self.pin_memory = data, sampler, config, pin_memory
        self.iterator = None
        # Label tokens per sampler position, for the step's loss normaliser.
        phones = data.train.column("num_phones", data.train_rows)
        self.tokens = np.asarray(phones, dtype=np.int64)

    def next_step(self, state: TrainState) -> StepBatches:
        accum = self.config.train.grad_accum
        if state.position >= self.sampler.batches_per_epoch():
            state.epoch, state.position = state.epoch + 1, 0
            self.iterator = None
        if self.iterator is None:
            self.sampler.set_epoch(state.epoch, state.position)
            loader = make_loader(
                self.data.train,
                self.sampler,
                self.data.vocab,
                self.config.data.num_workers,
                self.pin_memory,
                self.config.train.pad_to_multiple_of,
            )
            self.iterator = iter(loader)
        batches = [next(self.iterator) for _ in range(accum)]
        totals = self.sampler.step_totals(
            range(state.position, state.position + accum), self.tokens
        )
        state.position += accum
        per_utterance = self.config.model.ctc_loss_reduction == "mean"
        return StepBatches(
            batches,
            float(totals["utterances"] if per_utterance else totals["tokens"]),
            totals["audio_seconds"],
            totals["padded_seconds"],
            totals["language_seconds"],
        )
