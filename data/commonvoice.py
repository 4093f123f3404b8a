"""Reading an extracted Common Voice release: `<locale>/<split>.tsv` rows -> clip records.

Common Voice sentences contain quotes, so the TSVs are read with quoting disabled: a `"` is text,
never a field delimiter (with the csv default a quote swallows the following rows). A row is one
line split at tabs, which is what `csv` with `QUOTE_NONE` does, minus two of its traps: a stray
carriage return inside a sentence would end the row there, and a line over 128 KiB would raise.
Each line is decoded on its own, so one line that is not UTF-8 costs that row, not the file.
"""

from __future__ import annotations

import os
import posixpath
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phonetune.data.audio import NOT_REGULAR
from phonetune.data.errors import PhonetuneError

SPLITS: tuple[str, ...] = ("train", "dev", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "sentence")


@dataclass(frozen=True)
class Clip:
    """One TSV row that passed the row checks."""

    locale: str
    split: str
    path: str  # as written in the TSV, relative to <locale>/clips
    sentence: str
    client_id: str
    audio_path: Path  # resolved, inside <locale>/clips


@dataclass(frozen=True)
class Rejection:
    locale: str
    split: str
    path: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "locale": self.locale,
            "split": self.split,
            "path": self.path,
            "reason": self.reason,
            "detail": self.detail,
        }


def find_split_files(
    cv_root: Path, locale: str, splits: tuple[str, ...] = SPLITS
) -> dict[str, Path]:
    """The split TSVs of one locale; a clear error when the locale has none of them."""
    locale_dir = cv_root / locale
    if not locale_dir.is_dir():
        raise PhonetuneError(
            f"no directory for locale {locale!r} in {cv_root}: expected {locale_dir} holding "
            f"{', '.join(s + '.tsv' for s in splits)} and clips/ (an extracted Common Voice release)"
        )
    found = {
        split: locale_dir / f"{split}.tsv"
        for split in splits
        if (locale_dir / f"{split}.tsv").is_file()
    }
    if not found:
        raise PhonetuneError(
            f"locale directory {locale_dir} has none of {', '.join(s + '.tsv' for s in splits)}. "
            "Point --cv-root at the extracted release (the folder that holds one folder per locale)."
        )
    return found


def clean_sentence(text: str) -> str:
    """Drop control characters (tabs, zero-width marks, stray newlines) and squeeze whitespace."""
    kept = (" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)
    return " ".join("".join(kept).split())


def resolve_clip_path(clips_dir: Path, relative: str, root: Path | None = None) -> Path | None:
    """The clip's real path, or None when `relative` would leave the clips directory.

    Symbolic links are followed before the check, so a link inside clips/ that points elsewhere
    is refused too. `root` is `clips_dir.resolve()` when the caller has it already (resolving it
    again for every row was most of the time spent reading a TSV).
    """
    if not relative or os.path.isabs(relative) or "\x00" in relative:
        return None
    root = clips_dir.resolve() if root is None else root
    try:
        candidate = (root / relative).resolve()
    except (OSError, RuntimeError):  # a name too long for the file system, a symlink loop
        return None
    return candidate if candidate.is_relative_to(root) and candidate != root else None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the file system allows: no such clip
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def read_split(cv_root: Path, locale: str, split: str, tsv: Path) -> Iterator[Clip | Rejection]:
    """Yield a Clip for every usable row of `tsv` and a Rejection (with its reason) for the rest."""
    clips_root = (cv_root / locale / "clips").resolve()  # once per TSV, not once per row
    try:
        handle = open(tsv, "rb")  # binary lines end at b"\n" only
    except OSError as error:
        raise PhonetuneError(f"cannot read {tsv}: {error.strerror or error}") from None
    with handle:
        first = handle.readline().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark editors add
        header = [
            name.strip() for name in _strip_newline(first).decode(errors="replace").split("\t")
        ]
        if header == [""]:
            return  # an empty file
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        for line_number, line in enumerate(handle, start=2):
            line = _strip_newline(line)
            if not line.strip():
                continue  # a blank line is not a row
            try:
                row = line.decode("utf-8").split("\t")
            except UnicodeDecodeError as error:
                yield Rejection(
                    locale,
                    split,
                    f"{tsv.name}:{line_number}",
                    "invalid_text_encoding",
                    f"{tsv.name} line {line_number} is not UTF-8 ({error.reason} at byte {error.start})",
                )
                continue
            yield from _check_row(clips_root, locale, split, tsv, header, missing, line_number, row)


def _strip_newline(line: bytes) -> bytes:
    return line.removesuffix(b"\n").removesuffix(b"\r")


def _check_row(
    clips_root: Path,  # the clips folder, resolved
    locale: str,
    split: str,
    tsv: Path,
    header: list[str],
    missing: list[str],
    line_number: int,
    row: list[str],
) -> Iterator[Clip | Rejection]:
    where = f"{tsv.name} line {line_number}"
    fields = dict(zip(header, row, strict=False))
    label = fields.get("path", "").strip() or f"{tsv.name}:{line_number}"
    if missing:
        yield Rejection(
            locale,
            split,
            label,
            "tsv_missing_columns",
            f"{tsv.name} has no column(s) {', '.join(missing)}",
        )
        return
    if len(row) != len(header):
        # Usually a tab inside a sentence: the columns after it are shifted, so no field is safe.
        yield Rejection(
            locale,
            split,
            label,
            "malformed_row",
            f"{where} has {len(row)} fields, the header has {len(header)}",
        )
        return
    relative = fields["path"].strip()
    # "./a.mp3" and "a.mp3" are one clip: the normal spelling lets duplicates be recognised.
    relative = posixpath.normpath(relative) if relative else relative
    audio_path = resolve_clip_path(clips_root, relative, root=clips_root)
    if audio_path is None:
        yield Rejection(
            locale,
            split,
            label,
            "path_escapes_clips_dir",
            f"{where}: {relative!r} is not a file inside {locale}/clips",
        )
        return
    if not _is_file(audio_path):
        exists = _exists(audio_path) and not audio_path.is_dir()
        reason, problem = (
            ("unreadable_audio", NOT_REGULAR) if exists else ("missing_file", "not found")
        )
        yield Rejection(
            locale, split, label, reason, f"{where}: {locale}/clips/{relative} {problem}"
        )
        return
    sentence = clean_sentence(fields["sentence"])
    if not sentence:
        yield Rejection(locale, split, label, "empty_sentence", f"{where} has no sentence")
        return
    yield Clip(locale, split, relative, sentence, fields.get("client_id", "").strip(), audio_path)
