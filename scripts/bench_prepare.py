"""Benchmark the data stage on one synthetic corpus, four ways, in one run.

(a) decode + resample only, in a pool of --num-workers processes (the practical limit: every clip
    must be decoded once);
(b) `phonetune prepare` with --num-workers processes (cold phoneme cache, fresh output folder);
(c) the tutorial way, --num-workers processes: `datasets.map(num_proc=...)` over examples, one
    `phonemizer.phonemize()` call and one decode + resample per example, arrays stored as float
    lists, then `save_to_disk`;
(d) the naive way, one process: a loop that calls `phonemizer.phonemize()`, decodes and resamples
    one clip at a time and appends it, then `Dataset.from_dict(...).save_to_disk`.
Each run is a fresh Python process, as a command would be, so every method pays its own start-up
and imports each time; its wall time and CPU time (its process and its workers) are measured.
With --repeat N the methods take turns N times and the medians (and the best wall times) are
reported, which keeps a busy machine's noise out of the comparison. Prints a table and a final JSON line.

    python scripts/bench_prepare.py --cv-root /tmp/cv300 --clips-per-locale 300 --num-workers 2

A --cv-root that does not exist yet is synthesized there (and kept, so a re-run skips synthesis);
without --cv-root the corpus goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import soundfile

from phonetune.data.audio import load_audio
from phonetune.data.commonvoice import SPLITS
from phonetune.data.locales import DEFAULT_LOCALES, get_locale
from phonetune.data.prepare import PrepareOptions, prepare

Clips = list[tuple[str, str, Path]]
METHODS = ("decode_only", "phonetune", "tutorial", "naive")


def list_clips(cv_root: Path, locales: list[str]) -> Clips:
    """(locale, sentence, clip path) for every row of the split TSVs."""
    rows = []
    for locale in locales:
        for split in SPLITS:
            lines = (cv_root / locale / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
            header = lines[0].split("\t")
            for line in lines[1:]:
                fields = dict(zip(header, line.split("\t"), strict=False))
                rows.append(
                    (locale, fields["sentence"], cv_root / locale / "clips" / fields["path"])
                )
    return rows


# --- (a) decode only --------------------------------------------------------------------------
def _decode_only(path: Path) -> int:
    return len(load_audio(path))


def run_decode_only(cv_root: Path, locales: list[str], workers: int, scratch: Path) -> None:
    clips = list_clips(cv_root, locales)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        total = sum(pool.imap_unordered(_decode_only, [c[2] for c in clips], chunksize=16))
    assert total > 0


# --- (b) phonetune prepare --------------------------------------------------------------------
def run_phonetune(cv_root: Path, locales: list[str], workers: int, scratch: Path) -> None:
    prepare(
        PrepareOptions(
            cv_root=cv_root,
            locales=locales,
            out=scratch / "prep",
            num_workers=workers,
            cache_dir=scratch / "cache",
        )
    )


# --- (c) the tutorial way ---------------------------------------------------------------------
def _phonemize_one(sentence: str, language: str) -> str:
    """One `phonemizer.phonemize()` call per sentence, as CTC fine-tuning tutorials write it."""
    from phonemizer import phonemize
    from phonemizer.separator import Separator

    from phonetune.data.espeak import configure_phonemizer

    configure_phonemizer()
    return phonemize(
        sentence,
        language=language,
        backend="espeak",
        separator=Separator(phone=" ", word="", syllable=""),
        strip=False,
    )


def _tutorial_example(example: dict) -> dict:
    import soundfile
    import soxr

    samples, rate = soundfile.read(example["path"], dtype="float32")
    example["audio"] = soxr.resample(samples, rate, 16_000).tolist()
    example["phones"] = _phonemize_one(example["sentence"], example["language"])
    return example


def run_tutorial(cv_root: Path, locales: list[str], workers: int, scratch: Path) -> None:
    from datasets import Dataset

    clips = list_clips(cv_root, locales)
    table = {
        "language": [get_locale(c[0]).espeak for c in clips],
        "sentence": [c[1] for c in clips],
        "path": [str(c[2]) for c in clips],
    }
    dataset = Dataset.from_dict(table).map(_tutorial_example, num_proc=workers)
    dataset.save_to_disk(str(scratch / "tutorial"))


# --- (d) the naive way ------------------------------------------------------------------------
def run_naive(cv_root: Path, locales: list[str], workers: int, scratch: Path) -> None:
    """One process, one clip at a time (`workers` is ignored: a first script has no pool)."""
    import soxr
    from datasets import Dataset

    clips = list_clips(cv_root, locales)
    rows: dict[str, list] = {"audio": [], "phones": [], "locale": [], "sentence": [], "path": []}
    for locale, sentence, path in clips:
        samples, rate = soundfile.read(str(path), dtype="float32")
        rows["audio"].append(soxr.resample(samples, rate, 16_000))
        rows["phones"].append(_phonemize_one(sentence, get_locale(locale).espeak))
        rows["locale"].append(locale)
        rows["sentence"].append(sentence)
        rows["path"].append(str(path))
    Dataset.from_dict(rows).save_to_disk(str(scratch / "naive"))


# --- timing -----------------------------------------------------------------------------------
RUNS: dict[str, Callable[[Path, list[str], int, Path], None]] = {
    "decode_only": run_decode_only,
    "phonetune": run_phonetune,
    "tutorial": run_tutorial,
    "naive": run_naive,
}


def children_cpu_seconds() -> float:
    """CPU time of the ended child processes and of everything they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(method: str, args: argparse.Namespace, cv_root: Path, scratch: Path) -> tuple:
    """(wall seconds, CPU seconds) of one run of `method` in a fresh Python process.

    A fresh process per run, as a user runs a command: each method pays its own start-up and
    imports (`datasets`, phonemizer, ...) every time, not only in its first run.
    """
    folder = Path(tempfile.mkdtemp(dir=scratch))
    command = [sys.executable, __file__, "--run", method, "--cv-root", str(cv_root)]
    command += ["--locales", args.locales, "--num-workers", str(args.num_workers)]
    command += ["--scratch", str(folder)]
    cpu, wall = children_cpu_seconds(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, cpu = time.perf_counter() - wall, children_cpu_seconds() - cpu
    shutil.rmtree(folder, ignore_errors=True)
    return wall, cpu


def ensure_corpus(args: argparse.Namespace, locales: list[str], scratch: Path) -> Path:
    cv_root = args.cv_root or scratch / "cv"
    if not cv_root.exists():
        from phonetune.data.synth import synthesize_corpus

        synthesize_corpus(
            cv_root,
            locales,
            clips_per_locale=args.clips_per_locale,
            seed=0,
            num_workers=args.num_workers,
        )
    return cv_root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cv-root",
        type=Path,
        help="corpus to use; synthesized there first if it does not exist (default: a "
        "temporary one)",
    )
    parser.add_argument("--locales", default=",".join(DEFAULT_LOCALES))
    parser.add_argument("--clips-per-locale", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (medians)")
    parser.add_argument(
        "--skip", default="", help="comma-separated methods to leave out, e.g. tutorial,naive"
    )
    parser.add_argument("--label", default="", help="machine state for the record, e.g. quiet")
    parser.add_argument("--run", choices=METHODS, help=argparse.SUPPRESS)  # one timed run
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    locales = args.locales.split(",")
    if args.run:
        RUNS[args.run](args.cv_root, locales, args.num_workers, args.scratch)
        return
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skip - set(METHODS)
    if unknown:
        parser.error(f"--skip: unknown method(s) {', '.join(sorted(unknown))}")
    scratch = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        cv_root = ensure_corpus(args, locales, scratch)
        clips = list_clips(cv_root, locales)
        hours = sum(soundfile.info(str(c[2])).duration for c in clips) / 3600
        samples: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS if m not in skip}
        for _ in range(args.repeat):
            for name in samples:  # taking turns: a load spike hits every method alike
                samples[name].append(measure(name, args, cv_root, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(args, clips, hours, samples)


def report(args: argparse.Namespace, clips: Clips, hours: float, samples: dict[str, list]) -> None:
    wall = {name: statistics.median(w for w, _ in runs) for name, runs in samples.items()}
    best = {name: min(w for w, _ in runs) for name, runs in samples.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in samples.items()}
    load = os.getloadavg()[0]
    print(
        f"\n{len(clips)} clips, {hours:.3f} h of audio, {len(args.locales.split(','))} locales, "
        f"{args.num_workers} processes ((d): 1), {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average {load:.1f}, "
        f"median of {args.repeat} run(s)"
    )
    print(
        f"{'method':<12} {'wall s':>8} {'best s':>8} {'CPU s':>8} {'clips/s':>9} {'audio h/h':>10}"
    )
    result: dict[str, float | int | str] = {
        "clips": len(clips),
        "hours": round(hours, 4),
        "num_workers": args.num_workers,
        "repeat": args.repeat,
        "load_average": round(load, 2),
        "label": args.label,
    }
    for name in samples:
        print(
            f"{name:<12} {wall[name]:>8.2f} {best[name]:>8.2f} {cpu[name]:>8.2f} "
            f"{len(clips) / wall[name]:>9.1f} "
            f"{hours * 3600 / wall[name]:>10.0f}"
        )
        result[f"{name}_wall_s"] = round(wall[name], 3)
        result[f"{name}_best_wall_s"] = round(best[name], 3)
        result[f"{name}_cpu_s"] = round(cpu[name], 3)
    if "phonetune" in wall:
        # Throughput ratios: how many times faster (or, for decode_only, how close) phonetune is.
        for name in ("decode_only", "tutorial", "naive"):
            if name in wall:
                result[f"phonetune_vs_{name}"] = round(wall[name] / wall["phonetune"], 3)
                result[f"phonetune_vs_{name}_best"] = round(best[name] / best["phonetune"], 3)
                result[f"phonetune_vs_{name}_cpu"] = round(cpu[name] / cpu["phonetune"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
