"""Stopping a run cleanly at a step boundary on SIGTERM (cluster preemption, SLURM's time limit)
or SIGINT (Ctrl-C).

The signal only sets a flag; every process reads it at the next step boundary (the largest over
the processes, so one signalled process is enough), they save a checkpoint together and
`TrainingStopped` ends the run with exit code 128 + the signal number (143 for SIGTERM, 130 for
SIGINT). A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phonetune.train.parallel import Parallel

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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

    def agreed(self, parallel: Parallel) -> int:
        """The signal to stop for (0: go on), the same on every process. Collective."""
        # MAX over processes: SIGTERM (15) wins over SIGINT (2) when both arrived somewhere.
        return parallel.max(self.signum)


def _write_stderr(text: str) -> None:
    """From a signal handler: os.write on the descriptor, because a handler that prints while the
    interrupted code was printing raises "reentrant call" inside the training loop."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured)
        with contextlib.suppress(RuntimeError):
            sys.stderr.write(text)
