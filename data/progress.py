"""Progress bars, one rule for every stage: drawn on a terminal, silent in logs and CI.

A bar redrawn into a file or a CI log is thousands of lines of noise, so a bar appears only when
standard error is a terminal (tqdm's `disable=None`); what a command prints besides stays as it is.
"""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: float, desc: str, unit: str, *, show: bool = True, **options: Any) -> Any:
    """A tqdm bar over `total` units on standard error; hidden when `show` is false, `total` is 0
    or standard error is not a terminal. Its `write` prints above a visible bar (and plainly
    otherwise)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=None if show and total else True,
        file=sys.stderr,
        dynamic_ncols=True,
        **options,
    )
