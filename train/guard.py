"""What protects a training run from its surroundings: one run per directory, and clean stops.

- `lock_run_dir`: the main process holds an exclusive lock on `RUN_DIR/run.lock` for the run's
  lifetime; a second run pointed at the same directory refuses to start and names the holder. The
  lock is a POSIX record lock (`fcntl.lockf`): the kernel drops it when the holding process exits in
  any way (kill -9 included), so there is never a stale lock to delete by hand, and unlike `flock`
  it is not inherited by forked DataLoader workers, which could otherwise keep a killed run's lock
  for seconds. It also works on NFS (through the lock daemon). The file's content (pid, host, time)
  only describes the last holder; whether it is locked is what counts.
- `StopRequest`: SIGTERM (cluster preemption, SLURM's time limit) and SIGINT (Ctrl-C) set a flag
  instead of killing the process; every process reads the flag at the next step boundary (reduced
  across processes, so one signalled process is enough), they save a checkpoint together and
  `TrainingStopped` ends the run with exit code 128 + the signal number (143 for SIGTERM, 130 for
  SIGINT). A second Ctrl-C stops at once, without saving.
- `attempt` / `settle_save`: a checkpoint save that fails on any process (disk full, permission
  denied) stops all of them together with a clear error, rather than leaving the others waiting in
  a barrier; the earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from data.errors import PhonetuneError
from train import checkpoint as ckpt

if TYPE_CHECKING:
    from accelerate import Accelerator

LOCK_FILE = "run.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Run directories this process holds, path -> open lock file descriptor. A POSIX lock belongs to the
# process: closing *any* descriptor of the file releases it, so the file is opened once per process
# and a second `train()` in the same process (after the first returned or failed) reuses the lock.
_held: dict[Path, int] = {}


# --- one run per directory ------------------------------------------------------------------------
def lock_run_dir(run_dir: Path, accelerator: Accelerator) -> None:
    """Create `run_dir` and lock it for this run (main process); every process fails if it is taken.

    Collective: all processes must call it. Released by `unlock_run_dir` or when the process ends.
    """
    problem = ""
    if accelerator.is_main_process:
        problem = acquire(run_dir)
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if problem else 0.0], device=accelerator.device)
        if float(accelerator.reduce(flag, "max")[0]) > 0 and not problem:
            problem = f"{run_dir} is in use by another run (see the main process's error)"
    if problem:
        raise PhonetuneError(problem)


def acquire(run_dir: Path) -> str:
    """Take the lock of `run_dir` for this process; returns "" or why it is not possible."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return ""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: run unprotected rather than not at all
        warnings.warn("no fcntl on this platform: the run directory is not locked", stacklevel=3)
        return ""
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        return f"cannot create {path}: {error.strerror}. Choose a run.output_dir this user can write to."
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            warnings.warn(
                f"cannot lock {path} ({error.strerror}: the file system does not support locks); "
                "make sure no other run uses this directory",
                stacklevel=3,
            )
            return ""
        return (
            f"{run_dir} is in use by another training run ({_describe(_read_holder(path))}): two "
            "runs writing the same checkpoints would destroy each other's. Wait for it to finish or "
            "stop it (it saves a checkpoint on SIGTERM or Ctrl-C), or choose another "
            "run.output_dir. The lock belongs to the running process and disappears when it "
            f"exits, even if killed; deleting {LOCK_FILE} does not unlock it."
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since {_now()}\n".encode())
    _held[run_dir] = fd
    return ""


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock if this process holds it (idempotent)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the POSIX lock


def _read_holder(path: Path) -> dict[str, str]:
    try:
        words = path.read_text(encoding="utf-8").split()
    except OSError:
        return {}
    return dict(zip(words[0::2], words[1::2], strict=False)) if len(words) >= 4 else {}


def _describe(holder: dict[str, str]) -> str:
    if not holder:
        return "its pid is not recorded yet"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- stopping at a step boundary ------------------------------------------------------------------
class TrainingStopped(SystemExit):
    """Training stopped at a step boundary on SIGTERM/SIGINT, after saving a checkpoint.

    A SystemExit whose code is 128 + the signal number (143 SIGTERM, 130 SIGINT), the shell's code
    for "ended by that signal": the CLI exits with it, without a traceback.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.checkpoint = checkpoint


def explain_stop(
    signum: int, step: int, max_steps: int, checkpoint: Path | None, run_dir: Path
) -> str:
    """What the user reads when a signal stopped the run: where it stands and how to go on."""
    name = signal.Signals(signum).name
    if checkpoint is None:
        return (
            f"phonetune train: stopped by {name} before the first step; nothing to save. Run the "
            "same command again to start."
        )
    return (
        f"phonetune train: stopped by {name} at step {step} of {max_steps}; checkpoint: {checkpoint}\n"
        f"  to continue, run the same command with resume=auto (run.output_dir={run_dir}); "
        f"exit code {128 + signum}"
    )


class StopRequest:
    """SIGTERM/SIGINT -> a flag read at step boundaries (`agreed`), while the handlers are installed.

    Installed only in the main thread (Python delivers signals there); elsewhere it stays inert.
    The handlers restore the previous ones on `uninstall`.
    """

    def __init__(self, announce: bool) -> None:
        self.signum = 0
        self.announce = announce  # the main process says what happens; the others stay quiet
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the save
        if self.signum:
            return  # a repeated SIGTERM (e.g. torchrun forwarding SLURM's): already stopping
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            extra = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
            _write_stderr(
                f"\nphonetune train: {name} received: saving a checkpoint after this step, "
                f"then stopping{extra}\n"
            )

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal to stop for (0: go on), the same on every process. Collective."""
        if accelerator.num_processes == 1:
            return self.signum
        # MAX over processes: SIGTERM (15) wins over SIGINT (2) when both arrived somewhere.
        flag = torch.tensor([float(self.signum)], device=accelerator.device)
        return int(accelerator.reduce(flag, "max")[0])


def _write_stderr(text: str) -> None:
    """From a signal handler: os.write on the descriptor, because a handler that prints while the
    interrupted code was printing raises "reentrant call" inside the training loop."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured)
        with contextlib.suppress(RuntimeError):
            sys.stderr.write(text)


# --- a checkpoint save that fails -------------------------------------------------------------------
def attempt(action: Callable[..., object], *args: Any, **kwargs: Any) -> OSError | None:
    """Run a file-system action; its OSError (disk full, permission denied...) is returned, not raised."""
    try:
        action(*args, **kwargs)
    except OSError as error:
        return error
    return None


def settle_save(
    accelerator: Accelerator, run_dir: Path, step: int, error: OSError | None, discard: bool = True
) -> None:
    """The barrier between the stages of a checkpoint save, which also stops every process together
    if the stage failed on any of them (instead of leaving the others waiting). Collective.

    On failure the part written is removed (`discard`, main process; it would be ignored anyway) and
    every process raises PhonetuneError; the one that failed explains why.
    """
    failed = error is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
        failed = float(accelerator.reduce(flag, "max")[0]) > 0
    else:
        accelerator.wait_for_everyone()
    if not failed:
        return
    if discard and accelerator.is_main_process:
        ckpt.discard_checkpoint_write(run_dir, step)
    if error is None:
        raise PhonetuneError(
            f"another process could not write its part of checkpoint step_{step} (its error says "
            "why); every process stops. The earlier checkpoints are intact."
        )
    raise PhonetuneError(ckpt.explain_save_failure(run_dir, step, error)) from error
