"""synth -> prepare end to end on a small multilingual corpus."""

import json

import numpy as np
import pytest
from datasets import load_from_disk
from helpers import TEST_CLIPS_PER_LOCALE, TEST_LOCALES

from phonetune.data.audio import SAMPLE_RATE, load_audio
from phonetune.data.ctc import count_frames, count_min_frames
from phonetune.data.errors import PhonetuneError
from phonetune.data.prepare import PrepareOptions, prepare
from phonetune.data.vocab import load_released_vocab, load_vocab


def test_prepared_dataset_has_columns_rate_durations_and_counts(prepared_dir, cv_corpus):
    dataset = load_from_disk(str(prepared_dir))
    assert set(dataset) == {"train", "dev", "test"}
    report = json.loads((prepared_dir / "prep_report.json").read_text(encoding="utf-8"))
    assert report["totals"]["read"] == len(TEST_LOCALES) * TEST_CLIPS_PER_LOCALE
    assert report["totals"]["kept"] == sum(len(dataset[s]) for s in dataset)
    assert report["totals"]["read"] == report["totals"]["kept"] + report["totals"]["rejected"]
    assert report["totals"]["rejected"] == len(report["rejected"])
    for locale, entry in report["per_locale"].items():
        for split, stats in entry["splits"].items():
            rows = dataset[split].filter(lambda r, loc=locale: r["locale"] == loc)
            assert stats["kept"] == len(rows)
            assert stats["read"] == stats["kept"] + stats["rejected"]
            assert abs(stats["hours"] - sum(rows["duration"]) / 3600) < 1e-3
    train = dataset["train"]
    expected = {
        "audio",
        "phones",
        "num_phones",
        "locale",
        "split",
        "duration",
        "num_frames",
        "client_id",
        "sentence",
        "path",
    }
    assert expected <= set(train.column_names)
    assert str(train.data.schema.field("audio").type) == "list<item: int16>"
    row = train[0]
    # Read the int16 samples straight from Arrow (datasets' numpy formatter widens to int64).
    row["audio"] = train.data.column("audio")[0].values.to_numpy()
    assert row["audio"].dtype == np.int16
    assert abs(len(row["audio"]) / SAMPLE_RATE - row["duration"]) < 1e-4
    assert row["num_frames"] == count_frames(len(row["audio"]))
    assert row["num_phones"] == len(str(row["phones"]).split())
    # The stored audio is the decoded MP3 resampled to 16 kHz, nothing else.
    decoded = load_audio(cv_corpus / str(row["path"]))
    assert np.abs(decoded * 32768 - row["audio"]).max() <= 1.0
    assert set(dataset["test"]["locale"]) == set(TEST_LOCALES)


def test_vocab_and_phones(prepared_dir):
    vocab = load_vocab(prepared_dir / "vocab.json")
    assert list(vocab)[:4] == ["<pad>", "<s>", "</s>", "<unk>"] and vocab["<pad>"] == 0
    dataset = load_from_disk(str(prepared_dir))
    released = load_released_vocab()
    for split in dataset:
        for phones, frames in zip(
            dataset[split]["phones"], dataset[split]["num_frames"], strict=True
        ):
            tokens = phones.split()
            assert all(token in vocab for token in tokens)
            assert all(token in released for token in tokens), phones
            assert frames >= count_min_frames(tokens)
    inventory = json.loads((prepared_dir / "prep_report.json").read_text())["per_locale"]["zh-CN"]
    assert any(token[-1].isdigit() for token in inventory["phone_inventory"])


def test_speakers_stay_in_their_split(prepared_dir):
    dataset = load_from_disk(str(prepared_dir))
    speakers = {split: set(dataset[split]["client_id"]) for split in dataset}
    assert not speakers["train"] & speakers["test"] and not speakers["train"] & speakers["dev"]


def test_rerun_reuses_phoneme_cache_and_decoded_shards(prepared_dir, cv_corpus, tmp_path):
    first = json.loads((prepared_dir / "prep_report.json").read_text())
    options = PrepareOptions(cv_root=cv_corpus, locales=TEST_LOCALES, out=prepared_dir)
    again = prepare(options)
    assert again["phoneme_cache"]["misses"] == 0 and again["phoneme_cache"]["hits"] > 0
    assert again["shards"]["written"] == 0 and again["shards"]["reused"] > 0
    assert again["totals"] == first["totals"]
    # A fresh output folder re-decodes the audio but still takes every phone from the cache.
    fresh = prepare(PrepareOptions(cv_root=cv_corpus, locales=["ru"], out=tmp_path / "p"))
    assert fresh["phoneme_cache"]["misses"] == 0 and fresh["shards"]["written"] > 0


def test_interrupted_run_resumes_from_written_shards(cv_corpus, tmp_path, monkeypatch):
    import phonetune.data.prepare as prep

    real = prep.process_shard
    calls = []

    def crash_after_first(job):
        if calls:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(prep, "process_shard", crash_after_first)
    options = PrepareOptions(cv_root=cv_corpus, locales=["en"], out=tmp_path / "p")
    with pytest.raises(KeyboardInterrupt):
        prepare(options)
    monkeypatch.setattr(prep, "process_shard", real)
    report = prepare(options)
    assert report["shards"]["reused"] == 1 and report["shards"]["written"] == 2
    assert report["totals"]["kept"] == sum(
        len(s) for s in load_from_disk(str(tmp_path / "p")).values()
    )


def test_phonemization_jobs_hold_one_language_and_each_sentence_once():
    from phonetune.data.prepare import PHONEMIZE_JOB_SENTENCES, ClipTask, plan_phonemization

    def task(locale, sentence, phones=None):
        return ClipTask(locale, "train", "a.mp3", "/a.mp3", sentence, "spk", phones)

    many = [task("fr", f"phrase {i}") for i in range(PHONEMIZE_JOB_SENTENCES + 1)]
    tasks = [task("en", "a cat"), task("en", "a cat"), task("en", "known", "n oʊ n"), *many]
    jobs = plan_phonemization(tasks, "remove-flags")
    assert [(language, len(sentences)) for language, sentences, _ in jobs] == [
        ("en-us", 1),
        ("fr-fr", PHONEMIZE_JOB_SENTENCES),
        ("fr-fr", 1),
    ]
    assert jobs[0][1] == ["a cat"] and all(policy == "remove-flags" for *_, policy in jobs)


def test_prepare_imports_neither_datasets_nor_pandas(cv_corpus, tmp_path):
    """Both cost the main process or each worker more CPU than a hundred clips' decoding."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from data.prepare import PrepareOptions, prepare; "
        f"prepare(PrepareOptions(cv_root=Path({str(cv_corpus)!r}), locales=['fr'], "
        f"out=Path({str(tmp_path / 'p')!r}), splits=('dev',))); "
        "print(sorted(m for m in ('datasets', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert len(load_from_disk(str(tmp_path / "p"))["dev"]) > 0


def test_a_vocabulary_path_that_cannot_be_read_is_a_clear_error(tmp_path):
    with pytest.raises(PhonetuneError, match="cannot read vocabulary file .*: Is a directory"):
        load_vocab(tmp_path)
    with pytest.raises(PhonetuneError, match="does not exist"):
        load_vocab(tmp_path / "missing.json")


def test_the_command_names_the_next_one(cv_corpus, tmp_path, capsys):
    from phonetune.cli import main

    out = tmp_path / "ru"
    assert main(["prepare", "--cv-root", str(cv_corpus), "--locales", "ru", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(
        f"next: phonetune train --config xlsr53_espeak_cv data.prepared_dir={out} "
        "run.output_dir=runs/ru"
    ), last
