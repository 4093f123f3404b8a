"""Every kind of bad input a Common Voice release can hold: rejected with its reason, nothing good lost."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr

from data.errors import PhonetuneError
from data.espeak import Synthesizer, synthesis_voice
from data.prepare import PrepareOptions, prepare

HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment"


def _row(path, sentence, client="spk"):
    return f"{client}\t{path}\t{sentence}\t2\t0\t\t\t\ten\t"


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """An `en` locale where each train row exercises one kind of bad input (and some good ones)."""
    root = tmp_path_factory.mktemp("bad_cv")
    clips = root / "en" / "clips"
    clips.mkdir(parents=True)
    synth = Synthesizer()
    voice = synthesis_voice("en-us")

    def speech(text, rate=48_000):
        return soxr.resample(synth.speak(text, voice), synth.sample_rate, rate)

    good = {
        "good_mp3.mp3": ("the cat sat on the mat", "MP3", 48_000, 1),
        "good_wav_8k.wav": ("a big red apple", "WAV", 8_000, 1),
        "good_flac_44k.flac": ("good morning my friend", "FLAC", 44_100, 1),
        "good_ogg_22k.ogg": ("we like warm bread", "OGG", 22_050, 1),
        "good_stereo.wav": ("she reads a long book", "WAV", 16_000, 2),
        "good_quotes.mp3": ('he said "hello" to them', "MP3", 48_000, 1),
        "good_control.mp3": ("the sun\u200b is hot", "MP3", 48_000, 1),
    }
    rows = []
    for name, (text, fmt, rate, channels) in good.items():
        samples = speech(text.replace('"', ""), rate)
        if channels == 2:
            samples = np.stack([samples, samples * 0.5], axis=1)
        sf.write(clips / name, samples, rate, format=fmt)
        rows.append(_row(name, text))

    sf.write(clips / "long.mp3", speech("the cat sat on the mat " * 12), 48_000, format="MP3")
    sf.write(clips / "silent.mp3", np.zeros(48_000, dtype=np.float32), 48_000, format="MP3")
    sf.write(clips / "short.mp3", speech("the cat sat on the mat")[:36_000], 48_000, format="MP3")
    for name in ("hebrew.mp3", "no_sentence.mp3", "blank_sentence.mp3", "tab.mp3"):
        shutil.copy(clips / "good_mp3.mp3", clips / name)
    (clips / "empty.mp3").write_bytes(b"")
    (clips / "corrupt.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 4)
    full = (clips / "good_mp3.mp3").read_bytes()
    (clips / "truncated.mp3").write_bytes(full[: len(full) // 40])
    (root / "secret.mp3").write_bytes(full)
    rows += [
        _row("good_mp3.mp3", "the cat sat on the mat"),  # duplicate of a kept row
        _row("missing.mp3", "this file does not exist"),
        _row("empty.mp3", "an empty file"),
        _row("corrupt.mp3", "a corrupt file"),
        _row("truncated.mp3", "the cat sat on the mat and then it ran far away from home"),
        _row("silent.mp3", "nothing but silence here"),
        _row("short.mp3", "this sentence has far too many phones for a clip of under one second"),
        _row("long.mp3", "the cat sat on the mat"),
        _row("../../secret.mp3", "trying to leave the clips folder"),
        _row("/etc/passwd", "an absolute path"),
        _row("no_sentence.mp3", ""),
        _row("blank_sentence.mp3", "  \u200b "),
        _row("hebrew.mp3", "שלום עולם"),
        "spk\ttab.mp3\twith a\ttab inside\t2\t0\t\t\t\ten\t",
    ]
    (root / "en" / "train.tsv").write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    # dev.tsv: extra columns are tolerated; test.tsv: the sentence column is missing.
    sf.write(clips / "dev_ok.mp3", speech("a small green frog"), 48_000, format="MP3")
    (root / "en" / "dev.tsv").write_text(
        HEADER + "\tvariant\textra\n" + _row("dev_ok.mp3", "a small green frog") + "\tx\ty\n",
        encoding="utf-8",
    )
    sf.write(clips / "test_a.mp3", speech("one more clip"), 48_000, format="MP3")
    (root / "en" / "test.tsv").write_text("client_id\tpath\nspk\ttest_a.mp3\n", encoding="utf-8")
    (root / "fr").mkdir()  # a locale directory without TSVs
    return root


@pytest.fixture(scope="module")
def bad_report(bad_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_prep")
    cache = tmp_path_factory.mktemp("cache")
    return prepare(
        PrepareOptions(
            cv_root=bad_corpus, locales=["en"], out=out, cache_dir=cache, max_duration=8.0
        )
    ), out


EXPECTED_REJECTIONS = {
    "good_mp3.mp3": {"duplicate_row"},
    "no_sentence.mp3": {"empty_sentence"},
    "blank_sentence.mp3": {"empty_sentence"},
    "hebrew.mp3": {"unreadable_script"},
    "tab.mp3": {"malformed_row"},
    "missing.mp3": {"missing_file"},
    "empty.mp3": {"unreadable_audio"},
    "corrupt.mp3": {"unreadable_audio"},
    "truncated.mp3": {"unreadable_audio"},
    "silent.mp3": {"silent_audio"},
    "short.mp3": {"too_short_for_phones"},
    "long.mp3": {"duration_out_of_range"},
    "../../secret.mp3": {"path_escapes_clips_dir"},
    "/etc/passwd": {"path_escapes_clips_dir"},
    "test_a.mp3": {"tsv_missing_columns"},
}


def test_each_bad_row_is_rejected_with_its_reason(bad_report):
    report, _ = bad_report
    found = {}
    for item in report["rejected"]:
        assert {"locale", "split", "path", "reason"} <= item.keys()
        found.setdefault(item["path"], set()).add(item["reason"])
    assert found == EXPECTED_REJECTIONS
    reasons = report["totals"]["rejected_by_reason"]
    assert reasons["path_escapes_clips_dir"] == 2 and reasons["unreadable_audio"] == 3
    assert reasons["too_short_for_phones"] == 1


def test_every_good_row_is_kept_and_counts_add_up(bad_report):
    report, out = bad_report
    from datasets import load_from_disk

    dataset = load_from_disk(str(out))
    kept = {row.split("/")[-1] for split in dataset for row in dataset[split]["path"]}
    assert kept == {
        "good_mp3.mp3",
        "good_wav_8k.wav",
        "good_flac_44k.flac",
        "good_ogg_22k.ogg",
        "good_stereo.wav",
        "good_quotes.mp3",
        "good_control.mp3",
        "dev_ok.mp3",
    }
    totals = report["totals"]
    assert totals["read"] == totals["kept"] + totals["rejected"] == 21 + 1 + 1
    assert totals["kept"] == len(kept)
    splits = report["per_locale"]["en"]["splits"]
    assert splits["train"] == {**splits["train"], "read": 21, "kept": 7, "rejected": 14}
    quotes = dataset["train"].filter(lambda r: r["path"].endswith("good_quotes.mp3"))[0]
    assert quotes["sentence"] == 'he said "hello" to them'
    control = dataset["train"].filter(lambda r: r["path"].endswith("good_control.mp3"))[0]
    assert control["sentence"] == "the sun is hot"
    durations = dict(zip(dataset["train"]["path"], dataset["train"]["duration"], strict=True))
    stereo = dataset["train"].filter(lambda r: r["path"].endswith("good_stereo.wav"))[0]
    assert abs(len(stereo["audio"]) / 16_000 - durations["en/clips/good_stereo.wav"]) < 1e-3


def test_locale_directory_without_tsvs_is_a_clear_error(bad_corpus, tmp_path):
    with pytest.raises(PhonetuneError, match=r"fr has none of train.tsv, dev.tsv, test.tsv"):
        prepare(
            PrepareOptions(
                cv_root=bad_corpus, locales=["en", "fr"], out=tmp_path / "p", cache_dir=tmp_path
            )
        )


def test_missing_cv_root_is_a_clear_error(tmp_path):
    with pytest.raises(PhonetuneError, match="--cv-root .* is not a directory"):
        prepare(PrepareOptions(cv_root=tmp_path / "nope", locales=["en"], out=tmp_path / "p"))


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    from train.cli import main

    assert (
        main(
            [
                "prepare",
                "--cv-root",
                str(tmp_path / "nope"),
                "--locales",
                "en",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "error: --cv-root" in err and "Traceback" not in err
    assert (
        main(
            [
                "prepare",
                "--cv-root",
                str(tmp_path),
                "--locales",
                "en,klingon",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "klingon" in capsys.readouterr().err


def test_released_vocab_rejects_or_maps_outside_phones(bad_corpus, tmp_path):
    from data.vocab import RELEASED_VOCAB_PATH

    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "ð": 4, "ə": 5}))
    corpus = tmp_path / "cv"
    shutil.copytree(bad_corpus / "en", corpus / "en")
    (corpus / "en" / "train.tsv").write_text(
        HEADER + "\n" + _row("good_mp3.mp3", "the cat sat on the mat") + "\n", encoding="utf-8"
    )
    with pytest.raises(PhonetuneError, match="no clip was kept out of 1 read"):
        prepare(
            PrepareOptions(
                cv_root=corpus,
                locales=["en"],
                out=tmp_path / "a",
                cache_dir=tmp_path,
                vocab=vocab_file,
                splits=("train",),
            )
        )
    report = json.loads((tmp_path / "a" / "prep_report.json").read_text(encoding="utf-8"))
    assert report["totals"]["rejected_by_reason"] == {"phones_outside_vocab": 1}
    assert report["vocab"]["phones_outside_vocab"]["en"]["æ"] == 3
    report = prepare(
        PrepareOptions(
            cv_root=corpus,
            locales=["en"],
            out=tmp_path / "b",
            cache_dir=tmp_path,
            vocab=vocab_file,
            splits=("train",),
            oov_policy="unk",
        )
    )
    assert report["totals"]["kept"] == 1
    released = prepare(
        PrepareOptions(
            cv_root=corpus,
            locales=["en"],
            out=tmp_path / "c",
            cache_dir=tmp_path,
            vocab=RELEASED_VOCAB_PATH,
            splits=("train",),
        )
    )
    assert released["totals"]["kept"] == 1 and released["vocab"]["size"] == 392
    saved = json.loads((tmp_path / "c" / "vocab.json").read_text(encoding="utf-8"))
    assert len(saved) == 392 and saved["<pad>"] == 0
