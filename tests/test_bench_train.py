"""scripts/bench_train.py: the three-way training benchmark runs end to end, keeps its contract."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train.py"
CONTRACT = (
    "phonetune_audio_s_per_s",
    "reference_audio_s_per_s",
    "limit_audio_s_per_s",
    "padding_fraction",
)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three worker processes (phonetune, the Trainer recipe, the limit)
def test_shortest_run_reports_all_contenders_and_writes_its_section(prepared_dir, tmp_path):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## Data stage\n\nkept\n\n## The demo\n\nkept too\n")
    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--prepared-dir",
            str(prepared_dir),
            "--rounds",
            "1",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--work-dir",
            str(tmp_path / "work"),
            "--benchmarks-md",
            str(benchmarks),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    for key in CONTRACT:
        assert key in result
    for key in CONTRACT[:3]:
        assert result[key] > 0
    assert 0 <= result["padding_fraction"] < 1
    # The limit replayed exactly phonetune's batches (the harness fails otherwise), so both trained
    # on the same audio; the reference trained on at least as much.
    audio = result["audio_s_per_contender"]
    assert audio["exact"] == audio["padded"] == audio["phonetune"] > 0
    assert audio["reference"] >= audio["phonetune"]
    assert result["limit_audio_s_per_s"] == max(
        result["limit_exact_audio_s_per_s"], result["limit_padded_audio_s_per_s"]
    )
    assert result["reference_batch_size"] >= 1
    assert all(peak["peak_rss_mb"] > 0 for peak in result["peak_memory"].values())
    text = benchmarks.read_text()
    assert text.count("## Training: `scripts/bench_train.py`") == 1
    assert "kept\n" in text and "kept too" in text
    assert text.index("## Training") < text.index("## The demo")


def test_rewriting_replaces_the_training_section_only(tmp_path):
    bench = load_bench()
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n\n## Data stage\n\nA\n\n## The demo\n\nD\n")
    bench.write_benchmarks(path, f"{bench.BENCHMARKS_HEADING} (first)\n\nold\n")
    bench.write_benchmarks(path, f"{bench.BENCHMARKS_HEADING} (second)\n\nnew\n")
    text = path.read_text()
    assert "old" not in text and "new" in text
    assert text.index("## Data stage") < text.index("(second)") < text.index("## The demo")
    assert text.endswith("## The demo\n\nD\n")
