"""`phonetune report RUN`: a run's curves as PNG plots and one HTML page, from its metrics.jsonl.

    loss.png            training loss (mean over each logging interval)
    learning_rate.png   the schedule as it ran
    dev_per.png         dev PER, overall and per locale
    blank_fraction.png  the share of dev frames whose most likely token is the CTC blank
    throughput.png      audio seconds trained per second, and the padding fraction
    locale_seconds.png  the share of each locale in the audio trained on (language sampling)
    index.html          the plots, the best checkpoint, the last evaluation and the run's config

Only what the run has logged so far is read (a running run's last line may be cut short: it is
skipped), so the report can be made at any time, as often as wanted.
"""

from __future__ import annotations

import argparse
import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phonetune.data.errors import PhonetuneError
from phonetune.data.files import read_text
from phonetune.train.checkpoint import CONFIG_FILE, METRICS_FILE, read_best

Record = dict[str, Any]


def read_metrics(run_dir: Path) -> tuple[list[Record], list[Record], int]:
    """The training lines and the evaluation lines of a run's metrics.jsonl, and how many lines
    could not be read (cut short, or damaged)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PhonetuneError(
            f"{run_dir} has no {METRICS_FILE}: give the run.output_dir of a `phonetune train` run "
            "(it is written from the first logging step on)"
        )
    train, evals, unreadable = [], [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            unreadable += 1
        elif "eval_per" in record:
            evals.append(record)
        elif "loss" in record:
            train.append(record)
    if not train and not evals:
        raise PhonetuneError(f"{path} holds no training or evaluation line yet")
    return train, evals, unreadable


def series(records: list[Record], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a number under `key`."""
    points = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
    ]
    return [p[0] for p in points], [p[1] for p in points]


def new_axes(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def plot_loss(train: list[Record], evals: list[Record]) -> Any:
    figure, axes = new_axes("Training loss (CTC, per label token)", "loss")
    steps, values = series(train, "loss")
    axes.plot(steps, values, color="tab:blue")
    if values and min(values) > 0 and max(values) / min(values) > 20:
        axes.set_yscale("log")  # the first steps' loss is orders of magnitude above the rest
    return figure


def plot_learning_rate(train: list[Record], evals: list[Record]) -> Any:
    figure, axes = new_axes("Learning rate", "lr")
    axes.plot(*series(train, "lr"), color="tab:green")
    return figure


def plot_dev_per(train: list[Record], evals: list[Record]) -> Any:
    figure, axes = new_axes("Dev phone error rate", "PER")
    locales = sorted({loc for r in evals for loc in (r.get("eval_per_locale") or {})})
    for locale in locales:
        points = [
            (r["step"], r["eval_per_locale"][locale])
            for r in evals
            if isinstance((r.get("eval_per_locale") or {}).get(locale), int | float)
        ]
        axes.plot(*zip(*points, strict=True), alpha=0.6, linewidth=1, marker=".", label=locale)
    axes.plot(*series(evals, "eval_per"), color="black", linewidth=2.5, marker="o", label="all")
    axes.legend(fontsize="small", ncol=2 if len(locales) > 8 else 1)
    return figure


def plot_blank_fraction(train: list[Record], evals: list[Record]) -> Any:
    figure, axes = new_axes("Dev frames whose most likely token is the blank", "fraction")
    axes.plot(*series(evals, "eval_blank_fraction"), color="tab:purple", marker="o")
    axes.set_ylim(0, 1)
    return figure


def plot_throughput(train: list[Record], evals: list[Record]) -> Any:
    figure, axes = new_axes("Throughput", "audio seconds trained per second")
    axes.plot(*series(train, "audio_seconds_per_second"), color="tab:orange")
    padding = axes.twinx()
    padding.plot(*series(train, "padding_fraction"), color="tab:gray", alpha=0.7)
    padding.set_ylabel("padding fraction (gray)")
    padding.set_ylim(0, max([0.1, *series(train, "padding_fraction")[1]]) * 1.1)
    return figure


def plot_locale_seconds(train: list[Record], evals: list[Record]) -> Any:
    # Cumulative: one interval's batches come from a few duration buckets, so its mix of
    # locales is noisy; the running total settles on the epoch's shares.
    figure, axes = new_axes("Share of each locale in the audio trained on so far", "share")
    lines = [r for r in train if isinstance(r.get("locale_seconds"), dict)]
    locales = sorted({loc for r in lines for loc in r["locale_seconds"]})
    steps = [r["step"] for r in lines]
    running = dict.fromkeys(locales, 0.0)
    shares: list[list[float]] = [[] for _ in locales]
    for record in lines:
        for locale in locales:
            seconds = record["locale_seconds"].get(locale, 0.0)
            running[locale] += seconds if isinstance(seconds, int | float) else 0.0
        total = sum(running.values()) or 1.0
        for row, locale in zip(shares, locales, strict=True):
            row.append(running[locale] / total)
    axes.stackplot(steps, shares, labels=locales, alpha=0.85)
    axes.set_ylim(0, 1)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


# file -> (plot, what it needs: "train" or "eval" lines, and the key they must hold)
PLOTS: dict[str, tuple[Callable[[list[Record], list[Record]], Any], str, str]] = {
    "loss.png": (plot_loss, "train", "loss"),
    "learning_rate.png": (plot_learning_rate, "train", "lr"),
    "dev_per.png": (plot_dev_per, "eval", "eval_per"),
    "blank_fraction.png": (plot_blank_fraction, "eval", "eval_blank_fraction"),
    "throughput.png": (plot_throughput, "train", "audio_seconds_per_second"),
    "locale_seconds.png": (plot_locale_seconds, "train", "locale_seconds"),
}


def write_report(run_dir: Path, out: Path) -> list[str]:
    """The plots the run's metrics allow, and index.html, in `out`; returns the plot files."""
    train, evals, unreadable = read_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (plot, kind, key) in PLOTS.items():
        records = train if kind == "train" else evals
        if not any(key in r for r in records):
            continue  # e.g. no evaluation yet
        figure = plot(train, evals)
        figure.savefig(out / name, dpi=110)
        written.append(name)
    page = render_page(run_dir, train, evals, written, unreadable)
    (out / "index.html").write_text(page, encoding="utf-8")
    return written


def render_page(
    run_dir: Path, train: list[Record], evals: list[Record], plots: list[str], unreadable: int
) -> str:
    best = read_best(run_dir)
    last_step = max([r["step"] for r in train + evals])
    facts = [f"last logged step: {last_step}"]
    if best:
        facts.append(
            f"best checkpoint: {html.escape(str(best.get('path')))} (dev PER {best.get('eval_per')})"
        )
    if unreadable:
        facts.append(f"{unreadable} line(s) of {METRICS_FILE} could not be read and are left out")
    table = ""
    if evals:
        last = evals[-1]
        rows = "".join(
            f"<tr><td>{html.escape(str(loc))}</td><td>{per:.4f}</td></tr>"
            for loc, per in sorted((last.get("eval_per_locale") or {}).items())
            if isinstance(per, int | float)
        )
        table = (
            f"<h2>Last evaluation (step {last['step']})</h2><table><tr><th>locale</th><th>PER</th></tr>"
            f"{rows}<tr><td><b>all</b></td><td><b>{last['eval_per']:.4f}</b></td></tr></table>"
        )
    images = "".join(f'<figure><img src="{name}" alt="{name}"></figure>' for name in plots)
    config = run_dir / CONFIG_FILE
    config_text = read_text(config) if config.is_file() else "(no config.yaml)"
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>phonetune run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>phonetune run {html.escape(str(run_dir))}</h1>
<p>{"<br>".join(facts)}<br>made {made} from {METRICS_FILE} as it was then</p>
{table}
{images}
<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""


# --- command line -----------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="a training run folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the plots and index.html (default RUN_DIR/report)",
    )


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else args.run / "report"
    if out.exists() and not out.is_dir():
        raise PhonetuneError(f"--out {out} is a file: give a folder")
    written = write_report(args.run, out)
    print(f"wrote {out / 'index.html'} with {len(written)} plots: {', '.join(written)}")
    return 0
