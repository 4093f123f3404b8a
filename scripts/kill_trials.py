"""kill -9 a tiny training run at random moments, continue it with resume=auto, compare the result.

    python scripts/kill_trials.py                      # 20 trials, about 10 minutes on a quiet 2-core CPU
    python scripts/kill_trials.py --trials 100 --seed 7
    python scripts/kill_trials.py --prepared-dir PREP  # reuse a prepared corpus

Each trial trains the same tiny model (a checkpoint at every step, masking and dropout on, so a
resumed run only matches if every RNG, the optimizer, the scheduler and the data position come back)
in a `python -m phonetune train ... resume=auto` subprocess, sends it SIGKILL at a random moment, restarts it
with resume=auto, up to `--kills` times, then lets it finish. Each kill moment is drawn, with equal
odds, uniformly over the whole life of an uninterrupted run (start-up included), over its training
loop (after this process's first checkpoint), or 0-50 ms into a checkpoint write. A trial survives
when every restart succeeded and the finished run equals the uninterrupted one: the same final
weights bit for bit, the same best.json, the same loss and dev PER at every step.

Prints one line per trial and the total, e.g. `survived 20/20 (57 kills, 19 during a checkpoint
write)`, then one JSON object as the last line. Exit status 1 if a trial did not survive.
tests/test_faults.py runs the same harness with three planned kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = REPO / "configs" / "tiny_cpu.yaml"
# A smaller model than tiny_cpu.yaml's (the tests use it too: tests/helpers.py).
MICRO = [
    "model.config.hidden_size=48",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=2",
    "model.config.intermediate_size=96",
    "model.config.conv_dim=[32]",
    "model.config.num_conv_pos_embeddings=16",
    "model.config.num_conv_pos_embedding_groups=4",
]
# The micro model, a checkpoint at every step, every source of randomness on.
SETTINGS = [
    *MICRO,
    "model.mask_time_prob=0.3",
    "model.mask_time_length=4",
    "model.layerdrop=0.2",
    "model.hidden_dropout=0.1",
    "train.batch_seconds=12",
    "train.eval_batch_seconds=60",
    "train.lr=3e-3",
    "train.save_steps=1",
    "train.eval_steps=4",
    "train.keep_last=2",
    "data.max_duration=12",
    "log.progress_bar=false",
    "log.every_steps=1",
    "resume=auto",
]
POLL_SECONDS = 0.001


# --- one training process ---------------------------------------------------------------------------
def launch(prepared_dir: Path, run_dir: Path, steps: int, log: Path) -> subprocess.Popen:
    """`python -m phonetune train` on the tiny config, output to `log`."""
    # One thread, as the in-process reference of tests/test_faults.py (the thread count changes sums).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "phonetune", "train", "--config", str(TINY)]
    command += [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run_dir}"]
    command += [*SETTINGS, f"train.max_steps={steps}"]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def checkpoint_names(run_dir: Path) -> set[str]:
    root = run_dir / "checkpoints"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def saving(run_dir: Path) -> bool:
    """A checkpoint write, replacement or deletion is under way (or was cut short)."""
    return any(name.endswith(".tmp") for name in checkpoint_names(run_dir))


# A kill plan waits, from the launch, until its moment comes (True) or the process ends (False).
Plan = Callable[[subprocess.Popen, Path], bool]


def after_seconds(seconds: float) -> Plan:
    """The moment `seconds` after the launch: anywhere, start-up included."""

    def wait(process: subprocess.Popen, run_dir: Path) -> bool:
        try:
            process.wait(timeout=seconds)
            return False
        except subprocess.TimeoutExpired:
            return True

    return wait


def after_new_checkpoints(count: int, then: float) -> Plan:
    """`then` seconds after this process has written `count` checkpoints: in the middle of training."""

    def wait(process: subprocess.Popen, run_dir: Path) -> bool:
        before = {n for n in checkpoint_names(run_dir) if not n.endswith(".tmp")}
        while process.poll() is None:
            now = {n for n in checkpoint_names(run_dir) if not n.endswith(".tmp")}
            if len(now - before) >= count:
                return after_seconds(then)(process, run_dir)
            time.sleep(POLL_SECONDS)
        return False

    return wait


def during_a_save(then: float = 0.0) -> Plan:
    """`then` seconds after this process starts writing a checkpoint (a new `step_<n>.tmp`)."""

    def wait(process: subprocess.Popen, run_dir: Path) -> bool:
        leftovers = {n for n in checkpoint_names(run_dir) if n.endswith(".tmp")}
        while process.poll() is None:
            names = checkpoint_names(run_dir)
            if any(n.endswith(".tmp") and n not in leftovers for n in names):
                return after_seconds(then)(process, run_dir) if then else True
            leftovers &= names  # removed at start-up: a new one with that name counts
            time.sleep(POLL_SECONDS)
        return False

    return wait


@dataclass
class Trial:
    launches: int = 0
    kills: int = 0
    kills_during_save: int = 0
    problems: list[str] = field(default_factory=list)


def run_trial(
    prepared_dir: Path, run_dir: Path, steps: int, plans: list[Plan], timeout: float = 600
) -> Trial:
    """Launch, kill per plan, relaunch... then run to the end; what happened."""
    trial = Trial()
    log = run_dir.with_name(run_dir.name + ".log")
    for plan in [*plans, None]:
        process = launch(prepared_dir, run_dir, steps, log)
        trial.launches += 1
        if plan is not None and plan(process, run_dir):
            process.send_signal(signal.SIGKILL)
            process.wait()
            trial.kills += 1
            trial.kills_during_save += saving(run_dir)
            continue
        code = process.wait(timeout=timeout)  # not killed: it runs to the end
        if code != 0:
            tail = log.read_text(errors="replace")[-2000:]
            trial.problems.append(f"launch {trial.launches} exited with {code}:\n{tail}")
        break
    return trial


# --- comparing two finished runs --------------------------------------------------------------------
def differences(reference: Path, run_dir: Path) -> list[str]:
    """How a finished run differs from the reference: weights, best.json, per-step metrics."""
    from safetensors.torch import load_file

    from phonetune.train import checkpoint as ckpt

    found = []
    mine, theirs = ckpt.find_latest_checkpoint(run_dir), ckpt.find_latest_checkpoint(reference)
    if mine is None or mine.name != theirs.name:
        return [f"newest checkpoint {mine} instead of {theirs.name}"]
    a = load_file(theirs / "model" / "model.safetensors")
    b = load_file(mine / "model" / "model.safetensors")
    if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
        found.append("final weights differ")
    best = [json.loads((d / "checkpoints" / "best.json").read_text()) for d in (reference, run_dir)]
    if best[0] != best[1]:
        found.append(f"best.json {best[1]} instead of {best[0]}")
    metrics = [_metrics(d) for d in (reference, run_dir)]
    if metrics[0] != metrics[1]:
        found.append("metrics.jsonl differs (loss, grad norm, lr or dev PER at some step)")
    return found


def _metrics(run_dir: Path) -> list[tuple]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "grad_norm", "lr", "skipped_steps", "eval_per")
    return [tuple(record.get(key) for key in keys) for record in lines]


# --- the command ------------------------------------------------------------------------------------
# Where a kill lands: anywhere in the process's life (start-up is most of it for a tiny model),
# anywhere in its training loop, or within a few milliseconds of the start of a checkpoint write.
KINDS = ("any moment", "in training", "in a save")


def make_plan(kind: str, rng: random.Random, length: float, loop: float) -> tuple[Plan, str]:
    if kind == "any moment":
        seconds = rng.uniform(0.0, length)
        return after_seconds(seconds), f"{seconds:.2f} s after launch"
    if kind == "in training":
        seconds = rng.uniform(0.0, loop)
        return after_new_checkpoints(1, seconds), f"{seconds:.2f} s after a checkpoint"
    seconds = rng.uniform(0.0, 0.05)
    return during_a_save(seconds), f"{seconds * 1000:.0f} ms into a save"


def training_seconds(log: Path) -> float:
    """The training loop's duration, from the run's last line `done: N steps in S s`."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("done:"):
            return float(line.split(" in ")[1].split()[0])
    raise ValueError(f"{log} has no `done:` line")


def make_corpus(work: Path) -> Path:
    """The test suite's corpus: 4 locales × 30 synthetic clips, prepared."""
    from phonetune.data.prepare import PrepareOptions, prepare
    from phonetune.data.synth import synthesize_corpus

    locales = ["en", "fr", "ru", "zh-CN"]
    prepared = work / "prepared"
    if not (prepared / "dataset_dict.json").is_file():
        synthesize_corpus(work / "corpus", locales, clips_per_locale=30, seed=0, num_workers=2)
        prepare(
            PrepareOptions(cv_root=work / "corpus", locales=locales, out=prepared, num_workers=2)
        )
    return prepared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3, help="kill attempts per trial")
    parser.add_argument("--steps", type=int, default=12, help="train.max_steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--prepared-dir", type=Path, help="a prepared corpus (default: make one)")
    parser.add_argument("--work-dir", type=Path, help="where runs go (default: a temporary dir)")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kill_trials_"))
    work.mkdir(parents=True, exist_ok=True)
    prepared = args.prepared_dir or make_corpus(work)
    reference = work / "reference"
    started = time.monotonic()
    problems = run_trial(prepared, reference, args.steps, []).problems
    if problems:
        print(problems[0], file=sys.stderr)
        return 1
    length = time.monotonic() - started
    loop = training_seconds(reference.with_name(reference.name + ".log"))
    print(f"uninterrupted run: {args.steps} steps, {length:.1f} s ({loop:.1f} s of training)")

    rng = random.Random(args.seed)
    results = []
    for index in range(args.trials):
        kinds = [rng.choice(KINDS) for _ in range(args.kills)]
        plans = [make_plan(kind, rng, length, loop) for kind in kinds]
        run_dir = work / f"trial_{index}"
        trial = run_trial(prepared, run_dir, args.steps, [plan for plan, _ in plans])
        if not trial.problems:
            trial.problems = differences(reference, run_dir)
        results.append(trial)
        status = "survived" if not trial.problems else "FAILED: " + "; ".join(trial.problems)
        print(
            f"trial {index}: kill moments {', '.join(label for _, label in plans)} -> "
            f"{trial.kills} kill(s), {trial.kills_during_save} during a checkpoint write: {status}",
            flush=True,
        )
    survived = sum(not t.problems for t in results)
    kills = sum(t.kills for t in results)
    during = sum(t.kills_during_save for t in results)
    print(f"survived {survived}/{len(results)} ({kills} kills, {during} during a checkpoint write)")
    print(
        json.dumps(
            {
                "trials": len(results),
                "survived": survived,
                "kills": kills,
                "kills_during_checkpoint_write": during,
                "steps": args.steps,
                "seed": args.seed,
                "uninterrupted_seconds": round(length, 1),
                "work_dir": str(work),
            }
        )
    )
    return 0 if survived == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
