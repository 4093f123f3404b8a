"""`phonetune synth`: a Common Voice-layout release spoken by espeak-ng."""

import argparse
import csv
import re

import numpy as np
import pytest
import soundfile

from phonetune.data.errors import PhonetuneError
from phonetune.data.locales import DEFAULT_LOCALES, LOCALES, foreign_scripts
from phonetune.data.synth import (
    VOICE_VARIANTS,
    configure_parser,
    draw_sentences,
    load_grammar,
    locale_rng,
    plan_locale,
    sentence_locales,
    synthesize_corpus,
)

LOCALES_UNDER_TEST = ["en", "ru", "zh-CN"]  # Latin, Cyrillic and Han scripts
CLIPS = 12
COLUMNS = [
    "client_id",
    "path",
    "sentence",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "locale",
    "segment",
]
SPLITS = ["train", "dev", "test"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cv"
    summary = synthesize_corpus(out, LOCALES_UNDER_TEST, CLIPS, seed=3, num_workers=2)
    return out, summary


@pytest.fixture(scope="module")
def corpus_again(tmp_path_factory):
    """The same seed again, with one worker instead of two."""
    out = tmp_path_factory.mktemp("synth_again") / "cv"
    synthesize_corpus(out, LOCALES_UNDER_TEST, CLIPS, seed=3, num_workers=1)
    return out


def read_rows(path):
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        return header, list(reader)


def split_rows(root, locale):
    return {split: read_rows(root / locale / f"{split}.tsv")[1] for split in SPLITS}


def test_layout_and_tsv_columns(corpus):
    root, summary = corpus
    assert summary["clips"] == len(LOCALES_UNDER_TEST) * CLIPS
    for locale in LOCALES_UNDER_TEST:
        folder = root / locale
        assert {p.name for p in folder.iterdir()} == {
            "clips",
            "validated.tsv",
            "train.tsv",
            "dev.tsv",
            "test.tsv",
        }
        validated_header, validated = read_rows(folder / "validated.tsv")
        assert validated_header == COLUMNS
        rows = split_rows(root, locale)
        for split in SPLITS:
            assert read_rows(folder / f"{split}.tsv")[0] == COLUMNS
        # validated.tsv is exactly the union of the three splits.
        assert sorted(validated) == sorted(rows["train"] + rows["dev"] + rows["test"])
        assert len(validated) == CLIPS
        for row in validated:
            assert len(row) == len(COLUMNS)
            record = dict(zip(COLUMNS, row, strict=True))
            assert re.fullmatch(r"[0-9a-f]{64}", record["client_id"])
            assert re.fullmatch(rf"common_voice_{re.escape(locale)}_\d+\.mp3", record["path"])
            assert (folder / "clips" / record["path"]).is_file()
            assert record["locale"] == locale
            assert (record["up_votes"], record["down_votes"], record["segment"]) == ("2", "0", "")
            assert record["gender"] in {"male_masculine", "female_feminine"}
            assert record["sentence"] and "\t" not in record["sentence"]
        clip_files = sorted(p.name for p in (folder / "clips").iterdir())
        assert clip_files == sorted(row[1] for row in validated)


def test_clips_are_48k_mono_mp3_with_speech(corpus):
    root, _ = corpus
    for locale in LOCALES_UNDER_TEST:
        for path in sorted((root / locale / "clips").glob("*.mp3"))[:4]:
            info = soundfile.info(path)
            assert (info.samplerate, info.channels, info.format) == (48000, 1, "MP3")
            assert 1.0 < info.duration < 6.0, (path.name, info.duration)
            audio, rate = soundfile.read(path, dtype="float32")
            assert rate == 48000 and audio.ndim == 1
            assert np.sqrt(np.mean(audio**2)) > 0.02  # speech, not silence
            lead = audio[: int(0.05 * rate)]  # padding: quiet, but never digital zero
            assert 0 < np.abs(lead).max() < 0.01


def test_speakers_are_disjoint_across_splits(corpus):
    root, summary = corpus
    for locale in LOCALES_UNDER_TEST:
        rows = split_rows(root, locale)
        speakers = {split: {row[0] for row in rows[split]} for split in SPLITS}
        assert all(speakers[split] for split in SPLITS)
        assert not speakers["train"] & speakers["dev"]
        assert not speakers["train"] & speakers["test"]
        assert not speakers["dev"] & speakers["test"]
        for split in ("dev", "test"):
            assert len(rows[split]) >= 0.1 * CLIPS
        assert summary["per_locale"][locale]["speakers"] == {s: len(speakers[s]) for s in SPLITS}


def test_no_dev_or_test_sentence_in_train(corpus):
    root, _ = corpus
    for locale in LOCALES_UNDER_TEST:
        rows = split_rows(root, locale)
        train = {row[2] for row in rows["train"]}
        for split in ("dev", "test"):
            assert rows[split] and not train & {row[2] for row in rows[split]}


def test_sentences_stay_in_the_locale_script(corpus):
    root, _ = corpus
    for locale in LOCALES_UNDER_TEST:
        _, rows = read_rows(root / locale / "validated.tsv")
        for sentence in (row[2] for row in rows):
            assert foreign_scripts(sentence, LOCALES[locale]) == []
            assert not any(char.isdigit() for char in sentence)
            if locale in ("ru", "zh-CN"):
                assert not re.search(r"[A-Za-z]", sentence), sentence


def test_same_seed_same_files_whatever_the_worker_count(corpus, corpus_again):
    root, _ = corpus
    for locale in LOCALES_UNDER_TEST:
        for name in ("validated.tsv", "train.tsv", "dev.tsv", "test.tsv"):
            assert (root / locale / name).read_text("utf-8") == (
                corpus_again / locale / name
            ).read_text("utf-8")
        clips = sorted((root / locale / "clips").iterdir())
        assert clips
        for clip in clips:
            assert clip.read_bytes() == (corpus_again / locale / "clips" / clip.name).read_bytes()


def test_plan_depends_on_seed_and_locale_only():
    first = plan_locale("en", 40, seed=0, voice="en-US")
    assert plan_locale("en", 40, seed=0, voice="en-US") == first
    other = plan_locale("en", 40, seed=1, voice="en-US")
    assert [c.sentence for c in other] != [c.sentence for c in first]
    assert all(c.voice.split("+")[1] in VOICE_VARIANTS for c in first)


def test_every_default_locale_has_enough_distinct_sentences():
    assert set(DEFAULT_LOCALES) <= set(sentence_locales())
    for locale in DEFAULT_LOCALES:
        sentences = draw_sentences(load_grammar(locale), 500, locale_rng(0, locale))
        assert len(sentences) == 500, locale
        assert all(foreign_scripts(s, LOCALES[locale]) == [] for s in sentences)


def test_voice_variants_exist_in_espeak_data():
    from pathlib import Path

    from phonetune.data.espeak import locate_espeak

    folder = Path(locate_espeak().data_path) / "voices" / "!v"
    assert [name for name in VOICE_VARIANTS if not (folder / name).is_file()] == []


def test_unknown_or_unspoken_locale_is_refused(tmp_path):
    with pytest.raises(PhonetuneError, match="xx"):
        synthesize_corpus(tmp_path / "a", ["xx"], CLIPS)
    with pytest.raises(PhonetuneError, match="no sentence list.*ja"):
        synthesize_corpus(tmp_path / "b", ["ja"], CLIPS)
    with pytest.raises(PhonetuneError, match="at least 3"):
        synthesize_corpus(tmp_path / "c", ["en"], 2)
    assert not (tmp_path / "a").exists()


def test_cli_reports_bad_locale_without_traceback(tmp_path, capsys):
    from phonetune.cli import main

    code = main(["synth", "--out", str(tmp_path / "out"), "--locales", "en,klingon"])
    assert code == 2
    assert "klingon" in capsys.readouterr().err


def test_non_empty_out_needs_overwrite(tmp_path):
    out = tmp_path / "cv"
    (out / "en" / "clips").mkdir(parents=True)
    (out / "en" / "clips" / "stale.mp3").write_bytes(b"old")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PhonetuneError, match="not empty.*--overwrite"):
        synthesize_corpus(out, ["en"], 3)
    summary = synthesize_corpus(out, ["en"], 3, overwrite=True)
    assert summary["clips"] == 3
    assert not (out / "en" / "clips" / "stale.mp3").exists()
    assert (out / "notes.txt").read_text() == "keep me"


def test_overwrite_never_deletes_a_folder_that_is_not_a_release(tmp_path):
    out = tmp_path / "cv"
    (out / "en").mkdir(parents=True)
    (out / "en" / "thesis.tex").write_text("precious")
    with pytest.raises(PhonetuneError, match="does not look like"):
        synthesize_corpus(out, ["en"], 3, overwrite=True)
    assert (out / "en" / "thesis.tex").read_text() == "precious"


def test_every_option_has_help():
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} == {
        "out",
        "locales",
        "clips_per_locale",
        "seed",
        "num_workers",
        "overwrite",
    }
    assert all(a.help for a in options)
