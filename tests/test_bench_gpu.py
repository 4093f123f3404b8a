"""scripts/bench_gpu.py: the GPU benchmark's pieces run (on the CPU here, with a tiny model)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tiny_bench(out, *options):
    """bench_gpu.py on the tiny CPU recipe (2 timed steps after 1, no harness); its JSON."""
    completed = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--out", str(out),
            "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--architecture", "",
            "--steps", "2", "--warmup", "1", "--clips", "40", "--harness-rounds", "0", *options,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "bench_gpu.json").read_text())
    return result


@pytest.mark.slow
def test_sweep_measures_throughput_flops_and_writes_its_section(tmp_path):
    out = tmp_path / "out"
    result = run_tiny_bench(
        out,
        "--budgets", "12,24", "--flop-steps", "1", "--profile-budget", "12", "--label", "tiny",
        "train.pad_to_multiple_of=1600",
    )  # fmt: skip
    assert [r["batch_seconds"] for r in result["budgets"]] == [12, 24]
    flops = [r["model_flop_per_padded_s"] for r in result["budgets"]]
    for record in result["budgets"]:
        assert record["audio_s_per_s"] > 0 and record["audio_s"] > 0
        # rounded to 0.1 s (1600 samples) per batch: some padding, never most of the batch
        assert 0 < record["padding_fraction"] < 0.5
    # FLOPs per second of padded audio are a property of the model, whatever the batch size (up to
    # attention, whose share of a tiny model's work grows a little with the clip length)
    assert min(flops) > 0 and max(flops) / min(flops) < 1.2
    assert all(
        r["model_flop_per_audio_s"] >= r["model_flop_per_padded_s"] for r in result["budgets"]
    )
    assert result["parameters"]["total"] > result["parameters"]["trainable"] > 0
    assert "largest" not in result  # the memory search needs CUDA
    profiled = result["profile"]  # on a CPU: host time, launches and syncs are CUDA's, so none
    assert profiled["steps"] == 4 and profiled["wall_s_per_step"] > 0
    assert profiled["host_syncs_per_step"] == 0 and (out / "profile.txt").is_file()

    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## Data stage\n\nkept\n\n## The demo\n\nkept too\n")
    for _ in range(2):  # appended the first time, replaced the second
        subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--write-section",
                str(out / "bench_gpu.json"),
                f"again={out / 'bench_gpu.json'}",
                "--benchmarks-md",
                str(benchmarks),
            ],
            check=True,
            capture_output=True,
        )
    text = benchmarks.read_text()
    assert text.count("## GPU: `scripts/bench_gpu.py`") == 1
    assert "| tiny | 24 |" in text and "| again | 24 |" in text  # both runs in one table
    assert "kept\n" in text and "kept too\n" in text


def test_synthetic_corpus_is_a_prepared_dataset_training_can_read(tmp_path):
    from phonetune.train.batching import load_training_data
    from phonetune.train.config import load_config

    bench = load_bench()
    prepared = bench.write_synthetic_prepared(tmp_path / "prep", 30, 0, 2.0, 3.0)
    config = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            f"data.prepared_dir={prepared}",
            f"run.output_dir={tmp_path / 'run'}",
            "data.locales=null",
        ],
    )
    data = load_training_data(config)
    assert len(data.vocab) == 392 and len(data.train_rows) == 30
    durations = data.train.durations[data.train_rows]
    assert durations.min() >= 2.0 and durations.max() <= 3.0
    assert len(data.eval_rows) == 4


def test_datasheet_rates_tell_pcie_from_sxm():
    bench = load_bench()
    assert bench.datasheet_rate("NVIDIA H100 PCIe") == 756e12
    assert bench.datasheet_rate("NVIDIA H100 80GB HBM3") == bench.datasheet_rate("NVIDIA H200")
    assert bench.datasheet_rate("Some Other GPU") is None


@pytest.mark.slow
def test_bf16_weights_run_trains_the_model_in_bf16_without_autocast(tmp_path):
    """--weights-dtype bf16 measures a step without autocast's weight casts: the whole model in bf16."""
    result = run_tiny_bench(
        tmp_path / "out", "--budgets", "12", "--flop-steps", "0", "--weights-dtype", "bf16"
    )
    assert result["weights_dtype"] == "bfloat16" and result["mixed_precision"] == "no"
    assert result["budgets"][0]["audio_s_per_s"] > 0
