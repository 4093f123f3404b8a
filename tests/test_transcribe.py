"""`phonetune transcribe`: any format and rate in, the same phones as the model card's code out;
long recordings in windows; an unreadable file reported while the others are still transcribed."""

import json

import numpy as np
import pytest
import soundfile
import soxr
import torch
from helpers import SAMPLE_RATE, synthesizer, write_checkpoint
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

from phonetune.cli import main
from phonetune.data.espeak import synthesis_voice
from phonetune.data.vocab import SPECIAL_TOKENS
from phonetune.infer import transcribe
from phonetune.infer.export import export_model
from phonetune.infer.transcribe import (
    FrameStitcher,
    WindowPlan,
    split_into_windows,
    transcribe_files,
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, audio_files):
    root = tmp_path_factory.mktemp("transcribe")
    write_checkpoint(root / "run", 5, seed=5)
    _, files = audio_files
    # --audio: the export checks run on a file (no prepared data in this checkpoint's config).
    return export_model(
        root / "run", root / "export", audio=files["bread_22k.ogg"][0], verbose=False
    )


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """The same kinds of files users have: WAV, FLAC, MP3, OGG at several rates, one stereo."""
    folder = tmp_path_factory.mktemp("audio")
    synth = synthesizer()
    files = {}
    for name, text, voice, rate, channels, kind in [
        ("hello_8k.wav", "hello my friend", "en-us", 8_000, 1, "WAV"),
        ("bonjour_44k_stereo.flac", "bonjour tout le monde", "fr-fr", 44_100, 2, "FLAC"),
        ("morning_48k.mp3", "good morning to you all", "en-us", 48_000, 1, "MP3"),
        ("bread_22k.ogg", "we like warm bread", "en-us", 22_050, 1, "OGG"),
    ]:
        wave = soxr.resample(synth.speak(text, synthesis_voice(voice)), synth.sample_rate, rate)
        data = np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave
        soundfile.write(folder / name, data, rate, format=kind)
        files[name] = (folder / name, len(wave) / rate)
    (folder / "broken.wav").write_bytes(b"RIFF this is not audio")
    return folder, files


def model_card_phones(export_dir, wave_16k):
    """What the released model card's code prints for this audio (special tokens dropped)."""
    processor = Wav2Vec2Processor.from_pretrained(export_dir)
    model = Wav2Vec2ForCTC.from_pretrained(export_dir).eval()
    with torch.no_grad():
        logits = model(
            processor(wave_16k, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        ).logits
    decoded = processor.batch_decode(torch.argmax(logits, dim=-1))[0]
    return " ".join(p for p in decoded.split(" ") if p not in SPECIAL_TOKENS)


def read_16k(path):
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return soxr.resample(samples.mean(axis=1), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def test_formats_and_rates_give_the_model_card_phones(export_dir, audio_files):
    folder, files = audio_files
    paths = [path for path, _ in files.values()]
    transcripts = transcribe_files(export_dir, paths)  # one padded batch for all files
    assert [t.path for t in transcripts] == [str(p) for p in paths]
    for transcript, (path, seconds) in zip(transcripts, files.values(), strict=True):
        assert transcript.error is None
        # Resampled to 16 kHz: the duration is the recording's (MP3 adds a little encoder padding).
        assert transcript.duration == pytest.approx(seconds, abs=0.06)
        assert transcript.phones and "  " not in transcript.phones
        assert transcript.phones == model_card_phones(export_dir, read_16k(path))


def test_unreadable_file_is_reported_and_the_others_transcribed(export_dir, audio_files, capsys):
    folder, files = audio_files
    good = files["hello_8k.wav"][0]
    missing = folder / "missing.flac"
    code = main(
        ["transcribe", str(export_dir), str(good), str(folder / "broken.wav"), str(missing)]
    )
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{good}\t") and len(lines[0].split("\t")[1]) > 0
    assert "broken.wav" in captured.err and "missing.flac" in captured.err
    assert "Traceback" not in captured.err


def test_json_output(export_dir, audio_files, capsys):
    folder, files = audio_files
    good = files["bonjour_44k_stereo.flac"][0]
    code = main(["transcribe", str(export_dir), str(good), str(folder / "broken.wav"), "--json"])
    assert code == 1
    results = json.loads(capsys.readouterr().out)
    assert (
        results[0]["path"] == str(good)
        and results[0]["phones"]
        and results[0]["duration"] == pytest.approx(files["bonjour_44k_stereo.flac"][1], abs=0.01)
    )
    assert "error" not in results[0]
    assert results[1]["path"].endswith("broken.wav") and "cannot read" in results[1]["error"]
    assert "phones" not in results[1]


def test_split_into_windows():
    """Windows overlap by the plan's overlap, start on the frame grid, end with the recording, and
    do not depend on how the recording arrives in blocks."""
    plan = WindowPlan.of(20, 2, 320)
    assert (plan.size, plan.step) == (20 * SAMPLE_RATE, 18 * SAMPLE_RATE)
    wave = np.arange(45 * SAMPLE_RATE, dtype=np.float32)
    whole = list(split_into_windows([wave], plan))
    blocks = [wave[i : i + 7777] for i in range(0, len(wave), 7777)]
    streamed = list(split_into_windows(blocks, plan))
    # The last window ends at the end and starts a window before it: 25 s, not 36 s.
    assert [w.start / SAMPLE_RATE for w in whole] == [0, 18, 25]
    for a, b in zip(whole, streamed, strict=True):
        assert a.start == b.start and a.start % 320 == 0
        assert np.array_equal(a.wave, wave[a.start : a.start + plan.size])
        assert np.array_equal(a.wave, b.wave)
    # Exactly two windows long: no third window; shorter than one window: one window.
    assert [w.start for w in split_into_windows([wave[: 38 * SAMPLE_RATE]], plan)] == [0, plan.step]
    (single,) = split_into_windows([wave[: 10 * SAMPLE_RATE]], plan)
    assert single.start == 0 and len(single.wave) == 10 * SAMPLE_RATE
    # A window of half a second shares at most a third of it (the cut sits in the middle third).
    small = WindowPlan.of(0.6, 2, 320)
    assert small.size == 30 * 320 and small.size - small.step == 10 * 320


def test_stitched_windows_keep_every_phone_once():
    """Windows that each see a recording's best path, except near their edges (where they lack
    context and get frames wrong), stitch back into exactly the whole path's phones."""
    rng = np.random.default_rng(0)
    # A best path of 3,000 frames: phones 1-9 of 1-3 frames, each followed by 1-4 blanks, and
    # phones that repeat (a blank between them keeps them two).
    truth = []
    for _ in range(700):
        truth += [int(rng.integers(1, 10))] * int(rng.integers(1, 4))
        truth += [0] * int(rng.integers(1, 5))
    truth = np.array(truth[:3000])
    size, step, edge = 200, 150, 12  # frames; each window gets its outer 12 frames wrong
    stitcher = FrameStitcher()
    starts = list(range(0, len(truth) - size, step)) + [len(truth) - size]
    for start in starts:
        ids = truth[start : start + size].copy()
        for part in (slice(0, edge), slice(size - edge, size)):
            if (part.start == 0 and start > 0) or (part.stop == size and start + size < len(truth)):
                ids[part] = rng.integers(0, 10, edge)
        stitcher.add(start, ids, np.ones(size, dtype=np.float32))
    ids, probs = stitcher.finish()
    assert np.array_equal(ids, truth) and len(probs) == len(truth)


def test_long_recording_is_streamed_in_blocks_with_the_same_phones(
    export_dir, audio_files, monkeypatch
):
    """A recording longer than a window is read block by block and recognised in overlapping
    windows: the phones do not depend on the block size, and every phone has a place in time."""
    _, files = audio_files
    path, seconds = files["morning_48k.mp3"]
    (big_blocks,) = transcribe_files(export_dir, [path], chunk_seconds=0.5)
    monkeypatch.setattr(transcribe, "STREAM_BLOCK_SECONDS", 0.17)
    (small_blocks,) = transcribe_files(export_dir, [path], chunk_seconds=0.5)
    assert seconds > 2 * 0.5 and big_blocks.error is None
    assert big_blocks.phones and big_blocks.phones == small_blocks.phones
    assert big_blocks.phones == " ".join(span.phone for span in big_blocks.spans)
    ends = [0.0] + [span.end for span in big_blocks.spans]
    for span, previous_end in zip(big_blocks.spans, ends, strict=False):
        assert previous_end <= span.start < span.end <= big_blocks.duration
        assert 0 <= span.confidence <= 1


def test_each_unusable_file_says_what_is_wrong_with_it(export_dir, audio_files, capfd):
    """A file missing, a folder, an empty file, text named .mp3, an MP3 that is only an ID3 tag,
    an MP3 with garbage in the middle, one sample of audio: each is named once, with its problem;
    the decoder's own notes (mpg123's "Illegal Audio-MPEG-Header") stay out of the output."""
    folder, files = audio_files
    bad = folder / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.mp3").write_bytes(b"")
    (bad / "notes.mp3").write_text("these are my notes, not audio\n", encoding="utf-8")
    # ID3v2.4 header: "ID3", version 4.0, no flags, a 10-byte tag (7-bit size bytes), no frames.
    (bad / "tag_only.mp3").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10))
    mp3 = files["morning_48k.mp3"][0].read_bytes()
    middle = len(mp3) // 2
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (bad / "damaged.mp3").write_bytes(mp3[:middle] + noise + mp3[middle:])
    soundfile.write(bad / "one_sample.wav", np.zeros(1, dtype=np.float32), SAMPLE_RATE)
    names = ["missing.mp3", "empty.mp3", "notes.mp3", "tag_only.mp3", "damaged.mp3"]
    argv = ["transcribe", str(export_dir), *(str(bad / n) for n in names)]
    argv += [str(bad), str(bad / "one_sample.wav")]
    capfd.readouterr()
    assert main(argv) == 1
    captured = capfd.readouterr()
    err = captured.err
    expected = {
        "missing.mp3": f"error: no such file: {bad / 'missing.mp3'}",
        "empty.mp3": "empty.mp3: the file is empty (0 bytes)",
        "notes.mp3": "notes.mp3: holds text, not audio",
        "tag_only.mp3": "tag_only.mp3: an MP3 with an ID3 tag and no audio after it",
        "one_sample.wav": "note: " + str(bad / "one_sample.wav") + ": too short: 0.0001 s",
    }
    for name, words in expected.items():
        assert words in err, (name, err)
        assert err.count(name) == 1, (name, err)  # named once, not three times
    assert f"cannot read {bad}: is a folder" in err
    # The damaged MP3 decodes or is reported, but libmpg123's chatter never reaches the user.
    assert "Illegal Audio-MPEG-Header" not in err + captured.out
    assert "resync" not in err + captured.out
    assert "Traceback" not in err
