"""`phonetune align` (CTC forced alignment), `transcribe --timestamps` and `--textgrid`: the
Viterbi path is the best one, every phone gets a place in time, TextGrids read back with praatio,
and each bad input is one clear error while the other clips are still aligned."""

import itertools
import json

import numpy as np
import pytest
import soundfile
from helpers import SAMPLE_RATE, VOCAB, speech, write_checkpoint, write_prepared
from praatio import textgrid

from phonetune.cli import main
from phonetune.data.ctc import WAV2VEC2_CONV_LAYERS
from phonetune.data.phonemize import phonemize_batch
from phonetune.infer.align import FrameTiming, greedy_spans, viterbi_states

TEXT = "hello my friend"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Speech files, an empty one, and a checkpoint whose vocabulary holds TEXT's phones."""
    folder = tmp_path_factory.mktemp("align")
    phones = phonemize_batch([TEXT], "en-us")[0].split()
    vocab = {
        token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *sorted(set(phones))])
    }
    checkpoint = write_checkpoint(folder / "run", 3, seed=3, vocab=vocab)
    soundfile.write(folder / "hello.wav", speech(TEXT), SAMPLE_RATE)
    soundfile.write(folder / "short.flac", speech("hi"), SAMPLE_RATE)  # ~0.3 s: about 15 frames
    soundfile.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    return folder, checkpoint, phones


def brute_force_best(log_probs, targets):
    """The best CTC path by trying every state sequence (tiny cases only)."""
    states = [0] + [x for t in targets for x in (t, 0)]
    best, best_path = -np.inf, None
    for path in itertools.product(range(len(states)), repeat=len(log_probs)):
        if path[0] > 1 or path[-1] < len(states) - 2:
            continue
        steps = [b - a for a, b in zip(path, path[1:], strict=False)]
        if any(
            d not in (0, 1, 2) or (d == 2 and (states[b] == 0 or states[b] == states[b - 2]))
            for d, b in zip(steps, path[1:], strict=True)
        ):
            continue
        score = sum(log_probs[t, states[s]] for t, s in enumerate(path))
        if score > best:
            best, best_path = score, path
    return best, best_path


def test_viterbi_finds_the_best_ctc_path():
    rng = np.random.default_rng(0)
    for _ in range(40):
        frames, length = int(rng.integers(2, 7)), int(rng.integers(1, 4))
        targets = rng.integers(1, 4, length)  # repeats included: they need a blank between
        log_probs = np.log(rng.dirichlet(np.ones(4), frames))
        best, best_path = brute_force_best(log_probs, targets.tolist())
        path, total = viterbi_states(log_probs, targets)
        if best_path is None:  # too few frames for these phones: no path at all
            assert total == -np.inf
            continue
        assert total == pytest.approx(best)
        states = np.r_[0, np.stack([targets, np.zeros_like(targets)], 1).ravel()]
        assert sum(log_probs[t, states[s]] for t, s in enumerate(path)) == pytest.approx(best)


def test_frame_timing_of_the_wav2vec2_encoder():
    """50 frames per second; frame t stands for the 20 ms centred on its 25 ms receptive field."""
    timing = FrameTiming.of(WAV2VEC2_CONV_LAYERS)
    assert timing.hop == 0.02 and timing.offset == pytest.approx((400 - 320) / 2 / SAMPLE_RATE)
    assert timing.span(10, 12, 5.0) == pytest.approx((0.2025, 0.2625))
    assert timing.span(0, 0, 0.01) == pytest.approx((0.0025, 0.01))  # clipped to the clip's end


def test_greedy_spans_follow_the_best_path():
    """Runs of one id are one phone (repeats after a blank are two), blanks and special tokens
    belong to no phone, and confidence is the mean top posterior of the phone's frames."""
    id_to_token = {i: t for t, i in VOCAB.items()}
    ids = np.array([0, 4, 4, 0, 4, 7, 7, 7, 1, 0, 10])
    probs = np.array([1, 0.9, 0.5, 1, 0.8, 0.6, 0.6, 0.9, 1, 1, 0.3])
    spans = greedy_spans(ids, probs, id_to_token, FrameTiming(0.02, 0.0), 1.0)
    assert [(s.phone, s.start, s.end) for s in spans] == [
        ("a", 0.02, 0.06),
        ("a", 0.08, 0.1),
        ("n", 0.1, pytest.approx(0.16)),
        ("s", 0.2, 0.22),
    ]
    assert [s.confidence for s in spans] == pytest.approx([0.7, 0.8, 0.7, 0.3])


def check_spans(phones, duration):
    """In order, non-overlapping, start < end within the clip, confidence in [0, 1]."""
    previous_end = 0.0
    for phone in phones:
        assert previous_end <= phone["start"] < phone["end"] <= duration + 1e-9
        assert 0.0 <= phone["confidence"] <= 1.0
        previous_end = phone["end"]


def test_align_phones_json(clips, capsys):
    folder, checkpoint, phones = clips
    argv = ["align", str(checkpoint), "--audio", str(folder / "hello.wav"), "--json"]
    assert main([*argv, "--phones", " ".join(phones)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert [p["phone"] for p in result["phones"]] == phones
    check_spans(result["phones"], result["duration"])
    assert result["duration"] == round(soundfile.info(folder / "hello.wav").duration, 3)
    assert result["score"] <= 0.0  # a mean log probability


def test_align_text_writes_phones_and_words_tiers(clips, tmp_path, capsys):
    folder, checkpoint, phones = clips
    grids = tmp_path / "grids"
    argv = ["align", str(checkpoint), "--audio", str(folder / "hello.wav"), "--text", TEXT]
    assert main([*argv, "--locale", "en", "--textgrid", str(grids), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    grid = textgrid.openTextgrid(str(grids / "hello.TextGrid"), includeEmptyIntervals=False)
    assert list(grid.tierNames) == ["phones", "words"]
    phone_tier = grid.getTier("phones").entries
    assert [e.label for e in phone_tier] == phones  # phonemized as prepare does
    assert [(e.start, e.end) for e in phone_tier] == [
        (p["start"], p["end"]) for p in result["phones"]
    ]
    words = grid.getTier("words").entries
    assert [w.label for w in words] == TEXT.split()
    # Each word spans its phones: hello = h ə l oʊ, my = m aɪ, friend = f ɹ ɛ n d.
    assert words[0].start == phone_tier[0].start and words[0].end == phone_tier[3].end
    assert words[1].start == phone_tier[4].start and words[2].end == phone_tier[-1].end
    assert grid.maxTimestamp == pytest.approx(result["duration"])


def test_batch_align_reports_each_bad_clip_and_aligns_the_rest(clips, tmp_path, capsys):
    """A TSV with a good row, a phone outside the vocabulary, more phones than the clip has frames,
    an empty file, a missing file and text in a script the locale's voice cannot read."""
    folder, checkpoint, phones = clips
    rows = [
        ("hello.wav", " ".join(phones), ""),
        ("hello.wav", "h ə l oʊ QQ ʒʒ", ""),
        ("short.flac", " ".join(phones * 2), ""),
        ("empty.wav", "h ə", ""),
        ("missing.wav", "h ə", ""),
        ("hello.wav", "", "Привет"),
    ]
    tsv = folder / "batch.tsv"
    tsv.write_text(
        "audio\tphones\ttext\n" + "".join("\t".join(row) + "\n" for row in rows), encoding="utf-8"
    )
    code = main(["align", str(checkpoint), "--tsv", str(tsv), "--locale", "en", "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert code == 1 and "Traceback" not in captured.err
    assert [p["phone"] for p in results[0]["phones"]] == phones
    errors = [r.get("error", "") for r in results]
    assert "phones not in the model's vocabulary: QQ ʒʒ" in errors[1]
    assert "short.flac" in errors[2] and f"{2 * len(phones)} phones need at least" in errors[2]
    assert "cannot read" in errors[3] and "empty.wav: holds no samples" in errors[3]
    assert "missing.wav" in errors[4]
    assert "CYRILLIC letters cannot be read" in errors[5]
    assert all(f"error: {e}" in captured.err for e in errors[1:])


def test_align_prepared_split(clips, tmp_path, capsys):
    folder, checkpoint, _ = clips
    wave = speech("we like warm bread")
    prepared = write_prepared(
        tmp_path / "prep",
        [
            {"audio": wave, "phones": "a n s t", "locale": "en", "split": "test"},
            {"audio": wave[:8000], "phones": "n ə", "locale": "en", "split": "test"},
        ],
    )
    # Clips are named by their path in the prepared data; the phones are the transcripts'.
    other = write_checkpoint(tmp_path / "run", 1, seed=1)
    assert main(["align", str(other), "--data", str(prepared), "--split", "test", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [[p["phone"] for p in r["phones"]] for r in results] == [
        ["a", "n", "s", "t"],
        ["n", "ə"],
    ]
    assert results[1]["duration"] == 0.5
    for result in results:
        check_spans(result["phones"], result["duration"])


def test_align_options_are_checked_before_any_work(clips, capsys):
    folder, checkpoint, _ = clips
    audio = ["--audio", str(folder / "hello.wav")]
    for argv, message in [
        ([], "give one of --audio FILE, --tsv FILE or --data PREP --split S"),
        (audio, '--audio needs --phones "p h o n e s" or --text'),
        ([*audio, "--text", "hello"], "--text needs --locale"),
        ([*audio, "--phones", "  "], "--phones is empty"),
        ([*audio, "--text", "hi", "--locale", "xx-YY", "--json"], "xx-YY"),
        ([*audio, "--phones", "h", "--textgrid", str(folder / "hello.wav")], "--textgrid"),
    ]:
        code = main(["align", str(checkpoint), *argv])
        captured = capsys.readouterr()
        assert code in (1, 2) and message in captured.err, (argv, captured.err)
        assert "Traceback" not in captured.err


def test_transcribe_timestamps_table_json_and_textgrid(clips, tmp_path, capsys):
    folder, checkpoint, _ = clips
    files = [str(folder / "hello.wav"), str(folder / "short.flac")]
    assert main(["transcribe", str(checkpoint), *files]) == 0
    plain = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    grids = tmp_path / "grids"
    argv = ["transcribe", str(checkpoint), *files, "--timestamps", "--textgrid", str(grids)]
    assert main([*argv, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for result in results:
        # The same phones as without --timestamps, each in time.
        assert " ".join(p["phone"] for p in result["phones"]) == plain[result["path"]]
        check_spans(result["phones"], result["duration"])
        name = result["path"].rsplit("/", 1)[1].split(".")[0]
        grid = textgrid.openTextgrid(str(grids / f"{name}.TextGrid"), includeEmptyIntervals=False)
        assert list(grid.tierNames) == ["phones"]
        assert [(e.start, e.end, e.label) for e in grid.getTier("phones").entries] == [
            (p["start"], p["end"], p["phone"]) for p in result["phones"]
        ]
    assert results[0]["phones"], "a random head still outputs phones on speech"
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"{files[0]}\t{results[0]['duration']:.3f} s"
    assert table[1].split() == ["start", "end", "conf", "phone"]
    first = results[0]["phones"][0]
    assert table[2].split() == [
        f"{first['start']:.3f}",
        f"{first['end']:.3f}",
        f"{first['confidence']:.3f}",
        first["phone"],
    ]
