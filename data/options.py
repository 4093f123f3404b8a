"""Checks of the numbers and output paths a user gives on the command line, made before any work.

argparse's `type=float` takes "nan", "inf" and "-3" alike, and a comparison with NaN is always
false, so `if seconds <= 0` lets NaN through. The `type=` functions here refuse what makes no
sense for the option (argparse prints "argument --x: ..." and exits 2); the library functions
that take the same values check them with `require_positive`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from phonetune.data.errors import PhonetuneError


def is_positive(value: float) -> bool:
    """A finite number above zero (False for NaN and infinity)."""
    return math.isfinite(value) and value > 0


def require_positive(value: float, option: str) -> None:
    if not is_positive(value):
        raise PhonetuneError(f"{option} must be a positive number, not {value}")


def positive_number(text: str) -> float:
    value = _number(text)
    if not is_positive(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def non_negative_number(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, not {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text!r}")
    return value


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written (a folder, a read-only file or place) before
    the work that produces it, not after. Where its folder exists, by opening it for appending
    (removed again if it was not there); folders still to be made are checked for permission."""
    if path.is_dir():
        raise PhonetuneError(f"{option} {path} is a folder: give the path of a file to write")
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise PhonetuneError(f"{option} {path}: {folder} is a file, not a folder")
    if folder != path.parent:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PhonetuneError(f"{option} {path}: cannot create folders in {folder}")
        return
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise PhonetuneError(
            f"{option} {path} cannot be written: {error.strerror or error}"
        ) from None
    finally:
        if not existed:
            path.unlink(missing_ok=True)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
