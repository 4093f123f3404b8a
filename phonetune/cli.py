"""The `phonetune` command, over every stage. Each subcommand lives in the module of its stage.

A subcommand module exposes `configure_parser(parser)` and `run(args) -> int`. Modules are imported
only when their subcommand runs, so `phonetune --help` is instant (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from phonetune.data.errors import PhonetuneError

# name -> (module, one-line help). The order is the order of a whole job.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("phonetune.data.synth", "write a synthetic Common Voice release spoken by espeak-ng"),
    "prepare": (
        "phonetune.data.prepare",
        "Common Voice release -> espeak phones + 16 kHz audio dataset",
    ),
    "merge": ("phonetune.data.merge", "merge prepared datasets of disjoint locales into one"),
    "train": (
        "phonetune.train.loop",
        "fine-tune a wav2vec 2.0 encoder with CTC on a prepared dataset",
    ),
    "report": ("phonetune.train.plots", "plots of a run's curves and one HTML page"),
    "export": ("phonetune.infer.export", "write a transformers-loadable model folder (and ONNX)"),
    "lm": ("phonetune.infer.lm", "a phone n-gram LM (ARPA) from a prepared dataset, for --beam"),
    "evaluate": ("phonetune.infer.evaluate", "phone error rate of a model on a prepared split"),
    "transcribe": ("phonetune.infer.transcribe", "print the phones of audio files"),
    "align": ("phonetune.infer.align", "CTC forced alignment: when each known phone is said"),
    "demo": ("phonetune.demo", "synth -> prepare -> train -> export -> evaluate, end to end"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phonetune",
        description="Train multilingual phone recognizers (wav2vec 2.0 + CTC on espeak-ng phones).",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback when an error stops a command"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback when an error stops the command",
        )
        if name == command:
            importlib.import_module(module_name).configure_parser(sub)
    return parser


def _find_command(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def quiet_foreign_warnings() -> None:
    """DeepSpeed, when installed, is imported by transformers' `save_pretrained` (through
    Accelerate's unwrapping) whether or not it is used, so by every checkpoint save and export,
    and on a machine without a GPU it then warns "Setting accelerator to CPU" into the output.
    phonetune's own code imports it only under a DeepSpeed launcher config; this drops that one
    warning (a function added twice as a filter is kept once)."""
    logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_fallback_warning)


def _not_the_cpu_fallback_warning(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def main(argv: list[str] | None = None, hooks: object = None) -> int:
    """Run a subcommand; `hooks` (train.loop.Hooks) reach `train` only: tests and benchmarks
    launching training processes of their own."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_foreign_warnings()
    command = _find_command(argv)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int((module.run(args, hooks) if hooks is not None else module.run(args)) or 0)
    except PhonetuneError as error:
        if args.debug:
            raise
        print(f"phonetune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phonetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
