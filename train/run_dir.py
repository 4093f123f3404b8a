"""The run directory: what it may hold, and one run at a time in it.

- `run_dir_problem`: run.output_dir must be a folder holding only a run's files (or nothing), so a
  typo never sends checkpoints into someone's data.
- `discard_unused_run_dir`: a run that stopped during set-up removes the directory it created.
- `lock_run_dir`: the main process holds an exclusive lock on `RUN_DIR/run.lock` for the run's
  lifetime; a second run pointed at the same directory refuses to start and names the holder. The
  lock is a POSIX record lock (`fcntl.lockf`): the kernel drops it when the holding process exits in
  any way (kill -9 included), so there is never a stale lock to delete by hand, and unlike `flock`
  it is not inherited by forked DataLoader workers, which could otherwise keep a killed run's lock
  for seconds. It also works on NFS (through the lock daemon). The file's content (pid, host, time)
  only describes the last holder; whether it is locked is what counts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from phonetune.data.errors import PhonetuneError
from phonetune.train import checkpoint as ckpt

if TYPE_CHECKING:
    from phonetune.train.parallel import Parallel

LOCK_FILE = "run.lock"
# What a run directory may hold; anything else means run.output_dir points at someone's files.
RUN_DIR_ENTRIES = {
    ckpt.CONFIG_FILE,
    ckpt.METRICS_FILE,
    ckpt.METRICS_FILE + ".tmp",
    ckpt.CHECKPOINTS_DIR,
    LOCK_FILE,
    "wandb",
    "wandb_run_id",
    "tensorboard",
}


def run_dir_problem(run_dir: Path) -> str | None:
    """Why run.output_dir cannot hold this run (a file, or a folder of something else's files), or
    None. Checked with the config, before anything is created."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"run.output_dir={run_dir} is a file: give a folder"
    if run_dir.is_dir():
        foreign = sorted(
            entry.name
            for entry in run_dir.iterdir()
            if entry.name not in RUN_DIR_ENTRIES and not entry.name.startswith(".")
        )
        if foreign:
            return (
                f"run.output_dir={run_dir} holds files that are not a phonetune run "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); training would "
                "write its config, metrics and checkpoints among them. Choose a new or empty directory."
            )
    return None


# Run directories this process holds, path -> open lock file descriptor. A POSIX lock belongs to the
# process: closing *any* descriptor of the file releases it, so the file is opened once per process
# and a second `train()` in the same process (after the first returned or failed) reuses the lock.
_held: dict[Path, int] = {}


# --- one run per directory ------------------------------------------------------------------------
def lock_run_dir(run_dir: Path, parallel: Parallel) -> None:
    """Create `run_dir` and lock it for this run (main process); every process fails if it is taken.

    Collective: all processes must call it. Released by `unlock_run_dir` or when the process ends.
    """
    problem = acquire(run_dir) if parallel.is_main else ""
    if parallel.any(bool(problem)) and not problem:
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


def missing_folders(run_dir: Path) -> list[Path]:
    """The folders of `run_dir`'s path that do not exist yet, deepest first."""
    return [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]


def discard_unused_run_dir(run_dir: Path, created: list[Path]) -> None:
    """Undo what a run that stopped before training (a wrong data path, model or setting found
    during set-up) wrote, so that a failed command leaves nothing behind: the lock, the config,
    and the folders it created. Anything else in the directory means it is in use, and it stays."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if all(entry.name in (LOCK_FILE, ckpt.CONFIG_FILE) and entry.is_file() for entry in entries):
        for entry in entries:
            entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a parent that is no longer empty stays
            for folder in created:
                folder.rmdir()


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
