"""`phonetune demo`: the whole job on the embedded default, end to end, in one command.

synth (a multilingual Common Voice release spoken by espeak-ng) -> prepare -> train the tiny CPU
recipe -> export -> evaluate on the held-out test speakers -> transcribe a few clips.
Each stage reads only what the previous one wrote into --out, exactly as a user's run would, and a
second `phonetune demo --out DIR` continues where the first stopped (training resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from phonetune.data.errors import PhonetuneError
from phonetune.data.locales import DEFAULT_LOCALES, parse_locales
from phonetune.data.options import non_negative_int, positive_int

DEMO_CONFIG = "tiny_cpu.yaml"
# 400 clips (280 for training) per locale: with 200 the tiny model learns its training speakers by
# heart and stops near test PER 0.26; with 400 and 1500 steps it reaches about 0.15, and the whole
# demo still finishes in about 5 minutes on 2 CPU cores (BENCHMARKS.md, "The demo").
DEFAULT_CLIPS_PER_LOCALE = 400
DEFAULT_LOCALES_DEMO = DEFAULT_LOCALES[:8]
TRANSCRIBE_CLIPS = 3


def stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def synthesize_stage(out: Path, locales: list[str], clips: int, seed: int, workers: int) -> Path:
    from phonetune.data.synth import synthesize_corpus

    corpus = out / "corpus"
    manifest = corpus / "phonetune_synth.json"
    if manifest.is_file():
        print(f"reusing the corpus in {corpus} (delete it to synthesize again)")
        return corpus
    summary = synthesize_corpus(
        corpus, locales, clips, seed=seed, num_workers=workers, progress=True
    )
    print(f"{summary['clips']} clips, {summary['hours']:.2f} h of speech in {len(locales)} locales")
    return corpus


def prepare_stage(corpus: Path, out: Path, locales: list[str], workers: int) -> Path:
    from phonetune.data.prepare import PrepareOptions, prepare, print_summary

    prepared = out / "prepared"
    report = prepare(
        PrepareOptions(cv_root=corpus, locales=locales, out=prepared, num_workers=workers)
    )
    print_summary(report, prepared)
    return prepared


def train_stage(prepared: Path, out: Path, max_steps: int | None, overrides: list[str]) -> dict:
    from phonetune.train.config import load_config, shipped_config
    from phonetune.train.loop import train

    run_dir = out / "run"
    settings = [f"data.prepared_dir={prepared}", f"run.output_dir={run_dir}", "resume=auto"]
    if max_steps is not None:
        settings.append(f"train.max_steps={max_steps}")
    config = load_config(shipped_config(DEMO_CONFIG), settings + overrides)
    return train(config)


def export_stage(run_dir: Path, out: Path, onnx: bool) -> Path:
    from phonetune.infer.export import export_model

    return export_model(run_dir, out / "export", onnx=onnx, overwrite=True)


def evaluate_stage(export_dir: Path, prepared: Path, out: Path) -> dict:
    from phonetune.infer.evaluate import evaluate_model

    return evaluate_model(export_dir, prepared, split="test", out=out / "test_metrics.json")


def transcribe_stage(export_dir: Path, prepared: Path, corpus: Path) -> None:
    from datasets import load_from_disk

    from phonetune.infer.transcribe import transcribe_files

    test = load_from_disk(str(prepared))["test"]
    picks = sorted({locale: i for i, locale in enumerate(test["locale"])}.values())
    picks = picks[:TRANSCRIBE_CLIPS]
    paths = [corpus / test[i]["path"] for i in picks]
    for index, transcript in zip(picks, transcribe_files(export_dir, paths), strict=True):
        print(
            f"{transcript.path}\n  heard:     {transcript.phones}\n  reference: {test[index]['phones']}"
        )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("phonetune-demo"),
        help="folder for the corpus, prepared data, run, export and test_metrics.json "
        "(default: ./phonetune-demo; run again to continue an interrupted demo)",
    )
    parser.add_argument(
        "--locales",
        default=",".join(DEFAULT_LOCALES_DEMO),
        help=f"Common Voice locales to synthesize (default: {','.join(DEFAULT_LOCALES_DEMO)})",
    )
    parser.add_argument(
        "--clips-per-locale",
        type=positive_int,
        default=DEFAULT_CLIPS_PER_LOCALE,
        help=f"synthetic clips per locale (default: {DEFAULT_CLIPS_PER_LOCALE}); fewer is faster",
    )
    parser.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help=f"training steps (default: the value in configs/{DEMO_CONFIG}); fewer is faster, "
        "more learns more",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the corpus (default 0)"
    )
    parser.add_argument(
        "--num-workers",
        type=positive_int,
        default=max(1, min(2, os.cpu_count() or 1)),
        help="processes for synthesis and preparation (default: up to 2)",
    )
    parser.add_argument("--onnx", action="store_true", help="also export and check an ONNX graph")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="extra training config overrides, e.g. train.lr=5e-4",
    )


def run(args: argparse.Namespace) -> int:
    locales = parse_locales(args.locales)  # an unknown locale is a PhonetuneError
    if args.clips_per_locale < 10:
        raise PhonetuneError(
            "--clips-per-locale must be at least 10 (train, dev and test need clips)"
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the stages' own bars and lines say what happens
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    stage("1/6 synthesize a Common Voice release with espeak-ng")
    corpus = synthesize_stage(out, locales, args.clips_per_locale, args.seed, args.num_workers)
    stage("2/6 prepare: phonemize, decode, build the vocabulary")
    prepared = prepare_stage(corpus, out, locales, args.num_workers)
    stage(f"3/6 train configs/{DEMO_CONFIG}")
    trained = train_stage(prepared, out, args.max_steps, args.overrides)
    run_dir = Path(trained["run_dir"])
    stage("4/6 export a transformers model folder")
    export_dir = export_stage(run_dir, out, args.onnx)
    stage("5/6 evaluate on the held-out test speakers")
    metrics = evaluate_stage(export_dir, prepared, out)
    stage("6/6 transcribe a few test clips")
    transcribe_stage(export_dir, prepared, corpus)

    minutes = (time.perf_counter() - started) / 60
    overall = metrics["overall"]
    print(
        f"\ndone in {minutes:.1f} min: test PER {overall['per']:.3f} over "
        f"{overall['utterances']} utterances of held-out speakers"
    )
    if overall["deletions"] == overall["ref_phones"] and not overall["insertions"]:
        from phonetune.train.report import explain_blank_model

        print(explain_blank_model(trained["step"], "`phonetune demo --max-steps N`", "test"))
    for name, path in [
        ("corpus", corpus),
        ("prepared data", prepared),
        ("run", run_dir),
        ("export", export_dir),
        ("test metrics", out / "test_metrics.json"),
    ]:
        print(f"  {name:<14} {path}")
    summary = {"test_per": overall["per"], "minutes": round(minutes, 2), "out": str(out)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0
