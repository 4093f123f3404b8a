"""scripts/slurm_train.sh under stand-ins for srun and scontrol: SIGTERM -> checkpoint -> requeue."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import FAST, MICRO, ROOT, TINY

from phonetune.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

FAKE_SRUN = """#!/bin/bash
# One task on this machine: drop srun's options, set what SLURM sets per task.
while [[ "$1" == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "$REQUEUE_LOG" ;;
esac
"""


def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_CPUS_PER_TASK": "1",
        "MASTER_PORT": "29533",
        "REQUEUE_LOG": str(tmp_path / "requeued.txt"),
    }


def logged_steps(run_dir):
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in lines if "loss" in r), default=0)


def test_sigterm_checkpoints_requeues_and_the_restart_resumes(prepared_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = fake_slurm(tmp_path)
    env.update(CONFIG=str(TINY), PREPARED=str(prepared_dir), RUN_DIR=str(run_dir))
    overrides = [*MICRO, *FAST, "train.max_steps=60", "train.save_steps=1000"]
    overrides += ["train.eval_steps=1000"]
    script = [str(ROOT / "scripts" / "slurm_train.sh"), *overrides]

    job = subprocess.Popen(
        ["bash", *script], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while logged_steps(run_dir) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)  # as SLURM does before the time limit (--signal=B:TERM@300)
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output[-3000:]
    assert (tmp_path / "requeued.txt").read_text() == "requeue 42\n"
    saved = ckpt.find_latest_checkpoint(run_dir)
    assert saved is not None, output[-3000:]
    stopped_at = ckpt.read_state(saved)["step"]
    assert 2 <= stopped_at < 60
    assert "resume=auto" in output  # the run says how to continue

    # The requeued job: the same command, which continues from that checkpoint to the end.
    again = subprocess.run(
        ["bash", *script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert ckpt.find_latest_checkpoint(run_dir).name == "step_60"
    assert f"checkpoint {saved}" in again.stdout or saved.name in again.stdout
    assert (tmp_path / "requeued.txt").read_text() == "requeue 42\n"  # not requeued when done
