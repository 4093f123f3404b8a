"""Phone timestamps against known truth, with a tiny model trained here, and long recordings:
streamed in overlapping windows with memory flat in their length, and no phone doubled or lost
where windows join.

Truth (scripts/bench_timestamps.py): English words spoken one at a time by espeak-ng, trimmed to
where their sound starts and ends, concatenated with 50-250 ms of silence between them, so every
word's start and end is known to the sample. BENCHMARKS.md has the same measurement of the demo
model."""

import importlib.util
import json
import sys
import tracemalloc

import numpy as np
import pytest
import soundfile
from helpers import ROOT, SAMPLE_RATE, config, speech, write_checkpoint, write_prepared

from phonetune.data.per import score_predictions
from phonetune.infer.recognize import load_model
from phonetune.infer.transcribe import transcribe_files
from phonetune.train.loop import train

_spec = importlib.util.spec_from_file_location(
    "bench_timestamps", ROOT / "scripts" / "bench_timestamps.py"
)
bench = sys.modules["bench_timestamps"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# The tiny model's training: utterances of 1-4 words, short enough that CTC leaves its all-blank
# plateau within the run.
TRAIN_UTTERANCES = 80
# tiny_cpu.yaml's filterbank front end (64 mel bands) under a smaller transformer.
TRAINING = [
    "model.config.hidden_size=64",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=2",
    "model.config.intermediate_size=128",
    "model.config.num_conv_pos_embeddings=16",
    "model.config.num_conv_pos_embedding_groups=4",
    "train.max_steps=300",
    "train.eval_steps=300",
    "train.save_steps=300",
    "train.lr=3e-3",
    "train.hold_ratio=0.7",
    "train.batch_seconds=6",
    "data.max_duration=6",
]


# Fewer words than the benchmark's: a model trained for a minute learns them well enough.
WORDS = "hello my friend we like warm bread good morning to you all big red fish sun".split()


@pytest.fixture(scope="module")
def corpus():
    return bench.WordCorpus(WORDS)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A micro model trained on utterances of the word corpus (about a minute on 2 cores)."""
    root = tmp_path_factory.mktemp("timestamps")
    rng = np.random.default_rng(0)
    rows = []
    for split, count in [("train", TRAIN_UTTERANCES), ("dev", 8)]:
        for _ in range(count):
            wave, phones, _ = corpus.utterance(rng, 1, 4)
            rows.append({"audio": wave, "phones": phones, "locale": "en", "split": split})
    prepared = write_prepared(root / "prep", rows)
    phones = sorted({p for text in corpus.phones.values() for p in text.split()})
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *phones]
    (prepared / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False),
        encoding="utf-8",
    )
    train(config(prepared, root / "run", *TRAINING))
    return load_model(root / "run")


@pytest.mark.slow
def test_word_boundaries_are_found_within_their_words(trained, corpus):
    """Forced alignment and greedy timestamps put each word's first phone inside the word, close
    to its start.

    Bounds, from what CTC does: a CTC model emits a phone on a frame or two anywhere inside the
    phone (or just after it), and a model trained for seconds on words separated by silence puts
    its spikes some 90 ms inside each word (measured: median start error +89 ms at 300 steps,
    +97 ms at 1,200; the demo model, trained on continuous sentences, +4 ms: BENCHMARKS.md). So a
    word's first phone must start no earlier than 2 frames before the word and before the word
    ends, for 90 % of words, and within 150 ms of the word's start at the median (the words last
    300-600 ms: a time base that was off by a window, a frame rate or a sign would break both).
    """
    rng = np.random.default_rng(1)
    utterances = [corpus.utterance(rng) for _ in range(20)]
    errors = bench.boundary_errors(trained, utterances, corpus)
    print(bench.summarise(errors))
    lengths = np.array([end - start for _, _, truth in utterances for _, start, end in truth])
    inside = (errors["forced_start"] >= -0.04) & (errors["forced_start"] < lengths)
    assert inside.mean() >= 0.9, errors["forced_start"]
    assert np.median(np.abs(errors["forced_start"])) < 0.15, bench.summarise(errors)
    # A word's last phone ends inside it too: the end error is negative, and under a word long.
    assert np.median(np.abs(errors["forced_end"])) < 0.15, bench.summarise(errors)
    # Greedy timestamps: the words whose first phone was recognised (most, for this model).
    assert len(errors["greedy_start"]) >= 0.7 * len(lengths)
    assert np.median(np.abs(errors["greedy_start"])) < 0.15, bench.summarise(errors)


def test_long_recording_streams_in_flat_memory(tmp_path):
    """Transcribing 4 minutes needs hardly more memory than 1 minute (numpy's allocations and
    Python objects, which tracemalloc sees: audio blocks, windows, frames, phones): reading each
    file whole would need 3 minutes x 3.84 MB of float32 samples more."""
    checkpoint = write_checkpoint(tmp_path / "run", 1, seed=1)
    clip = speech("hello my friend, we like warm bread")
    peaks = {}
    for minutes in (1, 4):
        repeats = int(minutes * 60 * SAMPLE_RATE / len(clip)) + 1
        wave = np.tile(clip, repeats)[: minutes * 60 * SAMPLE_RATE]
        path = tmp_path / f"long_{minutes}.flac"
        soundfile.write(path, wave, SAMPLE_RATE)
        tracemalloc.start()
        (result,) = transcribe_files(checkpoint, [path])
        peaks[minutes] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.error is None and result.duration == minutes * 60
        assert result.phones
    whole_file_growth = 3 * 60 * SAMPLE_RATE * 4  # float32 bytes of the 3 extra minutes
    # What does grow: the best path (12 bytes a frame) and the phones found (~0.3 kB each).
    assert peaks[4] - peaks[1] < whole_file_growth / 10, peaks


@pytest.mark.slow
def test_long_recording_of_known_phones_keeps_every_phone_at_window_joins(
    trained, corpus, tmp_path
):
    """A minute of utterances of known phones, streamed in 5 s windows (about 18 joins, most of
    them inside words): the phones match the truth as well as the same recording recognised in
    one window (no join at all) does, so the model's phones at the joins are neither doubled nor
    dropped. (Not against the utterances transcribed one by one: without their neighbours as
    context the tiny model's errors move by more than the joins could, in either direction.)"""
    rng = np.random.default_rng(2)
    utterances = []
    while sum(len(u[0]) for u in utterances) < 60 * SAMPLE_RATE:
        utterances.append(corpus.utterance(rng))
    path = tmp_path / "long.flac"
    soundfile.write(path, np.concatenate([u[0] for u in utterances]), SAMPLE_RATE)
    truth = " ".join(u[1] for u in utterances)
    (streamed,) = transcribe_files(trained, [path], chunk_seconds=5)
    (whole,) = transcribe_files(trained, [path], chunk_seconds=70)
    streamed_per = score_predictions([streamed.phones], [truth], ["en"])["overall"]
    whole_per = score_predictions([whole.phones], [truth], ["en"])["overall"]
    joins = int(streamed.duration // (5 - 5 / 3))
    assert joins >= 15
    # A phone doubled or lost at each join would add about `joins` errors to the streamed count.
    errors = {
        name: per["substitutions"] + per["deletions"] + per["insertions"]
        for name, per in [("streamed", streamed_per), ("one window", whole_per)]
    }
    assert errors["streamed"] <= errors["one window"] + joins / 3, (errors, joins)
