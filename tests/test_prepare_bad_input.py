"""Every kind of bad input a Common Voice release can hold: rejected with its reason, nothing good lost."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr

from phonetune.data.errors import PhonetuneError
from phonetune.data.espeak import Synthesizer, synthesis_voice
from phonetune.data.prepare import PrepareOptions, prepare

HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment"
MATRIX_TEXT = "we like warm bread"
LONG_NAME = "x" * 300 + ".mp3"  # longer than a file name may be: no such clip, not a crash

# Other formats, rates and channel counts than Common Voice's mono 48 kHz MP3: all good rows.
MATRIX = {
    f"good_{fmt.lower()}_{rate}_{channels}ch.{fmt.lower()}": (fmt, rate, channels)
    for index, (fmt, rate) in enumerate(
        (fmt, rate) for fmt in ("WAV", "FLAC", "OGG", "MP3") for rate in (8000, 22050, 44100, 48000)
    )
    for channels in [1 + index % 2]
}
# name -> (sentence as in the TSV, text spoken); 48 kHz mono MP3s.
SPECIAL = {
    "good_mp3.mp3": ("the cat sat on the mat", "the cat sat on the mat"),
    "good_quotes.mp3": ('he said "hello" to them', "he said hello to them"),
    "good_control.mp3": ("the sun\u200b is\x07 hot\x1b", "the sun is hot"),
    "good_cr.mp3": ("the dog\ris here", "the dog is here"),
    "good_big_field.mp3": ("my hat is red", "my hat is red"),
}
GOOD_TRAIN = set(MATRIX) | set(SPECIAL)

EXPECTED_REJECTIONS = {
    "good_mp3.mp3": {"duplicate_row"},  # listed again, once as "./good_mp3.mp3"
    "good_wav_8000_1ch.wav": {"duplicate_across_splits"},  # also in dev.tsv: leakage
    # The same train audio in dev under other names: leakage the path alone does not show.
    "../clips/good_quotes.mp3": {"duplicate_across_splits"},  # another spelling of the path
    "link_in.mp3": {"duplicate_across_splits"},  # a link inside clips/ to a train clip
    "copy_of_control.mp3": {"duplicate_across_splits"},  # a byte copy of a train clip
    "copy_of_dev_ok.mp3": {"duplicate_row"},  # a byte copy of a dev clip, also in dev
    "no_sentence.mp3": {"empty_sentence"},
    "blank_sentence.mp3": {"empty_sentence"},
    "punctuation.mp3": {"no_phones"},
    "hebrew.mp3": {"unreadable_script"},
    "tab.mp3": {"malformed_row"},
    "few_fields.mp3": {"malformed_row"},
    "train.tsv:46": {"invalid_text_encoding"},
    "missing.mp3": {"missing_file"},
    LONG_NAME: {"missing_file"},
    "empty.mp3": {"unreadable_audio"},
    "corrupt.mp3": {"unreadable_audio"},
    "truncated.mp3": {"unreadable_audio"},
    "half.mp3": {"truncated_audio"},
    "zero_frames.wav": {"empty_audio"},
    "nan.wav": {"non_finite_audio"},
    "silent.mp3": {"silent_audio"},
    "dc_offset.wav": {"silent_audio"},
    "short.mp3": {"too_short_for_phones"},
    "long.mp3": {"duration_out_of_range"},
    "../../secret.mp3": {"path_escapes_clips_dir"},
    "/etc/passwd": {"path_escapes_clips_dir"},
    "link_out.mp3": {"path_escapes_clips_dir"},
    "test_a.mp3": {"tsv_missing_columns"},
}


def _row(path, sentence, client="spk", accents=""):
    return f"{client}\t{path}\t{sentence}\t2\t0\t\t\t{accents}\ten\t"


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """An `en` locale where each train row exercises one kind of bad input (and many good ones)."""
    root = tmp_path_factory.mktemp("bad_cv")
    clips = root / "en" / "clips"
    clips.mkdir(parents=True)
    synth = Synthesizer()
    voice = synthesis_voice("en-us")

    def speech(text, rate=48_000, spoken=None):
        # espeak-ng's timing varies slightly from call to call: resample one rendering
        spoken = synth.speak(text, voice) if spoken is None else spoken
        return soxr.resample(spoken, synth.sample_rate, rate)

    rows = []
    sources = {}  # good clip -> (seconds in the file, its speech at 16 kHz mono, stereo?)
    matrix_speech = synth.speak(MATRIX_TEXT, voice)
    for name, (fmt, rate, channels) in MATRIX.items():
        samples = speech(MATRIX_TEXT, rate, matrix_speech)
        sf.write(
            clips / name,
            np.stack([samples, samples * 0.5], axis=1) if channels == 2 else samples,
            rate,
            format=fmt,
        )
        reference = speech(MATRIX_TEXT, 16_000, matrix_speech)
        sources[name] = (len(samples) / rate, reference, channels == 2)
        rows.append(_row(name, MATRIX_TEXT))
    for name, (sentence, text) in SPECIAL.items():
        spoken = synth.speak(text, voice)
        samples = speech(text, 48_000, spoken)
        sf.write(clips / name, samples, 48_000, format="MP3")
        sources[name] = (len(samples) / 48_000, speech(text, 16_000, spoken), False)
        accents = "y" * 200_000 if name == "good_big_field.mp3" else ""  # over csv's field limit
        rows.append(_row(name, sentence, accents=accents))

    sf.write(clips / "long.mp3", speech("the cat sat on the mat " * 12), 48_000, format="MP3")
    sf.write(clips / "silent.mp3", np.zeros(48_000, dtype=np.float32), 48_000, format="MP3")
    sf.write(clips / "dc_offset.wav", np.full(16_000, 0.3, dtype=np.float32), 16_000)
    sf.write(clips / "zero_frames.wav", np.zeros(0, dtype=np.float32), 16_000)
    nan = speech("a small dog", 16_000).astype(np.float32)
    nan[1000:1100] = np.nan
    sf.write(clips / "nan.wav", nan, 16_000, subtype="FLOAT")
    sf.write(clips / "short.mp3", speech("the cat sat on the mat")[:36_000], 48_000, format="MP3")
    for name in ("hebrew.mp3", "no_sentence.mp3", "blank_sentence.mp3", "tab.mp3"):
        shutil.copy(clips / "good_mp3.mp3", clips / name)
    for name in ("punctuation.mp3", "few_fields.mp3"):
        shutil.copy(clips / "good_mp3.mp3", clips / name)
    (clips / "empty.mp3").write_bytes(b"")
    (clips / "corrupt.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 4)
    full = (clips / "good_mp3.mp3").read_bytes()
    (clips / "truncated.mp3").write_bytes(full[: len(full) // 40])
    # A download cut in half still decodes, to the first half of the sentence only.
    sf.write(clips / "half_source.mp3", speech("the cat sat on the mat " * 3), 48_000, format="MP3")
    whole = (clips / "half_source.mp3").read_bytes()
    (clips / "half.mp3").write_bytes(whole[: len(whole) // 2])
    (clips / "half_source.mp3").unlink()
    (root / "secret.mp3").write_bytes(full)
    os.symlink(root / "secret.mp3", clips / "link_out.mp3")
    rows += [
        _row("good_mp3.mp3", "the cat sat on the mat"),
        _row("./good_mp3.mp3", "the cat sat on the mat"),
        _row("missing.mp3", "this file does not exist"),
        _row(LONG_NAME, "a name too long for any file system"),
        _row("empty.mp3", "an empty file"),
        _row("corrupt.mp3", "a corrupt file"),
        _row("truncated.mp3", "the cat sat on the mat and then it ran far away from home"),
        _row("half.mp3", "the cat sat on the mat " * 3),
        _row("zero_frames.wav", "no samples at all"),
        _row("nan.wav", "a small dog"),
        _row("silent.mp3", "nothing but silence here"),
        _row("dc_offset.wav", "only a constant offset"),
        _row("short.mp3", "this sentence has far too many phones for a clip of under one second"),
        _row("long.mp3", "the cat sat on the mat"),
        _row("../../secret.mp3", "trying to leave the clips folder"),
        _row("/etc/passwd", "an absolute path"),
        _row("link_out.mp3", "a link that points out of the clips folder"),
        _row("no_sentence.mp3", ""),
        _row("blank_sentence.mp3", "  \u200b "),
        _row("punctuation.mp3", "?!"),
        _row("hebrew.mp3", "שלום עולם"),
        "spk\ttab.mp3\twith a\ttab inside\t2\t0\t\t\t\ten\t",
        "spk\tfew_fields.mp3",
    ]
    lines = [HEADER.encode(), *(row.encode() for row in rows)]
    lines.append(_row("good_mp3.mp3", "caf\xe9").encode("latin-1"))  # not UTF-8
    assert len(lines) == 46
    # Windows line ends, as a spreadsheet would save them.
    (root / "en" / "train.tsv").write_bytes(b"\r\n".join(lines) + b"\r\n")

    # dev.tsv: a byte-order mark and extra columns, both harmless; a clip of train listed again,
    # under its name, another spelling, a link and as a copy; a copy of a dev clip.
    sf.write(clips / "dev_ok.mp3", speech("a small green frog"), 48_000, format="MP3")
    os.symlink("good_cr.mp3", clips / "link_in.mp3")
    shutil.copy(clips / "good_control.mp3", clips / "copy_of_control.mp3")
    shutil.copy(clips / "dev_ok.mp3", clips / "copy_of_dev_ok.mp3")
    dev_rows = [
        _row("dev_ok.mp3", "a small green frog", client="dev_speaker"),
        _row("good_wav_8000_1ch.wav", MATRIX_TEXT),
        _row("../clips/good_quotes.mp3", "he said hello to them"),
        _row("link_in.mp3", "the dog is here"),
        _row("copy_of_control.mp3", "the sun is hot"),
        _row("copy_of_dev_ok.mp3", "a small green frog", client="dev_speaker"),
    ]
    (root / "en" / "dev.tsv").write_text(
        "\ufeff" + HEADER + "\tvariant\textra\n" + "".join(r + "\tx\ty\n" for r in dev_rows),
        encoding="utf-8",
    )
    # test.tsv: the sentence column is missing.
    sf.write(clips / "test_a.mp3", speech("one more clip"), 48_000, format="MP3")
    (root / "en" / "test.tsv").write_text("client_id\tpath\nspk\ttest_a.mp3\n", encoding="utf-8")
    # de: an empty train.tsv, a dev.tsv with only its header, a test.tsv of blank lines.
    (root / "de" / "clips").mkdir(parents=True)
    (root / "de" / "train.tsv").write_bytes(b"")
    (root / "de" / "dev.tsv").write_text(HEADER + "\n", encoding="utf-8")
    (root / "de" / "test.tsv").write_text(HEADER + "\n\n\t\t\n", encoding="utf-8")
    (root / "fr").mkdir()  # a locale directory without TSVs
    return root, sources


@pytest.fixture(scope="module")
def bad_report(bad_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_prep")
    cache = tmp_path_factory.mktemp("cache")
    report = prepare(
        PrepareOptions(
            cv_root=bad_corpus[0], locales=["en", "de"], out=out, cache_dir=cache, max_duration=8.0
        )
    )
    return report, out


def test_each_bad_row_is_rejected_with_its_reason(bad_report):
    report, _ = bad_report
    found = {}
    for item in report["rejected"]:
        assert {"locale", "split", "path", "reason", "detail"} <= item.keys()
        assert item["detail"]
        found.setdefault(item["path"], set()).add(item["reason"])
    assert found == EXPECTED_REJECTIONS
    reasons = report["totals"]["rejected_by_reason"]
    assert reasons["path_escapes_clips_dir"] == 3 and reasons["unreadable_audio"] == 3
    assert reasons["duplicate_row"] == 3 and reasons["silent_audio"] == 2
    assert reasons["duplicate_across_splits"] == 4
    assert reasons["malformed_row"] == 2 and reasons["missing_file"] == 2
    assert sum(reasons.values()) == len(report["rejected"]) == report["totals"]["rejected"]
    dev = {r["path"]: r["detail"] for r in report["rejected"] if r["split"] == "dev"}
    assert dev["good_wav_8000_1ch.wav"] == "good_wav_8000_1ch.wav already listed in train.tsv"
    assert dev["../clips/good_quotes.mp3"].endswith("train.tsv (as good_quotes.mp3: the same file)")
    assert dev["link_in.mp3"].endswith("train.tsv (as good_cr.mp3: the same file)")
    # Found by their decoded audio, after decoding: the first occurrence is named.
    assert (
        dev["copy_of_control.mp3"] == "the same audio as en/clips/good_control.mp3 (en train.tsv)"
    )
    assert dev["copy_of_dev_ok.mp3"] == "the same audio as en/clips/dev_ok.mp3 (en dev.tsv)"
    half = next(r for r in report["rejected"] if r["path"] == "half.mp3")
    assert "its header announces" in half["detail"]


def test_every_good_row_is_kept_and_counts_add_up(bad_report):
    report, out = bad_report
    from datasets import load_from_disk

    dataset = load_from_disk(str(out))
    kept = {split: {p.split("/")[-1] for p in dataset[split]["path"]} for split in dataset}
    assert kept == {"train": GOOD_TRAIN, "dev": {"dev_ok.mp3"}}
    assert len(GOOD_TRAIN) == 21
    splits = {
        split: (stats["read"], stats["kept"], stats["rejected"])
        for split, stats in report["per_locale"]["en"]["splits"].items()
    }
    assert splits == {"train": (45, 21, 24), "dev": (6, 1, 5), "test": (1, 0, 1)}
    totals = report["totals"]
    assert (totals["read"], totals["kept"], totals["rejected"]) == (52, 22, 30)
    assert totals["read"] == totals["kept"] + totals["rejected"]
    assert totals["kept"] == sum(len(dataset[split]) for split in dataset)
    # Empty, header-only and blank-line TSVs are read as holding no rows, not as errors.
    assert report["per_locale"]["de"]["splits"] == {} and report["per_locale"]["de"]["hours"] == 0


def test_other_formats_rates_and_stereo_are_decoded_mixed_and_resampled(bad_report, bad_corpus):
    _, out = bad_report
    _, sources = bad_corpus
    from datasets import load_from_disk

    train = load_from_disk(str(out))["train"]
    for row in train:
        name = row["path"].split("/")[-1]
        seconds, reference, stereo = sources[name]
        audio = np.asarray(row["audio"], dtype=np.float32) / 32768
        # resampled to 16 kHz: the clip lasts as long as its file, whatever the file's rate
        assert abs(len(audio) / 16_000 - seconds) < 1e-3, name
        assert abs(row["duration"] - seconds) < 1e-3, name
        n = min(len(audio), len(reference))
        assert np.corrcoef(audio[:n], reference[:n])[0, 1] > 0.99, name
        # stereo (s, s/2) is mixed to its mean, 0.75 s: not one channel, not their sum
        level = np.sqrt(np.mean(audio[:n] ** 2) / np.mean(reference[:n] ** 2))
        assert abs(level - (0.75 if stereo else 1.0)) < 0.05, (name, level)


def test_sentences_keep_quotes_and_lose_control_characters(bad_report):
    _, out = bad_report
    from datasets import load_from_disk

    dataset = load_from_disk(str(out))
    sentences = {
        p.split("/")[-1]: s
        for p, s in zip(dataset["train"]["path"], dataset["train"]["sentence"], strict=True)
    }
    assert sentences["good_quotes.mp3"] == 'he said "hello" to them'
    assert sentences["good_control.mp3"] == "the sun is hot"
    assert sentences["good_cr.mp3"] == "the dog is here"  # a lone \r does not end the row
    assert sentences["good_big_field.mp3"] == "my hat is red"
    # the byte-order mark did not become part of the first column's name
    assert dataset["dev"]["client_id"] == ["dev_speaker"]


def test_silent_clips_could_not_make_nan_in_training_either():
    from phonetune.data.audio import normalize_audio

    for samples in (np.zeros(16_000, dtype=np.int16), np.full(16_000, 9830, dtype=np.int16)):
        normalized = normalize_audio(samples)
        assert np.isfinite(normalized).all() and np.abs(normalized).max() == 0


def test_out_folder_holding_other_files_is_refused(bad_corpus, tmp_path):
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("precious")
    with pytest.raises(PhonetuneError, match="is not empty and holds no prepared dataset"):
        prepare(PrepareOptions(cv_root=bad_corpus[0], locales=["en"], out=out, cache_dir=tmp_path))
    assert (out / "train" / "notes.txt").read_text() == "precious"


def test_locale_directory_without_tsvs_is_a_clear_error(bad_corpus, tmp_path):
    with pytest.raises(PhonetuneError, match=r"fr has none of train.tsv, dev.tsv, test.tsv"):
        prepare(
            PrepareOptions(
                cv_root=bad_corpus[0], locales=["en", "fr"], out=tmp_path / "p", cache_dir=tmp_path
            )
        )


def test_missing_cv_root_is_a_clear_error(tmp_path):
    with pytest.raises(PhonetuneError, match="--cv-root .* is not a directory"):
        prepare(PrepareOptions(cv_root=tmp_path / "nope", locales=["en"], out=tmp_path / "p"))


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    from phonetune.cli import main

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
    from phonetune.data.vocab import RELEASED_VOCAB_PATH

    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "ð": 4, "ə": 5}))
    corpus = tmp_path / "cv"
    shutil.copytree(bad_corpus[0] / "en", corpus / "en", symlinks=True)
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
