"""Every user mistake a `phonetune` command can meet: exit code 2 and one paragraph saying what is
wrong and what to do, never a traceback (unless `--debug` asks for it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import VOCAB, write_checkpoint

from phonetune.cli import main
from phonetune.data.errors import PhonetuneError

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Things for commands to trip over: a file, an empty folder, runs with odd checkpoints."""
    root = tmp_path_factory.mktemp("cli")
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "thesis.tex").write_text("precious")
    write_checkpoint(root / "run", 2)
    mismatched = write_checkpoint(root / "mismatched", 2)
    (mismatched / "vocab.json").write_text(json.dumps({**VOCAB, "zz": len(VOCAB)}))
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    return root


# (arguments, words the message must hold); {p} is the folder of `place`, {prep} a prepared dataset
CASES = {
    "prepare: --cv-root missing": (
        "prepare --cv-root {p}/nope --locales en --out {p}/out",
        ["--cv-root", "is not a directory", "extracted Common Voice release"],
    ),
    "prepare: unknown locale": (
        "prepare --cv-root {p} --locales en,xx-YY --out {p}/out",
        ["xx-YY", "Supported Common Voice locales"],
    ),
    "prepare: min above max duration": (
        "prepare --cv-root {p} --locales en --out {p}/out --min-duration 9 --max-duration 2",
        ["--min-duration < --max-duration"],
    ),
    "prepare: --vocab is a folder": (
        "prepare --cv-root {p} --locales en --out {p}/out --vocab {p}/empty",
        ["--vocab", "is a folder"],
    ),
    "prepare: --vocab missing": (
        "prepare --cv-root {p} --locales en --out {p}/out --vocab {p}/nope.json",
        ["vocabulary file", "does not exist"],
    ),
    "prepare: --out is a file": (
        "prepare --cv-root {p} --locales en --out {p}/a_file",
        ["--out", "not a directory"],
    ),
    "prepare: --out holds other files": (
        "prepare --cv-root {p} --locales en --out {p}",
        ["is not empty and holds no prepared dataset", "choose a new or empty folder"],
    ),
    "train: config file missing": (
        "train --config {p}/nope.yaml",
        ["config file", "does not exist", "Shipped recipes", "tiny_cpu, xlsr53_espeak_cv"],
    ),
    "train: no config": ("train", ["--config is required", "tiny_cpu", "--list-configs"]),
    "train: config is a folder": (
        "train --config {p}/empty",
        ["config file", "is a folder", "tiny_cpu"],
    ),
    "train: unknown key, wrong type, impossible values": (
        f"train --config {TINY} data.prepared_dir={{prep}} run.output_dir={{p}}/r train.lr=-1 "
        "train.batch_seconds=0 model.mask_time_prob=2 train.max_stepz=3 train.seed=one",
        [
            "unknown key train.max_stepz (did you mean train.max_steps?); valid keys in train:",
            "train.seed must be an integer",
            "train.lr must be positive",
            "train.batch_seconds must be positive",
            "model.mask_time_prob must be in [0, 1)",
        ],
    ),
    "train: learning rate NaN": (
        f"train --config {TINY} data.prepared_dir={{prep}} run.output_dir={{p}}/r train.lr=nan",
        ["train.lr must be a finite number"],
    ),
    "train: prepared dataset missing": (
        f"train --config {TINY} data.prepared_dir={{p}}/empty run.output_dir={{p}}/r",
        ["is not a prepared dataset", "phonetune prepare"],
    ),
    "train: run directory is a file": (
        f"train --config {TINY} data.prepared_dir={{prep}} run.output_dir={{p}}/a_file",
        ["run.output_dir", "is a file"],
    ),
    "train: resume from something that is no checkpoint": (
        f"train --config {TINY} data.prepared_dir={{prep}} run.output_dir={{p}}/r "
        "resume={p}/empty",
        ["is not a complete checkpoint"],
    ),
    "train: pretrained model folder without weights": (
        f"train --config {TINY} data.prepared_dir={{prep}} run.output_dir={{p}}/r2 "
        "model.config=null model.feature_encoder_init=random model.name_or_path={p}/no_weights",
        ["cannot load the model weights", "model.safetensors"],
    ),
    "export: source missing": (
        "export {p}/nope --out {p}/x",
        ["does not exist", "give a run folder or a checkpoint folder"],
    ),
    "export: folder without checkpoints": (
        "export {p}/empty --out {p}/x",
        ["no complete checkpoint in", "phonetune train"],
    ),
    "export: step that does not exist": (
        "export {p}/run --out {p}/x --step 7",
        ["no complete checkpoint for step 7", "available steps: 2"],
    ),
    "export: --best without evaluations": (
        "export {p}/run --out {p}/x --best",
        ["best.json does not exist", "--step"],
    ),
    "export: vocabulary that does not match the checkpoint": (
        "export {p}/mismatched --out {p}/x",
        ["vocab.json has 15 tokens", "must agree"],
    ),
    "export: non-empty output folder": (
        "export {p}/run --out {p}/notes",
        ["is not empty", "--overwrite"],
    ),
    "export: output is a file": (
        "export {p}/run --out {p}/a_file",
        ["is a file, not a folder"],
    ),
    "export: --metrics missing": (
        "export {p}/run --out {p}/x --metrics {p}/nope.json",
        ["--metrics", "nope.json: no such file"],
    ),
    "export: --audio missing": (
        "export {p}/run --out {p}/x --audio {p}/nope.wav",
        ["--audio", "nope.wav: no such file"],
    ),
    "evaluate: model missing": (
        "evaluate {p}/nope --data {prep}",
        ["does not exist"],
    ),
    "evaluate: data is not a prepared dataset": (
        "evaluate {p}/run --data {p}/empty",
        ["is not a prepared dataset"],
    ),
    "evaluate: split missing": (
        "evaluate {p}/run --data {prep} --split nosuch",
        ["has no 'nosuch' split"],
    ),
    "evaluate: vocabulary that does not match the checkpoint": (
        "evaluate {p}/mismatched --data {prep}",
        ["15 tokens"],
    ),
    "transcribe: model missing": (
        "transcribe {p}/nope {p}/a_file",
        ["does not exist"],
    ),
    "synth: unknown locale": (
        "synth --out {p}/s --locales xx-YY",
        ["xx-YY", "Supported Common Voice locales"],
    ),
    "synth: too few clips": (
        "synth --out {p}/s --locales en --clips-per-locale 1",
        ["--clips-per-locale must be at least 3"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_paragraph_exit_2_no_traceback(case, place, prepared_dir, capsys):
    arguments, words = CASES[case]
    argv = arguments.format(p=place, prep=prepared_dir).split()
    capsys.readouterr()
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    command = argv[0]
    assert err.startswith(f"phonetune {command}: error: "), err
    assert "Traceback" not in err and "\n\n" not in err, err
    for word in words:
        assert word in err, (case, word, err)


def test_transcribe_reports_unreadable_files_and_exits_non_zero(place, capsys):
    assert main(["transcribe", str(place / "run"), str(place / "a_file")]) != 0
    err = capsys.readouterr().err
    assert "cannot read" in err and "a_file" in err and "Traceback" not in err


def test_debug_shows_the_traceback(place):
    for argv in (
        ["--debug", "export", str(place / "nope"), "--out", str(place / "x")],
        ["export", "--debug", str(place / "nope"), "--out", str(place / "x")],
    ):
        with pytest.raises(PhonetuneError, match="does not exist"):
            main(argv)


def test_the_command_line_exits_2_and_prints_no_traceback(place):
    env = dict(os.environ)
    # prepare fails in its option checks, before anything heavy is imported
    command = [sys.executable, "-m", "phonetune", "prepare", "--cv-root", "nope"]
    command += ["--locales", "en", "--out", "x"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=place)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--cv-root nope is not a directory" in done.stderr
    debug = subprocess.run(
        command[:3] + ["--debug"] + command[3:], capture_output=True, text=True, env=env, cwd=place
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "PhonetuneError: --cv-root nope" in debug.stderr


def test_argument_and_path_errors_come_before_the_model_is_loaded(
    place, prepared_dir, monkeypatch, capsys
):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("phonetune.infer.evaluate.load_model", must_not_load)
    monkeypatch.setattr("phonetune.infer.export.load_model_folder", must_not_load)
    for argv, words in (
        (f"evaluate {place}/run --data {place}/empty", "is not a prepared dataset"),
        (f"evaluate {place}/run --data {prepared_dir} --split nosuch", "no 'nosuch' split"),
        (f"evaluate {place}/run --data {prepared_dir} --locales xx", "--locales xx: not in"),
        (f"evaluate {place}/run --data {prepared_dir} --batch-seconds 0", "must be a positive"),
        (f"evaluate {place}/run --data {prepared_dir} --out {place}", "is a folder"),
        (f"export {place}/run --out {place}/x --metrics {place}/a_file", "--metrics"),
        (f"export {place}/run --out {place}/x --audio {place}/nope.wav", "--audio"),
        (f"export {place}/run --out {place}/x --evaluate dev", "--evaluate needs"),
    ):
        try:
            code = main(argv.split())
        except SystemExit as exit_:  # argparse's own refusals (the type of an option)
            code = exit_.code
        assert code == 2, argv
        assert words in capsys.readouterr().err, argv


def test_failed_commands_leave_nothing_behind(cv_corpus, prepared_dir, tmp_path, capsys):
    # prepare: a locale with no folder in the release is found before --out is created.
    out = tmp_path / "new" / "prep"
    assert (
        main(["prepare", "--cv-root", str(cv_corpus), "--locales", "en,de", "--out", str(out)]) == 2
    )
    assert "no directory for locale 'de'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # train: a wrong data path, found during set-up, leaves no run folder (nor its parents)...
    settings = [f"data.prepared_dir={tmp_path / 'nope'}", "train.max_steps=1"]
    run_dir = tmp_path / "runs" / "a"
    assert main(["train", "--config", "tiny_cpu", *settings, f"run.output_dir={run_dir}"]) == 2
    assert not (tmp_path / "runs").exists()
    # ... and an empty folder given as the run folder stays empty.
    (tmp_path / "empty").mkdir()
    assert (
        main(["train", "--config", "tiny_cpu", *settings, f"run.output_dir={tmp_path / 'empty'}"])
        == 2
    )
    assert list((tmp_path / "empty").iterdir()) == []


def test_list_configs_names_the_shipped_recipes(capsys):
    assert main(["train", "--list-configs"]) == 0
    printed = capsys.readouterr().out
    for name in ("tiny_cpu", "xlsr53_espeak_cv", "zero_shot_tiny", "adapter_tiny"):
        assert any(line.startswith(f"{name} ") for line in printed.splitlines()), printed


def test_deepspeed_cpu_warning_is_dropped_by_the_command(capsys):
    """transformers' save_pretrained imports DeepSpeed whenever it is installed, which then warns
    on a machine without a GPU: the command filters that one message and nothing else."""
    import logging

    assert main(["train", "--list-configs"]) == 0
    logger = logging.getLogger("DeepSpeed")

    def passes(message):
        record = logger.makeRecord("DeepSpeed", logging.WARNING, "x.py", 1, message, (), None)
        return logger.filter(record)

    assert not passes("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    assert passes("ZeRO stage 2 is not supported with offload")


def test_one_process_training_does_not_import_deepspeed(prepared_dir, tmp_path):
    """Unwrapping the model and gathering the training state for a checkpoint (what Accelerate's
    own helpers would import DeepSpeed for) without DeepSpeed."""
    script = f"""
import sys, torch
from helpers import MICRO, config
from phonetune.train.parallel import make_parallel
cfg = config({str(prepared_dir)!r}, {str(tmp_path)!r}, *MICRO)
parallel = make_parallel(cfg)
module = torch.nn.Linear(3, 2)
optimizer = torch.optim.AdamW(module.parameters())
module, optimizer = parallel.prepare(module, optimizer)
module(torch.ones(1, 3)).sum().backward()
optimizer.step()
assert parallel.unwrap(module) is not None
weights, state = parallel.gather_state(module, optimizer)
assert set(weights) == {{"weight", "bias"}} and state["state"], (weights, state)
assert "deepspeed" not in sys.modules, "DeepSpeed was imported"
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT / "tests",
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
