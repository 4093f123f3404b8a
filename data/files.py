"""Reading the JSON and YAML files that phonetune writes (and users edit), with one clear error.

Every such file can be found damaged: cut short by a full disk, overwritten with other bytes,
or holding valid JSON of the wrong shape (a list where an object belongs). Each case is a
PhonetuneError naming the file and what is wrong with it, plus what to do (`hint`), never a
traceback from the JSON or YAML parser or from code that trusted the shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phonetune.data.errors import PhonetuneError

_KINDS = {dict: "an object (key: value)", list: "a list"}


def read_text(path: str | Path, hint: str = "") -> str:
    """A UTF-8 text file; unreadable or not text is a PhonetuneError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise damaged(path, f"not UTF-8 text (byte {error.start})", hint) from None
    except IsADirectoryError:
        raise PhonetuneError(f"{path} is a folder, not a file{_sentence(hint)}") from None
    except OSError as error:
        raise PhonetuneError(
            f"cannot read {path}: {error.strerror or error}{_sentence(hint)}"
        ) from None


def read_json(path: str | Path, expect: type | None = dict, hint: str = "") -> Any:
    """A JSON file whose top level is of type `expect` (None: any)."""
    return _read(Path(path), expect, hint, "JSON", _parse_json)


def read_yaml(path: str | Path, expect: type | None = dict, hint: str = "") -> Any:
    """A YAML file (safe_load: plain values only) whose top level is of type `expect`."""
    return _read(Path(path), expect, hint, "YAML", _parse_yaml)


def _read(path: Path, expect: type | None, hint: str, language: str, parse: Any) -> Any:
    text = read_text(path, hint)
    try:
        value = parse(text)
    except ValueError as error:  # the parsers' errors, reworded below
        raise damaged(path, str(error), hint) from None
    if expect is not None and not isinstance(value, expect):
        found = "nothing" if value is None else f"a {type(value).__name__}"
        wanted = _KINDS.get(expect, expect.__name__)
        raise damaged(path, f"its {language} is {found}, not {wanted}", hint)
    return value


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError("empty" if not text.strip() else f"not valid JSON ({error})") from None


def _parse_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"not valid YAML{at} ({problem})") from None


def damaged(path: Path, reason: str, hint: str = "") -> PhonetuneError:
    return PhonetuneError(f"{path} is damaged: {reason}{_sentence(hint)}")


def _sentence(hint: str) -> str:
    return f". {hint}" if hint else ""
