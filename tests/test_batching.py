"""The duration-bucketed sampler and the collate function."""

import numpy as np
import pytest
import torch
from helpers import normalisation_tolerance

from phonetune.data.audio import normalize_audio
from phonetune.data.prepared import PreparedSplit, pack_batches
from phonetune.train.batching import (
    IGNORE_INDEX,
    DurationBatchSampler,
    Share,
    collate,
    make_loader,
    padding_fraction,
    plan_epoch,
    plan_eval,
)


def durations(n=500, seed=0):
    return np.random.default_rng(seed).uniform(1.0, 10.0, n)


def flat(groups):
    return np.concatenate([batch for group in groups for batch in group])


def test_normalisation_matches_the_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    pcm = (np.random.default_rng(1).normal(0, 3000, 16_000) + 500).astype(np.int16)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor(pcm.astype(np.float32) / 32768.0, sampling_rate=16_000).input_values[0]
    ours = normalize_audio(pcm)
    assert ours.dtype == np.float32
    tolerance = normalisation_tolerance(len(pcm), np.abs(expected).max())
    np.testing.assert_allclose(ours, expected, rtol=0, atol=tolerance)
    assert abs(ours.mean()) < tolerance and ours.std() == pytest.approx(1.0, abs=tolerance)


def test_batches_respect_the_budget_including_padding():
    d = durations()
    for batch in pack_batches(np.argsort(d), d, 30.0):
        assert len(batch) * d[batch].max() <= 30.0 + 1e-9
    # a clip longer than the budget still gets a batch of its own
    assert [list(b) for b in pack_batches(np.array([0, 1]), np.array([5.0, 50.0]), 30.0)] == [
        [0],
        [1],
    ]


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch_and_covers_every_clip():
    d = durations()
    first = plan_epoch(d, 30.0, seed=3, epoch=0)
    again = plan_epoch(d, 30.0, seed=3, epoch=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert sorted(flat(first)) == list(range(len(d)))  # every clip exactly once
    other_epoch = plan_epoch(d, 30.0, seed=3, epoch=1)
    other_seed = plan_epoch(d, 30.0, seed=4, epoch=0)
    assert not np.array_equal(flat(first), flat(other_epoch))
    assert not np.array_equal(flat(first), flat(other_seed))


def test_padding_stays_small_and_longest_batch_comes_first():
    d = durations(2000)
    groups = plan_epoch(d, 60.0, seed=0, epoch=0, bucket_width=0.5)
    batches = [g[0] for g in groups]
    assert padding_fraction(d, batches) < 0.08
    assert d[batches[0]].max() == d.max()
    shuffled = [d[b].max() for b in batches[1:]]
    assert shuffled != sorted(shuffled)  # batch order is shuffled, not sorted by length


def test_processes_split_the_global_batches_one_process_with_their_total_budget_cuts():
    d = durations(301)
    alone = plan_epoch(d, 60.0, seed=0, epoch=2, grad_accum=2)
    shared = plan_epoch(d, 20.0, seed=0, epoch=2, num_replicas=3, grad_accum=2)
    assert len(shared) == len(alone) and len(shared) % 2 == 0
    for (whole,), shares in zip(alone, shared, strict=True):
        assert len(shares) == 3
        assert np.array_equal(np.concatenate(shares), whole)  # consecutive, nothing lost or added
        assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
    # Every clip once, except the batches beyond a multiple of grad_accum (at most one).
    seen = np.concatenate([np.concatenate(shares) for shares in shared])
    assert len(seen) == len(set(seen.tolist()))
    assert len(seen) >= 301 - max(len(b) for b in pack_batches(np.argsort(d), d, 60.0))


def test_a_process_with_an_empty_share_gets_zero_weight_copies():
    d = np.array([12.0, 11.0, 1.0, 1.2, 1.1, 0.9])  # the long clips fill a 2 x 10 s budget alone
    samplers = [DurationBatchSampler(np.arange(6) + 100, d, 10.0, 0, 2, r) for r in range(2)]
    per_rank = [list(sampler) for sampler in samplers]
    assert len(per_rank[0]) == len(per_rank[1])  # both processes step together
    empty = [len(share.rows) == 0 for share in per_rank[1]]
    assert not any(len(share.rows) == 0 for share in per_rank[0]) and any(empty)
    for mine, other in zip(per_rank[1], per_rank[0], strict=True):
        # the same shape on both processes; an empty share is made of copies of a clip the other
        # process trains on, weighed by zero
        assert len(mine.rows) + mine.fillers == len(other.rows) + other.fillers
        assert mine.width == other.width
        if len(mine.rows) == 0:
            assert mine.fillers >= 1 and mine.filler_row == other.rows[0]
    real = [share.rows for rank in range(2) for share in per_rank[rank]]
    assert sorted(np.concatenate(real).tolist()) == list(range(100, 106))


def test_every_process_pads_to_the_global_batch_and_shapes_are_bounded():
    d = durations(400)
    samples = np.round(d * 16_000).astype(np.int64)
    grid = 1600
    widths = set()
    for fill in (False, True):
        samplers = [
            DurationBatchSampler(
                np.arange(400),
                d,
                20.0,
                0,
                3,
                rank,
                num_samples=samples,
                pad_to_multiple_of=grid,
                pad_clips_to_budget=fill,
            )  # fmt: skip
            for rank in range(3)
        ]
        shares = [list(sampler) for sampler in samplers]
        for position, together in enumerate(zip(*shares, strict=True)):
            shapes = {(len(s.rows) + s.fillers, s.width) for s in together}
            assert len(shapes) == 1  # no process waits for another's wider or longer batch
            ((rows, width),) = shapes
            everyone = np.concatenate([s.rows for s in together])
            assert width % grid == 0 and width - grid < samples[everyone].max() <= width
            if fill:  # as many rows as the budget holds at this width, padding included
                assert rows == max(int(20.0 * 3 * 16_000) // width // 3, -(-len(everyone) // 3))
            totals = samplers[0].step_totals(range(position, position + 1), None)
            assert totals["padded_seconds"] == pytest.approx(3 * rows * width / 16_000)
            assert totals["audio_seconds"] == pytest.approx(samples[everyone].sum() / 16_000)
            widths.add(width)
        if fill:  # one shape per width
            assert len(samplers[0].shapes()) == len({w for _, w in samplers[0].shapes()})
    assert max(len(s.shapes()) for s in samplers) <= len(widths)


@pytest.mark.parametrize("grid_seconds", [0.1, 0.2, 0.25, 0.5])
def test_a_bucket_as_wide_as_the_grid_holds_one_width(grid_seconds):
    """With bucket_width equal to the width grid, each bucket is one width, so a batch spans two
    widths only where a bucket's last clips are packed with the next bucket's first: at most
    one such batch per width. (Widths like 1.4 s divided by 0.2 s give 6.9999..., which once put
    one width into two buckets and mixed widths in half the batches.)"""
    d = durations(3000, seed=1)  # not the sampler's stream for seed 0, epoch 0: default_rng([0, 0])
    grid = round(grid_seconds * 16_000)
    sampler = DurationBatchSampler(
        np.arange(len(d)), d, 40.0, 0, bucket_width=grid_seconds, pad_to_multiple_of=grid
    )
    widths_of = [set(sampler.widths[shares[0]].tolist()) for shares in sampler.plan()]
    mixed = sum(len(widths) > 1 for widths in widths_of)
    assert mixed < len(set(sampler.widths.tolist()))


def test_sampler_resumes_mid_epoch_without_reading_the_skipped_batches():
    d = durations(200)
    sampler = DurationBatchSampler(np.arange(200), d, 25.0, seed=7)
    sampler.set_epoch(1)
    full = list(sampler)
    resumed = DurationBatchSampler(np.arange(200), d, 25.0, seed=7)
    resumed.load_state_dict({"epoch": 1, "position": 5})
    rest = list(resumed)
    assert len(rest) == len(full) - 5
    assert all(np.array_equal(a.rows, b.rows) for a, b in zip(full[5:], rest, strict=True))
    assert resumed.state_dict() == {"epoch": 1, "position": 5}


def test_eval_plan_gives_each_clip_to_exactly_one_process():
    d = durations(97)
    shares = [plan_eval(d, 30.0, num_replicas=4, rank=r) for r in range(4)]
    clips = np.concatenate([b for share in shares for b in share])
    assert sorted(clips.tolist()) == list(range(97))


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    """A split with known audio, written and memory-mapped the way `phonetune prepare` does."""
    from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_from_disk

    rng = np.random.default_rng(0)
    lengths = [16_000, 8_000, 24_000, 12_345]
    rows = {
        "audio": [rng.integers(-8000, 8000, n).astype(np.int16) for n in lengths],
        "phones": ["a b", "b", "a a b c", "c"],
        "locale": ["en", "fr", "en", "de"],
        "duration": [n / 16_000 for n in lengths],
    }
    features = Features(
        {
            "audio": Sequence(Value("int16")),
            "phones": Value("string"),
            "locale": Value("string"),
            "duration": Value("float32"),
        }
    )
    path = tmp_path_factory.mktemp("split") / "prep"
    # small shards, so that rows come from several Arrow chunks
    DatasetDict({"train": Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(path), max_shard_size=60_000
    )
    split = PreparedSplit(load_from_disk(str(path))["train"])
    return split, rows


def test_collate_slices_normalises_and_pads(tiny_split):
    split, rows = tiny_split
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6}
    assert split.num_samples().tolist() == [len(a) for a in rows["audio"]]
    batch = collate(split, [2, 1, 3], vocab)
    assert batch.input_values.shape == (3, 24_000) and batch.input_values.dtype == torch.float32
    assert batch.input_lengths.tolist() == [24_000, 8_000, 12_345]
    assert batch.weights.tolist() == [1.0, 1.0, 1.0]
    # The same function on the same samples: the same numbers.
    np.testing.assert_array_equal(
        batch.input_values[1, :8000].numpy(), normalize_audio(rows["audio"][1])
    )
    assert torch.all(batch.input_values[1, 8000:] == 0)
    assert batch.labels.tolist() == [
        [4, 4, 5, 6],
        [5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch.label_lengths.tolist() == [4, 1, 1]
    assert batch.locales == ["en", "fr", "de"] and batch.phones == ["a a b c", "b", "c"]
    assert batch.rows == [2, 1, 3]
    evaluation = collate(split, [0], None)
    assert evaluation.labels is None and evaluation.phones == ["a b"]
    # a share: its clips, then zero-weight copies of another, all padded to the global width
    shared = collate(split, Share(np.array([1]), fillers=2, filler_row=3, width=30_000), vocab)
    assert shared.input_values.shape == (3, 30_000) and shared.weights.tolist() == [1.0, 0.0, 0.0]
    assert shared.input_lengths.tolist() == [8_000, 12_345, 12_345]
    assert (
        shared.rows == [1] and shared.phones == ["b"] and shared.label_lengths.tolist() == [1, 1, 1]
    )
    assert torch.equal(shared.input_values[1], shared.input_values[2])


def test_loader_with_workers_gives_the_same_batches(tiny_split):
    split, _ = tiny_split
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6}
    plan = [np.array([0, 1]), np.array([3]), np.array([2])]
    in_process = list(make_loader(split, plan, vocab, num_workers=0))
    with_workers = list(make_loader(split, plan, vocab, num_workers=2))
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a.input_values, b.input_values) and torch.equal(a.labels, b.labels)
    state = torch.get_rng_state()
    iter(make_loader(split, plan, vocab))
    assert torch.equal(
        state, torch.get_rng_state()
    )  # creating an iterator draws nothing from torch's RNG


def test_padding_to_a_multiple_rounds_only_the_batch_width(tiny_split):
    split, _ = tiny_split
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6}
    plain = collate(split, [1, 3], vocab)
    rounded = collate(split, [1, 3], vocab, pad_to_multiple_of=1600)
    assert plain.input_values.shape == (2, 12_345) and rounded.input_values.shape == (2, 12_800)
    assert torch.equal(rounded.input_values[:, :12_345], plain.input_values)
    assert torch.all(rounded.input_values[:, 12_345:] == 0)
    assert rounded.input_lengths.tolist() == [8_000, 12_345]
    assert torch.equal(rounded.labels, plain.labels)
    # an exact multiple stays as it is; the loader (and its workers) pass the setting on
    assert collate(split, [2], vocab, pad_to_multiple_of=1600).input_values.shape == (1, 24_000)
    loaded = next(iter(make_loader(split, [np.array([1, 3])], vocab, 1, pad_to_multiple_of=1600)))
    assert torch.equal(loaded.input_values, rounded.input_values)


def test_max_hours_per_locale_takes_whole_speakers_in_a_fixed_order(tmp_path):
    """data.max_hours_per_locale: whole speakers in the order of a hash of their id while they
    fit, then single clips of the others; the same choice whatever the order of the rows."""
    import hashlib

    from helpers import SAMPLE_RATE, write_prepared

    from phonetune.data.prepared import open_split
    from phonetune.train.batching import cap_hours_per_locale

    first, second, third = sorted(
        ["s1", "s2", "s3"], key=lambda s: hashlib.blake2b(s.encode()).digest()
    )
    clips = [(first, 5.0), (first, 5.0), (second, 8.0), (third, 3.0), (third, 3.0), ("fr", 4.0)]
    rows = [
        {"audio": np.full(int(seconds * SAMPLE_RATE), 0.1, np.float32), "phones": "a",
         "locale": "fr" if speaker == "fr" else "en", "split": "train", "client_id": speaker}
        for speaker, seconds in clips
    ]  # fmt: skip
    write_prepared(tmp_path / "a", rows)
    write_prepared(tmp_path / "b", rows[::-1])
    for name in ("a", "b"):
        split = open_split(tmp_path / name, "train", "test")
        kept = cap_hours_per_locale(split, np.arange(len(split)), 15 / 3600)
        chosen = sorted(
            zip(split.column("client_id", kept), split.durations[kept].tolist(), strict=True)
        )
        # en: the first speaker whole (10 s); the second (8 s) and the third (6 s) do not fit
        # whole, so single clips fill up: one 3 s clip of the third (13 s; 8 s would pass 15).
        # fr holds 4 s, under the cap: all of it.
        assert chosen == [("fr", 4.0), (first, 5.0), (first, 5.0), (third, 3.0)], name


def test_max_hours_per_locale_is_applied_and_reported_by_training_data(prepared_dir, tmp_path):
    from helpers import config

    from phonetune.train.batching import load_training_data
    from phonetune.train.report import describe_hours_per_locale

    capped = load_training_data(
        config(prepared_dir, tmp_path / "run", "data.max_hours_per_locale=0.004")
    )
    whole = load_training_data(config(prepared_dir, tmp_path / "run"))
    locales = capped.train.locales
    for locale in set(locales):
        rows = capped.train_rows[locales[capped.train_rows] == locale]
        assert 0 < float(capped.train.durations[rows].sum()) <= 0.004 * 3600
    dropped = len(whole.train_rows) - len(capped.train_rows)
    assert dropped > 0 and capped.skipped["over_max_hours_per_locale"] == dropped
    described = dict(item.split(" ") for item in describe_hours_per_locale(capped).split(", "))
    assert set(described) == set(locales)
    assert all(0 < float(hours) <= 0.004 for hours in described.values())


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.3, 0.05])
def test_language_sampling_gives_each_language_its_share_of_every_epoch(alpha):
    """p_l ∝ n_l^alpha of each epoch's audio, whose total stays the data's: on 400/100/20 clips
    each language's seconds in an epoch are within one clip of its target (a subset takes whole
    clips while they fit), and alpha 1 plans exactly what no language sampling plans."""
    from phonetune.train.batching import language_shares

    rng = np.random.default_rng(0)
    counts = [400, 100, 20]
    languages = np.repeat(np.arange(3), counts)
    durations = rng.uniform(1.0, 8.0, len(languages))
    seconds = np.bincount(languages, weights=durations)
    shares = language_shares(seconds, alpha)
    assert shares.sum() == pytest.approx(1.0)
    if alpha < 1:  # smaller languages gain, the largest loses
        assert shares[2] > seconds[2] / seconds.sum() and shares[0] < seconds[0] / seconds.sum()
    for epoch in range(3):
        plan = plan_epoch(durations, 60.0, seed=1, epoch=epoch, languages=languages, alpha=alpha)
        drawn = np.concatenate([np.concatenate(shares_) for shares_ in plan])
        realised = np.bincount(languages[drawn], weights=durations[drawn], minlength=3)
        target = shares * seconds.sum()
        assert np.all(realised <= target + 1e-9) and np.all(target - realised < durations.max())
        if alpha == 1.0:
            plain = plan_epoch(durations, 60.0, seed=1, epoch=epoch)
            assert all(
                all(np.array_equal(a, b) for a, b in zip(x, y, strict=True))
                for x, y in zip(plan, plain, strict=True)
            )


def test_a_budget_by_width_gives_short_batches_more_audio():
    from phonetune.data.prepared import BatchBudget

    lengths = durations(2000, seed=5)  # 1-10 s
    budget = BatchBudget(30.0, ((3.0, 90.0), (6.0, 50.0)))
    groups = plan_epoch(lengths, budget, seed=0, epoch=0, num_replicas=2, bucket_width=0.1)
    assert np.array_equal(np.sort(flat(groups)), np.arange(len(lengths)))
    held = {3.0: [], 6.0: [], 10.0: []}
    for shares in groups:
        batch = np.concatenate(shares)
        width = lengths[batch].max()
        padded = len(batch) * width
        assert len(batch) == 1 or padded <= 2 * budget(width) + 1e-9  # two processes' worth
        held[min(w for w in held if width <= w)].append(padded)
    # Each width range packs its batches close to its own budget: the short ones hold far more
    # than one budget for every width (30 s a process) would let them.
    assert np.median(held[3.0]) > 2 * 80 and np.median(held[6.0]) > 2 * 40
    assert np.median(held[10.0]) <= 2 * 30


def test_a_sampler_fills_each_width_to_its_own_budget():
    from phonetune.data.prepared import BatchBudget

    lengths = durations(300, seed=6)
    samples = np.round(lengths * 16_000).astype(np.int64)
    budget = BatchBudget(20.0, ((4.0, 60.0),))
    sampler = DurationBatchSampler(
        np.arange(len(lengths)), lengths, budget, seed=1, num_samples=samples,
        pad_to_multiple_of=1600, pad_clips_to_budget=True,
    )  # fmt: skip
    for share in sampler:
        seconds = budget(share.width / 16_000)
        rows = len(share.rows) + share.fillers
        assert rows == max(int(seconds * 16_000) // share.width, len(share.rows))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("{4: -1}", "both positive numbers"),
        ("{4: 2}", "must hold one clip of its width"),
        ("{x: 20}", "both positive numbers"),
    ],
)
def test_budget_tables_are_checked(table, message, tmp_path):
    from helpers import TINY

    from phonetune.data.errors import PhonetuneError
    from phonetune.train.config import load_config

    with pytest.raises(PhonetuneError, match=message):
        load_config(
            TINY,
            [
                f"data.prepared_dir={tmp_path}",
                f"run.output_dir={tmp_path / 'run'}",
                f"train.batch_seconds_by_width={table}",
            ],
        )


def test_the_shape_grid_script_trades_padding_for_shapes():
    """scripts/shape_grid.py: on each distribution, a coarser grid pads more and leaves fewer
    shapes, and filling clips to the budget leaves at most one shape per width."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "shape_grid.py"
    done = subprocess.run(
        [sys.executable, str(script), "--clips", "3000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    grid_rows = [[cell.strip() for cell in row] for row in rows if len(row) == 6][1:]  # no header
    by_corpus: dict[str, list[tuple[float, float, int, int]]] = {}
    for name, grid, padding, shapes, _, filled_shapes in grid_rows:
        by_corpus.setdefault(name, []).append(
            (float(grid), float(padding.rstrip("%")), int(shapes), int(filled_shapes))
        )
    assert len(by_corpus) == 2
    for rows_of_corpus in by_corpus.values():
        rows_of_corpus.sort()
        paddings = [padding for _, padding, _, _ in rows_of_corpus]
        shapes = [filled for _, _, _, filled in rows_of_corpus]
        assert paddings == sorted(paddings) and shapes == sorted(shapes, reverse=True)
        # rounding pads a clip by under one grid step (a batch spanning two widths, rare, by one
        # more), and the clips average well over 2 s
        assert all(p / 100 < grid / 2 for grid, p, _, _ in rows_of_corpus)
