"""Input meant to break phonetune: special files, senseless numbers, silence, and random bytes, JSON
and option values fed to every command. Each ends in exit 0, 1 (some inputs failed, the others
were done) or 2 (refused, with a message), in bounded time: never a traceback, never a hang."""

import contextlib
import json
import math
import os
import random
import shutil
import signal

import numpy as np
import pytest
import soundfile
from helpers import FAST, MICRO, SAMPLE_RATE, speech, write_checkpoint

from phonetune.cli import main
from phonetune.data.commonvoice import Rejection, read_split
from phonetune.infer.transcribe import SILENT_RMS_DBFS, transcribe_files


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile") / "run"
    write_checkpoint(run, 5, seed=5)
    return run


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "hello.wav"
    soundfile.write(path, speech("hello my friend"), SAMPLE_RATE)
    return path


@contextlib.contextmanager
def time_limit(seconds):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(capsys, argv, seconds=60):
    """main(argv) in this process: its exit code and what it printed (argparse exits through
    SystemExit; anything else escaping main is the defect this file looks for)."""
    with time_limit(seconds):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:
            code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- special files --------------------------------------------------------------------------------
def test_a_named_pipe_is_refused_without_waiting_and_the_other_files_are_transcribed(
    model_run, clip, tmp_path, capsys
):
    pipe = tmp_path / "pipe.mp3"
    os.mkfifo(pipe)  # opening it for reading would wait for a writer forever
    code, output = run_cli(capsys, ["transcribe", model_run, pipe, clip], seconds=60)
    assert code == 1, output
    assert f"cannot read {pipe}: is not a regular file" in output
    assert f"{clip}\t" in output  # the file after it was still transcribed


def test_a_named_pipe_listed_in_a_tsv_is_rejected_per_row(tmp_path):
    clips = tmp_path / "en" / "clips"
    clips.mkdir(parents=True)
    os.mkfifo(clips / "pipe.mp3")
    tsv = tmp_path / "en" / "train.tsv"
    tsv.write_text("client_id\tpath\tsentence\nspeaker\tpipe.mp3\thello\n", encoding="utf-8")
    with time_limit(30):
        (item,) = list(read_split(tmp_path, "en", "train", tsv))
    assert isinstance(item, Rejection) and item.reason == "unreadable_audio"
    assert "en/clips/pipe.mp3 is not a regular file" in item.detail


# --- numbers that make no sense ---------------------------------------------------------------------
BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e999", "ten", ""]


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize(
    "command,option",
    [
        ("transcribe", "--chunk-seconds"),
        ("transcribe", "--batch-seconds"),
        ("evaluate", "--batch-seconds"),
        ("prepare", "--max-duration"),
        ("prepare", "--num-workers"),
        ("synth", "--clips-per-locale"),
        ("synth", "--num-workers"),
        ("demo", "--max-steps"),
        ("demo", "--clips-per-locale"),
        ("demo", "--num-workers"),
    ],
)
def test_numeric_options_refuse_nan_infinity_and_values_out_of_range(
    command, option, value, model_run, clip, tmp_path, capsys
):
    argv = {
        "transcribe": ["transcribe", model_run, clip],
        "evaluate": ["evaluate", model_run, "--data", tmp_path / "no_data"],
        "prepare": ["prepare", "--cv-root", tmp_path, "--locales", "en", "--out", tmp_path / "p"],
        "synth": ["synth", "--out", tmp_path / "s"],
        "demo": ["demo", "--out", tmp_path / "d"],
    }[command]
    code, output = run_cli(capsys, [*argv, f"{option}={value}"], seconds=30)
    assert code == 2, output
    assert f"argument {option}" in output or f"{option} must be" in output, output
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "1e999"])
def test_prepare_refuses_a_minimum_duration_below_zero_or_not_finite(value, tmp_path, capsys):
    argv = ["prepare", "--cv-root", tmp_path, "--locales", "en", "--out", tmp_path / "p"]
    code, output = run_cli(capsys, [*argv, f"--min-duration={value}"], seconds=30)
    assert code == 2 and "argument --min-duration" in output, output


def test_evaluate_refuses_an_output_it_cannot_write_before_evaluating(
    model_run, prepared_dir, tmp_path, capsys
):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, output = run_cli(
        capsys, ["evaluate", model_run, "--data", prepared_dir, "--out", folder], seconds=30
    )
    assert code == 2 and f"--out {folder} is a folder" in output, output
    assert "PER" not in output  # nothing was evaluated first

    inside_a_file = tmp_path / "a_file"
    inside_a_file.write_text("x")
    code, output = run_cli(
        capsys,
        ["evaluate", model_run, "--data", prepared_dir, "--out", inside_a_file / "e.json"],
        seconds=30,
    )
    assert code == 2 and "is a file, not a folder" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]


# --- silence ----------------------------------------------------------------------------------------
def test_silence_gives_no_phones_and_says_so(model_run, tmp_path):
    silence = tmp_path / "silence.wav"
    soundfile.write(silence, np.zeros(50 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    # 10 s holding speech, then 30 s of faint noise 10 dB under the threshold.
    spoken = speech("hello my friend")
    first = np.concatenate([spoken, np.zeros(10 * SAMPLE_RATE - len(spoken), np.float32)])
    level = 10 ** ((SILENT_RMS_DBFS - 10) / 20)
    faint = np.random.default_rng(0).normal(0, level, 30 * SAMPLE_RATE).astype(np.float32)
    mixed, alone = tmp_path / "speech_then_faint_noise.wav", tmp_path / "speech.wav"
    soundfile.write(mixed, np.concatenate([first, faint]), SAMPLE_RATE, subtype="FLOAT")
    soundfile.write(alone, first, SAMPLE_RATE, subtype="FLOAT")

    quiet, together = transcribe_files(model_run, [silence, mixed], chunk_seconds=10)
    assert quiet.phones == "" and quiet.duration == 50.0
    assert (
        quiet.note == f"silence: the recording is below {SILENT_RMS_DBFS:g} dBFS (RMS), no phones"
    )
    # Windows of 10 s overlapping by 2 s start at 0, 8, 16, 24 and, the last ending at the end, 30.
    assert together.note == (
        f"silence: 4 of 5 windows (30.0 s) below {SILENT_RMS_DBFS:g} dBFS (RMS), not transcribed"
    )
    # The speech window is transcribed as it is on its own (the same samples, a batch of one) up to
    # where the next window takes over (in their 2 s overlap, which the random model fills with a
    # phone or two on the zeros after the speech).
    (speech_only,) = transcribe_files(model_run, [alone], chunk_seconds=10)
    assert speech_only.phones != "" and speech_only.note is None

    def first_8_seconds(transcript):
        return [span.phone for span in transcript.spans if span.start < 8.0]

    assert first_8_seconds(together) == first_8_seconds(speech_only) != []


# --- random input to every command ------------------------------------------------------------------
def random_json(rng, depth=0):
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, -(2**70), rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([math.nan, math.inf, -math.inf, -0.0, 1e-300, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 12)))
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_json_key(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def random_json_key(rng):
    return rng.choice(["vocab_size", "hidden_size", "step", "splits", "<pad>", "a", ""])


def random_payload(rng, original: bytes) -> bytes:
    """Random bytes, random JSON, or the original JSON with one value replaced at random."""
    kind = rng.choice(["bytes", "json", "edit"])
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 2048)))
    if kind == "json":
        return json.dumps(random_json(rng)).encode()
    try:
        value = json.loads(original)
    except ValueError:
        return original[: rng.randint(0, len(original))]
    if isinstance(value, dict) and value:
        value[rng.choice(sorted(value))] = random_json(rng)
    return json.dumps(value).encode()


RANDOM_OPTION_VALUES = ["nan", "inf", "-1", "0", "1e999", "0.0001", "x", "", "3", "1e-300"]


def random_case(rng, root, model_run, clip, prepared_dir):
    """One command with one random input: a damaged file of the model, an audio file of random
    bytes, a random config, or a random option value."""
    case = root / f"case_{rng.randrange(10**9)}"
    case.mkdir()
    model = case / "run"
    shutil.copytree(model_run, model)
    kind = rng.choice(["model_file", "audio", "config", "option", "corpus"])
    if kind == "corpus":
        return ["prepare", "--cv-root", random_corpus(rng, case, clip), "--locales", "en",
                "--out", case / "prep", "--num-workers", "1"]  # fmt: skip
    if kind == "model_file":
        files = sorted(p for p in model.rglob("*") if p.is_file())
        target = rng.choice(files)
        target.write_bytes(random_payload(rng, target.read_bytes()))
        command = rng.choice(["transcribe", "evaluate", "export"])
    elif kind == "audio":
        command = "transcribe"
    elif kind == "config":
        command = "train"
    else:
        command = rng.choice(["transcribe", "evaluate", "export", "train"])
    audio = clip
    if kind == "audio":
        audio = case / f"random{rng.choice(['.mp3', '.wav', '.flac', '.ogg', ''])}"
        audio.write_bytes(random_payload(rng, b""))
    value = rng.choice(RANDOM_OPTION_VALUES)
    if command == "transcribe":
        option = rng.choice(["--chunk-seconds", "--batch-seconds", "--step"])
        argv = ["transcribe", model, audio] + ([f"{option}={value}"] if kind == "option" else [])
    elif command == "evaluate":
        option = rng.choice(["--batch-seconds", "--step", "--split"])
        argv = ["evaluate", model, "--data", prepared_dir, "--out", case / "e.json"]
        argv += [f"{option}={value}"] if kind == "option" else []
    elif command == "export":
        argv = ["export", model, "--out", case / "export"]
        argv += [f"--step={value}"] if kind == "option" else []
    else:
        config = case / "config.yaml"
        config.write_bytes(random_payload(rng, b'{"train": {"max_steps": 1}}'))
        key = rng.choice(["train.lr", "train.batch_seconds", "train.max_steps", "model.layerdrop"])
        argv = [
            "train",
            "--config",
            config if kind == "config" else "tiny_cpu",
            f"data.prepared_dir={prepared_dir}",
            f"run.output_dir={case / 'train_run'}",
            *MICRO,
            *FAST,
            "train.max_steps=1",
            *([f"{key}={value}"] if kind == "option" else []),
        ]
    return argv


# More cases or another seed for a longer search: PHONETUNE_FUZZ_CASES=2000 PHONETUNE_FUZZ_SEED=7
def random_corpus(rng, case, clip):
    """A Common Voice folder for locale en whose TSV, or the clips it names, are random."""
    root = case / "cv"
    clips = root / "en" / "clips"
    clips.mkdir(parents=True)
    shutil.copy(clip, clips / "good.wav")
    (clips / "noise.mp3").write_bytes(random_payload(rng, b""))
    rows = ["client_id\tpath\tsentence"]
    for _ in range(rng.randint(0, 4)):
        path = rng.choice(["good.wav", "noise.mp3", "../good.wav", "missing.mp3", "", "clips"])
        sentence = rng.choice(["hello world", "", "123", random_json(rng), "\t\t"])
        rows.append(f"{random_json(rng)}\t{path}\t{sentence}")
    text = "\n".join(rows).encode("utf-8", "surrogatepass")
    (root / "en" / "train.tsv").write_bytes(
        random_payload(rng, b"") if rng.random() < 0.3 else text
    )
    return root


FUZZ_CASES = int(os.environ.get("PHONETUNE_FUZZ_CASES", "60"))
FUZZ_SEED = int(os.environ.get("PHONETUNE_FUZZ_SEED", "19"))


@pytest.mark.slow
def test_random_bytes_json_and_option_values_never_end_in_a_traceback_or_hang(
    model_run, clip, prepared_dir, tmp_path, capsys
):
    rng = random.Random(FUZZ_SEED)  # the same cases on every machine: a failure can be replayed
    outcomes = []
    for _ in range(FUZZ_CASES):
        argv = random_case(rng, tmp_path, model_run, clip, prepared_dir)
        try:
            code, output = run_cli(capsys, argv, seconds=120)
        except Exception as error:  # the defect: report the command that raised it
            pytest.fail(f"{' '.join(map(str, argv))} raised {type(error).__name__}: {error}")
        assert code in (0, 1, 2), (argv, code, output[-2000:])
        assert "Traceback" not in output, (argv, output[-2000:])
        if code != 0:
            assert "error" in output, (argv, output[-2000:])  # a failure says what failed
        outcomes.append(code)
    # The cases reach both sides: some inputs are refused, some still work.
    assert 2 in outcomes and 0 in outcomes, outcomes
