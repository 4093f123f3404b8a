"""Benchmark the data stage on one synthetic corpus, three ways, in one run.

(a) decode + resample only (the practical limit: every clip must be decoded once);
(b) `phonetune prepare` (cold phoneme cache, fresh output folder);
(c) the tutorial way: `datasets.map` over examples, one `phonemizer.phonemize()` call and one
    decode + resample per example, arrays stored as float lists.
All three use the same number of processes. Prints a table and a final JSON line.

    python scripts/bench_prepare.py --clips-per-locale 100 --num-workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from data.audio import load_audio
from data.commonvoice import SPLITS
from data.locales import DEFAULT_LOCALES, get_locale
from data.prepare import PrepareOptions, prepare


def list_clips(cv_root: Path, locales: list[str]) -> list[tuple[str, str, Path]]:
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


def _decode_only(path: Path) -> int:
    return len(load_audio(path))


def run_decode_only(clips: list[tuple[str, str, Path]], workers: int) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        total = sum(pool.imap_unordered(_decode_only, [c[2] for c in clips], chunksize=16))
    assert total > 0
    return time.perf_counter() - start


def run_phonetune(cv_root: Path, locales: list[str], workers: int, scratch: Path) -> float:
    start = time.perf_counter()
    prepare(
        PrepareOptions(
            cv_root=cv_root,
            locales=locales,
            out=scratch / "prep",
            num_workers=workers,
            cache_dir=scratch / "cache",
        )
    )
    return time.perf_counter() - start


def _tutorial_example(example: dict) -> dict:
    """One example the way CTC fine-tuning tutorials write it."""
    import soundfile
    import soxr
    from phonemizer import phonemize
    from phonemizer.separator import Separator

    from data.espeak import configure_phonemizer

    configure_phonemizer()
    samples, rate = soundfile.read(example["path"], dtype="float32")
    example["audio"] = soxr.resample(samples, rate, 16_000).tolist()
    example["phones"] = phonemize(
        example["sentence"],
        language=example["language"],
        backend="espeak",
        separator=Separator(phone=" ", word="", syllable=""),
        strip=False,
    )
    return example


def run_tutorial(clips: list[tuple[str, str, Path]], workers: int, scratch: Path) -> float:
    from datasets import Dataset

    table = {
        "language": [get_locale(c[0]).espeak for c in clips],
        "sentence": [c[1] for c in clips],
        "path": [str(c[2]) for c in clips],
    }
    start = time.perf_counter()
    dataset = Dataset.from_dict(table).map(_tutorial_example, num_proc=workers)
    dataset.save_to_disk(str(scratch / "tutorial"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cv-root", type=Path, help="existing corpus (default: synthesize one)")
    parser.add_argument("--locales", default=",".join(DEFAULT_LOCALES))
    parser.add_argument("--clips-per-locale", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--skip-tutorial", action="store_true", help="skip (c), the slowest")
    args = parser.parse_args()
    locales = args.locales.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        cv_root = args.cv_root
        if cv_root is None:
            from data.synth import synthesize_corpus

            cv_root = scratch / "cv"
            synthesize_corpus(
                cv_root,
                locales,
                clips_per_locale=args.clips_per_locale,
                seed=0,
                num_workers=args.num_workers,
            )
        clips = list_clips(cv_root, locales)
        hours = sum(len(load_audio(c[2])) for c in clips) / 16_000 / 3600
        times = {
            "decode_only": run_decode_only(clips, args.num_workers),
            "phonetune": run_phonetune(cv_root, locales, args.num_workers, scratch),
        }
        if not args.skip_tutorial:
            times["tutorial"] = run_tutorial(clips, args.num_workers, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\n{len(clips)} clips, {hours:.3f} h of audio, {len(locales)} locales, "
        f"{args.num_workers} processes, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    )
    print(f"{'method':<14} {'seconds':>9} {'clips/s':>9} {'audio h/h':>10}")
    result: dict[str, float | int | str] = {
        "clips": len(clips),
        "hours": round(hours, 4),
        "num_workers": args.num_workers,
    }
    for name, seconds in times.items():
        print(
            f"{name:<14} {seconds:>9.2f} {len(clips) / seconds:>9.1f} {hours * 3600 / seconds:>10.0f}"
        )
        result[f"{name}_clips_per_s"] = round(len(clips) / seconds, 2)
    result["phonetune_vs_decode_only"] = round(times["decode_only"] / times["phonetune"], 3)
    if "tutorial" in times:
        result["phonetune_vs_tutorial"] = round(times["tutorial"] / times["phonetune"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
