"""Faults during training: kill -9, SIGTERM/SIGINT, a full disk, two runs in one directory, NaN/inf.

The kill test runs the harness of scripts/kill_trials.py (which runs many more trials) with three
planned kills; the others train the same tiny model in this process.
"""

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_trials as harness
from helpers import on_a_free_port
from safetensors.torch import load_file, save_file

from phonetune.data.errors import PhonetuneError
from phonetune.train import checkpoint as ckpt
from phonetune.train import run_dir as run_dir_lock
from phonetune.train.config import load_config
from phonetune.train.loop import Hooks, train
from phonetune.train.stop import TrainingStopped

ROOT = Path(__file__).parents[1]


def config(prepared_dir, run_dir, *overrides):
    """The harness's tiny run (masking and dropout on, a checkpoint every step), in this process."""
    return load_config(
        harness.TINY,
        [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run_dir}", *harness.SETTINGS]
        + list(overrides),
    )


def weights(checkpoint):
    return load_file(Path(checkpoint) / "model" / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# --- kill -9 ----------------------------------------------------------------------------------------
@pytest.mark.slow  # training subprocesses killed and restarted
def test_kill_9_anywhere_then_resume_auto_equals_an_uninterrupted_run(prepared_dir, tmp_path):
    steps = 10
    # The uninterrupted run in this process, on one thread as the harness's subprocesses (another
    # thread count changes the floating-point sums).
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config(prepared_dir, reference, f"train.max_steps={steps}"))
    finally:
        torch.set_num_threads(threads)
    rng = random.Random(0)
    plans = [
        # mid-training: within a step or so of the second checkpoint (a 10-step run is over in ~1 s)
        harness.after_new_checkpoints(2, rng.uniform(0.0, 0.05)),
        harness.during_a_save(),  # as soon as a checkpoint write has begun
        harness.after_seconds(rng.uniform(0.5, 3.0)),  # anywhere, start-up included
    ]
    run_dir = tmp_path / "killed"
    trial = harness.run_trial(prepared_dir, run_dir, steps, plans)
    assert trial.problems == []
    assert trial.kills >= 2 and trial.kills_during_save >= 1, trial
    assert harness.differences(reference, run_dir) == []  # weights, best.json, every metric
    # the comparison sees a change of one weight by one float step
    final = ckpt.find_latest_checkpoint(run_dir) / "model" / "model.safetensors"
    tensors = load_file(final)
    name = next(iter(tensors))
    tensors[name].view(-1)[0] = torch.nextafter(tensors[name].view(-1)[0], torch.tensor(1.0))
    save_file(tensors, final)
    assert harness.differences(reference, run_dir) == ["final weights differ"]


# --- SIGTERM / SIGINT -------------------------------------------------------------------------------
def signal_in_step(step, *signals):
    """Hooks delivering `signals` to this process just before the training step `step` runs."""

    def before_step(run, number):
        if number == step:
            for sig in signals:
                os.kill(os.getpid(), sig)

    return Hooks(before_step=before_step)


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(prepared_dir, tmp_path, capsys):
    common = ["train.max_steps=4", "train.save_steps=100"]  # no checkpoint before the last step
    train(config(prepared_dir, tmp_path / "straight", *common))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        train(config(prepared_dir, tmp_path / "run", *common), signal_in_step(2, signal.SIGTERM))
    assert stopped.value.code == 143 and stopped.value.step == 2
    assert ckpt.list_checkpoints(tmp_path / "run") == [(2, stopped.value.checkpoint)]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the caller's again
    out = capsys.readouterr()
    assert "SIGTERM received: saving a checkpoint after this step" in out.err
    assert "stopped by SIGTERM at step 2 of 4" in out.out and "resume=auto" in out.out
    # the step it stopped after is the last in metrics.jsonl; resuming continues exactly
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    train(config(prepared_dir, tmp_path / "run", *common, "resume=auto"))
    for key in ("step", "loss", "grad_norm", "lr"):  # bit for bit
        assert [r[key] for r in metrics(tmp_path / "run")] == [
            r[key] for r in metrics(tmp_path / "straight")
        ]
    assert same_weights(
        weights(ckpt.find_latest_checkpoint(tmp_path / "run")),
        weights(ckpt.find_latest_checkpoint(tmp_path / "straight")),
    )


def test_ctrl_c_saves_and_twice_stops_at_once(prepared_dir, tmp_path, capsys):
    common = ["train.max_steps=4", "train.save_steps=100"]
    with pytest.raises(TrainingStopped) as stopped:
        train(config(prepared_dir, tmp_path / "once", *common), signal_in_step(2, signal.SIGINT))
    assert (
        stopped.value.code == 130
        and ckpt.find_latest_checkpoint(tmp_path / "once").name == "step_2"
    )
    assert "Ctrl-C again to stop without saving" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        twice = signal_in_step(2, signal.SIGINT, signal.SIGINT)
        train(config(prepared_dir, tmp_path / "twice", *common), twice)
    assert ckpt.list_checkpoints(tmp_path / "twice") == []


# --- two runs, one directory ------------------------------------------------------------------------
@pytest.mark.slow  # a training subprocess
def test_a_second_run_in_the_same_directory_refuses_and_sigterm_ends_the_first(
    prepared_dir, tmp_path
):
    """A real `python -m phonetune train` holds the directory; SIGTERM makes it save and exit
    with 143."""
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    first = harness.launch(prepared_dir, run_dir, 500, log)
    try:
        while not (run_dir / "metrics.jsonl").is_file() or not metrics(run_dir):
            assert first.poll() is None, log.read_text()[-2000:]
            time.sleep(0.05)
        with pytest.raises(PhonetuneError) as refused:
            train(config(prepared_dir, run_dir, "train.max_steps=500"))
        message = str(refused.value)
        assert f"{run_dir} is in use by another training run (pid {first.pid} on host " in message
        assert "choose another run.output_dir" in message
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143
    finally:
        first.kill()
    output = log.read_text()
    assert "Traceback" not in output
    last = metrics(run_dir)[-1]["step"]
    assert f"stopped by SIGTERM at step {last} of 500" in output and "resume=auto" in output
    assert ckpt.find_latest_checkpoint(run_dir).name == f"step_{last}"
    # the lock died with the process: the run continues at once
    result = train(config(prepared_dir, run_dir, f"train.max_steps={last + 1}", "resume=auto"))
    assert result["step"] == last + 1


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from phonetune.train.run_dir import acquire; "
         "print(acquire(Path(sys.argv[1])) or 'locked', flush=True); time.sleep(600)",
         str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert f"pid {holder.pid} on host" in run_dir_lock.acquire(run_dir)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert run_dir_lock.acquire(run_dir) == ""  # no lock file to delete by hand
        assert (run_dir / run_dir_lock.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    finally:
        holder.kill()
        run_dir_lock.unlock_run_dir(run_dir)


# --- disk full, permission denied -------------------------------------------------------------------
def fail_when_writing(monkeypatch, target, error):
    """`torch.save` to `target` (e.g. step_4.tmp/optimizer.pt) writes half, then raises `error`."""
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(target):
            Path(path).write_bytes(b"\0" * 100)
            raise error
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_while_saving_keeps_the_earlier_checkpoints(
    prepared_dir, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    common = ["train.max_steps=4", "train.save_steps=2"]
    full = OSError(errno.ENOSPC, "No space left on device", "optimizer.pt")
    with monkeypatch.context() as patch:
        fail_when_writing(patch, "step_4.tmp/optimizer.pt", full)
        with pytest.raises(PhonetuneError) as failed:
            train(config(prepared_dir, run_dir, *common))
    message = str(failed.value)
    assert "could not save checkpoint step_4" in message and "No space left on device" in message
    assert f"earlier ones are intact (newest complete: {run_dir}/checkpoints/step_2)" in message
    assert "Free space on that disk" in message and "resume=auto" in message
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # the half-written part is gone
    capsys.readouterr()
    assert train(config(prepared_dir, run_dir, *common, "resume=auto"))["step"] == 4
    assert "resumed from:" in capsys.readouterr().out


def test_permission_denied_while_saving_is_explained(prepared_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    denied = PermissionError(errno.EACCES, "Permission denied", "rng_state_0.pt")
    with monkeypatch.context() as patch:
        fail_when_writing(patch, "step_1.tmp/rng_state_0.pt", denied)
        with pytest.raises(
            PhonetuneError, match="step_1 .*Permission denied.*newest complete: none"
        ):
            train(config(prepared_dir, run_dir, "train.max_steps=2"))
    assert ckpt.list_checkpoints(run_dir) == [] and not list(run_dir.glob("checkpoints/*.tmp"))


# --- NaN / inf in a batch ---------------------------------------------------------------------------
def poison_batches(poison):
    """Hooks writing `poison[step]` (nan or inf) into the audio of that step's first batch."""

    def on_batches(run, step, batches):
        if step in poison:
            batches[0].input_values[0, 1000:1100] = poison[step]

    return Hooks(on_batches=on_batches)


def test_nan_or_inf_in_a_batch_is_skipped_counted_and_training_goes_on(prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    poison = poison_batches({3: float("nan"), 5: float("inf")})
    result = train(config(prepared_dir, run_dir, "train.max_steps=7", "train.keep_last=10"), poison)
    assert result["step"] == 7 and result["skipped_steps"] == 2
    records = metrics(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 2, 2, 2]
    assert [r["loss"] is None for r in records] == [False, False, True, False, True, False, False]
    assert all(r["loss"] > 0 for r in records if r["loss"] is not None)
    saved = {step: weights(path) for step, path in ckpt.list_checkpoints(run_dir)}
    assert same_weights(saved[2], saved[3]) and same_weights(saved[4], saved[5])  # no update
    assert not same_weights(saved[3], saved[4]) and not same_weights(saved[6], saved[7])
    assert all(torch.isfinite(t).all() for t in saved[7].values())


def test_nan_in_every_batch_stops_the_run_naming_the_likely_causes(prepared_dir, tmp_path):
    poison = poison_batches({n: float("nan") for n in range(3, 100)})
    with pytest.raises(PhonetuneError) as stopped:
        train(config(prepared_dir, tmp_path / "run", "train.max_consecutive_nonfinite=3"), poison)
    message = str(stopped.value)
    assert "stopped at step 5: 3 steps in a row had a NaN/inf gradient" in message
    for cause in (
        "train.lr",
        "mixed_precision=bf16",
        "ctc_zero_infinity=false",
        "NaN/inf in the audio",
    ):
        assert cause in message
    assert f"Last checkpoint: {tmp_path / 'run'}/checkpoints/step_4" in message


# --- several processes ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(prepared_dir, tmp_path):
    """SLURM may signal every process or only some: one is enough, and all save together."""
    import psutil

    run_dir = tmp_path / "run"
    launcher = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1"
    launcher += " --mixed_precision no --dynamo_backend no -m phonetune train"
    settings = [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run_dir}", *harness.SETTINGS]
    settings += ["train.max_steps=500", "train.save_steps=1000", "train.eval_steps=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        launched = subprocess.Popen(
            [sys.executable, *on_a_free_port(launcher).split(), "--config", str(harness.TINY), *settings],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
    try:
        while not (run_dir / "metrics.jsonl").is_file() or not metrics(run_dir):
            assert launched.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        workers = {}
        for child in psutil.Process(launched.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "RANK" in child.environ() and "train" in child.cmdline():
                    workers[child.environ()["RANK"]] = child
        assert set(workers) == {"0", "1"}
        workers["1"].send_signal(signal.SIGTERM)
        launched.wait(timeout=300)
    finally:
        launched.kill()
    output = log.read_text()
    last = metrics(run_dir)[-1]["step"]
    assert f"stopped by SIGTERM at step {last} of 500" in output  # said by the main process
    checkpoint = ckpt.find_latest_checkpoint(run_dir)
    assert checkpoint.name == f"step_{last}"  # both stopped after the same step and saved it
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in checkpoint.iterdir()}
    # torchrun reports the processes' own exit (143) and then fails the launch as a whole
    assert "exitcode  : 143" in output
