"""The README's usage examples, run as written and in order, in a fresh folder, so that the README
cannot drift from the code.

Every ```bash and ```python block from "## Usage" on is executed, command by command, in one empty
working folder (as a new user would, with `phonetune` and `accelerate` on the PATH). Training and
the demo are shortened by adding options to the same commands (fewer steps, fewer clips), never by
changing them. What needs GPUs or a cluster is checked as far as a CPU machine can: the launcher
config exists and parses, and the training command's config and overrides validate
(`--print-config`); a SLURM script passes `bash -n`; a benchmark script answers `--help`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Added to the commands that would otherwise run for minutes.
SHORTER_TRAINING = ["train.max_steps=8", "train.eval_steps=4", "train.save_steps=4"]
SHORTER_DEMO = ["--clips-per-locale", "10", "--max-steps", "8"]
COMMAND_TIMEOUT_S = 600


@dataclass
class Example:
    section: str
    language: str
    code: str


def read_examples(text: str) -> list[Example]:
    """The bash and python blocks of the usage part of the README (from "## Usage" on), in order."""
    usage = text[text.index("\n## Usage") :]
    examples, section = [], ""
    for match in re.finditer(r"^(#{2,3} [^\n]*)$|^```(\w*)\n(.*?)^```$", usage, re.M | re.S):
        if match.group(1):
            section = match.group(1).lstrip("# ")
        elif match.group(2) in ("bash", "python"):
            examples.append(Example(section, match.group(2), match.group(3)))
    return examples


def split_commands(code: str) -> list[str]:
    """One string per command: continuation lines joined, blank and comment lines left out."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def without_comment(command: str) -> str:
    return re.sub(r"\s+#.*$", "", command)


def shortened(command: str) -> str:
    if re.search(r"\bphonetune demo\b", command):
        return f"{without_comment(command)} {shlex.join(SHORTER_DEMO)}"
    if re.search(r"\bphonetune train\b", command):
        return f"{without_comment(command)} {shlex.join(SHORTER_TRAINING)}"
    return command


def needs_more_than_a_cpu(command: str) -> bool:
    words = shlex.split(without_comment(command))
    launcher = words[:2] == ["accelerate", "launch"] and "--cpu" not in words
    benchmark = words[0] == "python" and words[1].startswith("scripts/")
    return launcher or benchmark or "sbatch" in words


def check_without_running(command: str, env: dict, cwd: Path) -> None:
    """What a CPU machine can check of a GPU, cluster or benchmark command."""
    words = shlex.split(without_comment(command))
    if words[:2] == ["accelerate", "launch"]:
        launcher_config = REPO / words[words.index("--config_file") + 1]
        assert isinstance(yaml.safe_load(launcher_config.read_text()), dict), launcher_config
        train_args = words[words.index("train") + 1 :]
        run(["phonetune", "train", *train_args, "--print-config"], env, cwd, command)
    elif "sbatch" in words:
        script = REPO / next(word for word in words if word.endswith(".sh"))
        run(["bash", "-n", str(script)], env, cwd, command)
    else:  # python scripts/X.py ...: the script exists and parses its options
        run([sys.executable, str(REPO / words[1]), "--help"], env, cwd, command)


def run(argv: list[str], env: dict, cwd: Path, shown: str) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"README command failed (exit {done.returncode}): {shown}\n{output}"
    )
    assert "Traceback" not in output, f"{shown}\n{output}"
    return output


@pytest.mark.slow
def test_the_readme_usage_examples_run_as_written_in_order(tmp_path):
    examples = read_examples(README.read_text(encoding="utf-8"))
    assert len(examples) >= 10, "the README's usage examples were not found"
    workdir = tmp_path / "user"
    workdir.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": str(tmp_path),  # the merge example's per-job caches land here
        "PHONETUNE_CACHE_DIR": str(tmp_path / "cache"),
    }
    ran = checked = 0
    for example in examples:
        if example.language == "python":
            script = tmp_path / "example.py"
            script.write_text(example.code, encoding="utf-8")
            run([sys.executable, str(script)], env, workdir, example.code)
            ran += 1
            continue
        for command in split_commands(example.code):
            if needs_more_than_a_cpu(command):
                check_without_running(command, env, workdir)
                checked += 1
            else:
                run(["bash", "-c", shortened(command)], env, workdir, command)
                ran += 1
    # The walk-through's products are where the README says.
    assert (workdir / "phonetune-demo" / "test_metrics.json").is_file()
    assert (workdir / "my-model" / "config.json").is_file()
    assert (workdir / "test_metrics.json").is_file() and (workdir / "zs.json").is_file()
    assert ran >= 15 and checked >= 5, (ran, checked)
