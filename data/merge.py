"""`phonetune merge`: prepared datasets of disjoint locales -> one prepared dataset.

On a cluster each locale is prepared by its own job (`phonetune prepare --locales xx --out
prep/xx`); merge then checks that the outputs were made the same way (espeak-ng and phonemizer
versions, phonemization scheme and options, vocabulary policy), builds one vocabulary with
prepare's rule from the phone counts in their reports, and writes one dataset whose Arrow files
are hard links to the inputs' files: no audio is copied or decoded again, and the inputs stay
valid prepared datasets of their own. Rows keep the order of the inputs as given, so merging
`prep/en prep/fr` gives the rows of `phonetune prepare --locales en,fr`, in the same order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from phonetune.data.commonvoice import SPLITS
from phonetune.data.errors import PhonetuneError
from phonetune.data.prepare import VOCAB_BUILT, print_summary, shard_schema, write_dataset
from phonetune.data.prepared import DATASET_FILE, REPORT_FILE
from phonetune.data.vocab import VOCAB_FILE, build_vocab, load_vocab, save_vocab

# Settings that must agree for rows of several inputs to belong in one dataset; the others
# (cv_root, locales, splits) describe what an input holds.
INPUT_SETTINGS = ("cv_root", "locales", "splits")
# What merge reads from each input's prep_report.json.
REPORT_KEYS = (
    "versions",
    "settings",
    "totals",
    "per_locale",
    "vocab",
    "phoneme_cache",
    "shards",
    "rejected",
)


@dataclass
class PreparedInput:
    """One prepared dataset given to merge."""

    path: Path
    report: dict
    vocab: dict[str, int]
    files: dict[str, list[Path]]  # split -> Arrow files, in row order
    fingerprints: dict[str, str]  # split -> the split's datasets fingerprint
    rows: Counter[str]  # split -> rows in its Arrow files
    schemas: list  # the distinct Arrow schemas of its files (pyarrow.Schema)


def read_input(path: Path) -> PreparedInput:
    """A prepared dataset's report, vocabulary and Arrow files; a clear error if it is not one."""
    if not path.is_dir():
        raise PhonetuneError(f"{path} is not a folder (give folders written by phonetune prepare)")
    needed = [path / REPORT_FILE, path / VOCAB_FILE, path / DATASET_FILE]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise PhonetuneError(
            f"{path} is not a finished prepared dataset: {', '.join(missing)} missing. Run "
            f"`phonetune prepare --out {path}` (again) until it finishes."
        )
    try:
        report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
        splits = json.loads((path / DATASET_FILE).read_text(encoding="utf-8"))["splits"]
        files, fingerprints = {}, {}
        for split in splits:
            state = json.loads((path / split / "state.json").read_text(encoding="utf-8"))
            files[split] = [path / split / item["filename"] for item in state["_data_files"]]
            fingerprints[split] = state["_fingerprint"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise PhonetuneError(
            f"{path} is not a readable prepared dataset ({error!r}); prepare it again"
        ) from None
    missing = [key for key in REPORT_KEYS if key not in report]
    entries = report.get("per_locale", {}).values()
    if missing or not all("splits" in e and "phone_inventory" in e for e in entries):
        raise PhonetuneError(
            f"{path / REPORT_FILE} is not a report of this phonetune's prepare (missing: "
            f"{', '.join(missing) or 'per-locale splits or phone inventories'}); prepare {path} "
            "again"
        )
    rows: Counter[str] = Counter()
    schemas = []
    for split, paths in files.items():
        for file in paths:
            schema, count = _read_arrow_header(file)
            rows[split] += count
            if schema not in schemas:
                schemas.append(schema)
    vocab = load_vocab(path / VOCAB_FILE)
    return PreparedInput(path, report, vocab, files, fingerprints, rows, schemas)


def _read_arrow_header(path: Path) -> tuple[object, int]:
    """An Arrow stream file's schema and row count (memory-mapped: the audio is not read)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            return reader.schema, sum(batch.num_rows for batch in reader)
    except (OSError, pa.ArrowException) as error:
        raise PhonetuneError(f"cannot read {path} ({error}); prepare its folder again") from None


# --- compatibility --------------------------------------------------------------------------
def check_compatible(inputs: list[PreparedInput]) -> None:
    """Each locale comes from one input, and every input was prepared the same way."""
    owners: dict[str, list[str]] = {}
    for i in inputs:
        for locale in i.report["per_locale"]:
            owners.setdefault(locale, []).append(str(i.path))
    shared = {locale: paths for locale, paths in owners.items() if len(paths) > 1}
    if shared:
        raise PhonetuneError(
            "cannot merge: "
            + "; ".join(f"locale {loc} is in {', '.join(paths)}" for loc, paths in shared.items())
            + ". Each locale must come from one input: leave the others out, or prepare the "
            "locales into separate folders (phonetune prepare --locales xx --out prep/xx)."
        )
    problems = []
    for key in ("espeak_ng", "phonemizer"):
        found = {str(i.path): i.report.get("versions", {}).get(key) for i in inputs}
        if len(set(found.values())) > 1:
            problems.append(f"{key} versions differ ({_listing(found)})")
    ignored = set(INPUT_SETTINGS)
    if all(_vocab_is_built(i) for i in inputs):
        ignored.add("oov_policy")  # it only applies to a vocabulary given with --vocab
    for key in sorted({k for i in inputs for k in i.report["settings"]} - ignored):
        found = {str(i.path): i.report["settings"].get(key) for i in inputs}
        if len({json.dumps(v, sort_keys=True) for v in found.values()}) > 1:
            problems.append(f"setting {key} differs ({_listing(found)})")
    built = {str(i.path): _vocab_is_built(i) for i in inputs}
    if len(set(built.values())) > 1:
        problems.append(
            "some inputs built their vocabulary from their clips and others were given one with "
            f"--vocab (built: {_listing(built)})"
        )
    elif not built[str(inputs[0].path)] and any(i.vocab != inputs[0].vocab for i in inputs):
        problems.append("the inputs were prepared with different --vocab files")
    if problems:
        raise PhonetuneError(
            "cannot merge: "
            + "; ".join(problems)
            + ". Prepare every locale with the same espeak-ng, phonemizer and prepare options "
            "(only --cv-root, --locales and --splits may differ)."
        )
    expected = shard_schema()
    for i in inputs:
        if any(schema != expected for schema in i.schemas):
            raise PhonetuneError(
                f"cannot merge: the Arrow files of {i.path} do not have the columns this "
                "phonetune writes; prepare that folder again with this version"
            )


def _vocab_is_built(prepared: PreparedInput) -> bool:
    return prepared.report.get("vocab", {}).get("source") == VOCAB_BUILT


def _listing(found: dict[str, object]) -> str:
    return ", ".join(f"{path}: {value}" for path, value in found.items())


def check_counts(prepared: PreparedInput) -> None:
    """The rows in an input's Arrow files are the clips its report says were kept.

    A dataset replaced by a later prepare run while its report was not (or the other way round)
    would otherwise merge into a report that describes other rows.
    """
    expected: Counter[str] = Counter()
    for entry in prepared.report["per_locale"].values():
        for split, stats in entry["splits"].items():
            expected[split] += stats["kept"]
    if +expected != +prepared.rows:
        raise PhonetuneError(
            f"{prepared.path}: its report counts {dict(+expected)} kept clips per split but its "
            f"dataset holds {dict(+prepared.rows)} rows; prepare it again"
        )


def check_out(out: Path, inputs: list[PreparedInput]) -> None:
    """Refuse an OUT_DIR that is an input or holds another dataset that merge would replace."""
    if out.exists() and not out.is_dir():
        raise PhonetuneError(f"OUT_DIR {out} exists and is not a folder")
    resolved = out.resolve()
    for prepared in inputs:
        if prepared.path.resolve() == resolved:
            raise PhonetuneError(f"OUT_DIR {out} is also an input: give a new folder")
    report = out / REPORT_FILE
    earlier_merge = False
    if report.is_file():
        try:
            earlier_merge = "merged_from" in json.loads(report.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            earlier_merge = False
    ours = [DATASET_FILE, VOCAB_FILE, REPORT_FILE, *SPLITS]
    if not earlier_merge and any((out / name).exists() for name in ours):
        raise PhonetuneError(
            f"OUT_DIR {out} already holds a dataset (or a train/dev/test folder) that merge did "
            "not write; merge replaces those, so give a new folder"
        )


# --- the merge -------------------------------------------------------------------------------
def merge_vocab(inputs: list[PreparedInput]) -> tuple[dict[str, int], str]:
    """One vocabulary, by prepare's rule, from every input's phone counts (or the given one).

    prepare counts the phones of all kept clips of all splits; the per-locale phone inventories
    in the reports hold exactly those counts, so their sum gives the vocabulary one prepare run
    over every locale would have built.
    """
    if not _vocab_is_built(inputs[0]):
        return inputs[0].vocab, inputs[0].report["vocab"]["source"]
    counts: Counter[str] = Counter()
    for prepared in inputs:
        for entry in prepared.report["per_locale"].values():
            counts.update(entry["phone_inventory"])
    return build_vocab(counts), VOCAB_BUILT


class Linker:
    """Puts an input's Arrow file in the merged dataset: a hard link, or a copy where none fits.

    A hard link costs no space and no time, and unlike a move it leaves the inputs intact; unlike
    a symbolic link it survives the inputs being deleted. Arrow files are never modified in place
    (prepare replaces a dataset with new files), so sharing them is safe. Hard links cannot
    cross file systems: there the file is copied.
    """

    def __init__(self) -> None:
        self.linked = 0
        self.copied = 0

    def __call__(self, source: Path, target: Path) -> None:
        try:
            os.link(source, target)
            self.linked += 1
            return
        except OSError:
            pass  # another file system, or one without hard links
        try:
            shutil.copyfile(source, target)
        except OSError as error:
            raise PhonetuneError(f"cannot link or copy {source} to {target}: {error}") from None
        self.copied += 1


def merge_reports(
    inputs: list[PreparedInput], vocab: dict[str, int], vocab_source: str, linker: Linker
) -> dict:
    """The inputs' reports as one: per-locale entries side by side, totals summed."""
    reports = [prepared.report for prepared in inputs]
    first = reports[0]
    rejected = [item for report in reports for item in report["rejected"]]
    reasons: Counter[str] = Counter()
    for report in reports:
        reasons.update(report["totals"]["rejected_by_reason"])
    settings = dict(first["settings"])
    roots = {report["settings"]["cv_root"] for report in reports}
    settings["cv_root"] = roots.pop() if len(roots) == 1 else None  # per input in merged_from
    settings["locales"] = [loc for report in reports for loc in report["settings"]["locales"]]
    settings["splits"] = [
        split for split in SPLITS if any(split in r["settings"]["splits"] for r in reports)
    ]
    phonetune_versions = sorted({report["versions"].get("phonetune") or "?" for report in reports})
    return {
        "versions": {**first["versions"], "phonetune": ", ".join(phonetune_versions)},
        "settings": settings,
        "totals": {
            "read": sum(r["totals"]["read"] for r in reports),
            "kept": sum(r["totals"]["kept"] for r in reports),
            "rejected": sum(r["totals"]["rejected"] for r in reports),
            # Each input rounded its hours to 4 decimals: the sum may differ from one prepare
            # run over every locale by up to 0.0001 h per input.
            "hours_kept": round(sum(r["totals"]["hours_kept"] for r in reports), 4),
            "rejected_by_reason": dict(reasons.most_common()),
        },
        "per_locale": {loc: entry for r in reports for loc, entry in r["per_locale"].items()},
        "vocab": {
            "size": len(vocab),
            "source": vocab_source,
            "phones_outside_vocab": {
                loc: counts
                for r in reports
                for loc, counts in r["vocab"].get("phones_outside_vocab", {}).items()
            },
        },
        "phoneme_cache": {
            "path": ", ".join(sorted({r["phoneme_cache"]["path"] for r in reports})),
            "hits": sum(r["phoneme_cache"]["hits"] for r in reports),
            "misses": sum(r["phoneme_cache"]["misses"] for r in reports),
        },
        "shards": {
            "reused": sum(r["shards"]["reused"] for r in reports),
            "written": sum(r["shards"]["written"] for r in reports),
        },
        "merged_from": [
            {
                "path": str(prepared.path),
                "cv_root": prepared.report["settings"]["cv_root"],
                "locales": prepared.report["settings"]["locales"],
                "kept": prepared.report["totals"]["kept"],
            }
            for prepared in inputs
        ],
        "merge": {"files_linked": linker.linked, "files_copied": linker.copied},
        "rejected": rejected,
    }


def merge(out: Path, paths: list[Path]) -> dict:
    """Merge prepared datasets into `out`; returns the report (also in `out/prep_report.json`)."""
    if not paths:
        raise PhonetuneError("give at least one prepared folder to merge")
    duplicates = [str(p) for p, n in Counter(p.resolve() for p in paths).items() if n > 1]
    if duplicates:
        raise PhonetuneError(f"an input is given twice: {', '.join(duplicates)}")
    inputs = [read_input(path) for path in paths]
    check_compatible(inputs)
    for prepared in inputs:
        check_counts(prepared)
    check_out(out, inputs)
    vocab, source = merge_vocab(inputs)
    out.mkdir(parents=True, exist_ok=True)
    files = {split: [f for i in inputs for f in i.files.get(split, [])] for split in SPLITS}
    fingerprints = {
        split: hashlib.sha256(
            "\n".join(i.fingerprints[split] for i in inputs if split in i.fingerprints).encode()
        ).hexdigest()[:16]
        for split in SPLITS
        if files[split]
    }
    linker = Linker()
    write_dataset(out, files, fingerprints, linker)
    save_vocab(vocab, out / VOCAB_FILE)
    report = merge_reports(inputs, vocab, source, linker)
    tmp = out / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, out / REPORT_FILE)  # written last: a merged folder with a report is whole
    return report


# --- the command ------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="folder for the merged dataset")
    parser.add_argument(
        "inputs",
        type=Path,
        nargs="+",
        metavar="IN_DIR",
        help="folders written by `phonetune prepare` for disjoint locales; the merged rows and "
        "locales keep this order",
    )


def run(args: argparse.Namespace) -> int:
    report = merge(args.out, args.inputs)
    print_summary(report, args.out)
    links = report["merge"]
    print(
        f"merged {len(args.inputs)} prepared datasets: {links['files_linked']} Arrow files "
        f"hard-linked, {links['files_copied']} copied (another file system)"
    )
    return 0
