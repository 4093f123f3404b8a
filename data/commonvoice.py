"""Reading an extracted Common Voice release: `<locale>/<split>.tsv` rows -> clip records.

Common Voice sentences contain quotes, so the TSVs are read with quoting disabled: a `"` is text,
never a field delimiter (with the csv default a quote swallows the following rows).
"""

from __future__ import annotations

import csv
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data.errors import PhonetuneError

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


def resolve_clip_path(clips_dir: Path, relative: str) -> Path | None:
    """The clip's real path, or None when `relative` would leave the clips directory."""
    if not relative or os.path.isabs(relative) or "\x00" in relative:
        return None
    candidate = (clips_dir / relative).resolve()
    root = clips_dir.resolve()
    return candidate if candidate.is_relative_to(root) and candidate != root else None


def read_split(cv_root: Path, locale: str, split: str, tsv: Path) -> Iterator[Clip | Rejection]:
    """Yield a Clip for every usable row of `tsv` and a Rejection (with its reason) for the rest."""
    clips_dir = cv_root / locale / "clips"
    with open(tsv, encoding="utf-8", errors="replace", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        for line_number, row in enumerate(rows, start=2):
            if not any(field.strip() for field in row):
                continue  # a blank line is not a row
            yield from _check_row(clips_dir, locale, split, tsv, header, missing, line_number, row)


def _check_row(
    clips_dir: Path,
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
    audio_path = resolve_clip_path(clips_dir, relative)
    if audio_path is None:
        yield Rejection(
            locale,
            split,
            label,
            "path_escapes_clips_dir",
            f"{where}: {relative!r} is not a file inside {locale}/clips",
        )
        return
    if not audio_path.is_file():
        yield Rejection(
            locale, split, label, "missing_file", f"{where}: {locale}/clips/{relative} not found"
        )
        return
    sentence = clean_sentence(fields["sentence"])
    if not sentence:
        yield Rejection(locale, split, label, "empty_sentence", f"{where} has no sentence")
        return
    yield Clip(locale, split, relative, sentence, fields.get("client_id", "").strip(), audio_path)
