"""No file phonetune reads ends in a traceback.

Each file of a run, an export and a prepared dataset is damaged in turn (cut in half, overwritten
with bytes that are not text, valid JSON of the wrong shape) and each command that reads it runs
through the CLI: it exits 2 with a message naming the damaged file, or, where the file is not
needed to go on, finishes (exit 0) and says what it could not use. `train resume=auto` goes back to
the newest checkpoint that can be loaded.
"""

import shutil

import pytest
from helpers import FAST, MICRO

from phonetune.cli import main
from phonetune.data.errors import PhonetuneError
from phonetune.data.files import read_json, read_yaml
from phonetune.train.checkpoint import find_damage

GARBAGE = bytes(range(256)) * 4  # not UTF-8, not JSON, not a zip archive, not safetensors
DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: GARBAGE,
    "wrong_type": lambda data: b"[1, 2, 3]\n",  # valid JSON and YAML, not an object
}
TEXT_SUFFIXES = (".json", ".yaml", ".jsonl")


def damages_for(name):
    text = name.endswith(TEXT_SUFFIXES)
    return [damage for damage in DAMAGES if text or damage != "wrong_type"]


def cases(files):
    return [(name, damage) for name in files for damage in damages_for(name)]


@pytest.fixture(scope="module")
def originals(prepared_dir, cv_corpus, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, its export, and the prepared dataset: untouched."""
    root = tmp_path_factory.mktemp("damaged")
    run = root / "run"
    train_args = [f"data.prepared_dir={prepared_dir}", *MICRO, *FAST, "train.save_steps=2"]
    assert (
        main(
            [
                "train",
                "--config",
                "tiny_cpu",
                f"run.output_dir={run}",
                *train_args,
                "train.max_steps=4",
            ]
        )
        == 0
    )
    assert main(["export", str(run), "--out", str(root / "export")]) == 0
    shutil.copytree(prepared_dir, root / "prep")
    clip = sorted(cv_corpus.rglob("*.mp3"))[0]
    return {"root": root, "train_args": train_args, "clip": clip}


def damaged_copy(originals, tmp_path, kind, name, damage):
    """A copy of the run, export or prepared dataset (`kind`) with file `name` damaged."""
    copy = tmp_path / kind
    shutil.copytree(originals["root"] / kind, copy)
    path = copy / name
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    return copy, path


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


NEWEST = "checkpoints/step_4/"
CHECKPOINT_FILES = [
    NEWEST + name
    for name in (
        "state.json",
        "vocab.json",
        "model/config.json",
        "model/model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pt",
    )
]
# Not needed to continue: the settings (compared, for warnings) and the metrics history.
RECORD_FILES = [NEWEST + "config.yaml", "metrics.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("name,damage", cases(CHECKPOINT_FILES + RECORD_FILES))
def test_resume_auto_goes_back_to_the_newest_loadable_checkpoint(
    originals, tmp_path, capsys, name, damage
):
    run, path = damaged_copy(originals, tmp_path, "run", name, damage)
    code, output = run_cli(
        capsys,
        "train",
        "--config",
        "tiny_cpu",
        f"run.output_dir={run}",
        *originals["train_args"],
        "train.max_steps=6",
        "resume=auto",
    )
    assert code == 0, output
    if name in CHECKPOINT_FILES:
        assert "step_4 cannot be loaded" in output and path.name in output
        assert "resumed from step 2" in output.lower() or "(2 -> 6)" in output, output
    elif name.endswith("config.yaml"):
        # cut in half, YAML may still parse: then the missing settings are reported as changed
        damaged_text = f"{path}" in output and "cannot be compared" in output
        assert damaged_text or "differs from the checkpoint's config" in output, output
    assert (run / "checkpoints" / "step_6" / "state.json").is_file()
    # training went through step 4 again and wrote a whole checkpoint in place of the damaged one
    assert find_damage(run / "checkpoints" / "step_4") is None


@pytest.mark.slow
@pytest.mark.parametrize("name,damage", cases(CHECKPOINT_FILES[:4]))
def test_export_and_evaluate_name_the_damaged_file_of_a_checkpoint(
    originals, tmp_path, capsys, prepared_dir, name, damage
):
    run, path = damaged_copy(originals, tmp_path, "run", name, damage)
    for argv in (
        ["export", run, "--out", tmp_path / "x"],
        ["evaluate", run, "--data", prepared_dir, "--split", "dev", "--out", tmp_path / "e.json"],
    ):
        code, output = run_cli(capsys, *argv)
        assert code == 2 and path.name in output and "Traceback" not in output, output
        assert str(path.parent) in output, output


EXPORT_FILES = [
    "config.json",
    "model.safetensors",
    "vocab.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
]


@pytest.mark.slow
@pytest.mark.parametrize("name,damage", cases(EXPORT_FILES))
def test_evaluate_and_transcribe_name_the_damaged_file_of_an_export(
    originals, tmp_path, capsys, prepared_dir, name, damage
):
    export, path = damaged_copy(originals, tmp_path, "export", name, damage)
    for argv in (
        [
            "evaluate",
            export,
            "--data",
            prepared_dir,
            "--split",
            "dev",
            "--out",
            tmp_path / "e.json",
        ],
        ["transcribe", export, originals["clip"]],
    ):
        code, output = run_cli(capsys, *argv)
        assert code == 2 and str(path) in output, output


PREPARED_FILES = [
    "dataset_dict.json",
    "vocab.json",
    "dev/state.json",
    "dev/dataset_info.json",
    "dev/data-00000-of-00004.arrow",
]


@pytest.mark.slow
@pytest.mark.parametrize("name,damage", cases(PREPARED_FILES))
def test_train_and_evaluate_name_the_damaged_file_of_a_prepared_dataset(
    originals, tmp_path, capsys, name, damage
):
    prep, path = damaged_copy(originals, tmp_path, "prep", name, damage)
    export = originals["root"] / "export"
    train_args = [arg for arg in originals["train_args"] if not arg.startswith("data.prepared_dir")]
    commands = [
        [
            "train",
            "--config",
            "tiny_cpu",
            f"run.output_dir={tmp_path / 'r'}",
            f"data.prepared_dir={prep}",
            *train_args,
            "train.max_steps=1",
        ],
    ]
    if name != "vocab.json":  # evaluate uses the model's vocabulary, not the dataset's
        commands.append(
            ["evaluate", export, "--data", prep, "--split", "dev", "--out", tmp_path / "e.json"]
        )
    for argv in commands:
        code, output = run_cli(capsys, *argv)
        assert code == 2 and str(path) in output, output


def test_a_damaged_prep_report_only_loses_its_description(originals, tmp_path, capsys):
    """prep_report.json describes the data (versions, hours): training goes on without it."""
    from phonetune.data.prepared import read_report

    prep, _ = damaged_copy(originals, tmp_path, "prep", "prep_report.json", "garbage")
    assert read_report(prep) == {}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_type", "empty"])
@pytest.mark.parametrize("reader,suffix", [(read_json, ".json"), (read_yaml, ".yaml")])
def test_readers_name_the_file_and_what_is_wrong(tmp_path, reader, suffix, damage):
    path = tmp_path / f"settings{suffix}"
    payload = {
        "truncated": b'{"a": [1, 2' if suffix == ".json" else b"a: [1, 2\nb: {",
        "garbage": GARBAGE,
        "wrong_type": b"[1, 2, 3]\n",
        "empty": b"",
    }[damage]
    path.write_bytes(payload)
    with pytest.raises(PhonetuneError) as raised:
        reader(path, dict, "Write it again.")
    message = str(raised.value)
    assert message.startswith(f"{path} is damaged: ") and message.endswith(". Write it again.")
    expected = {
        "truncated": "not valid",
        "garbage": "not UTF-8 text",
        "wrong_type": "is a list, not an object",
        "empty": "empty" if suffix == ".json" else "is nothing, not an object",
    }[damage]
    assert expected in message
