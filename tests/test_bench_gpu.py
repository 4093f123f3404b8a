"""scripts/bench_gpu.py: the GPU benchmark's pieces run (on the CPU here, with a tiny model)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def synthetic_tiny_config(folder, clips, *overrides):
    """The tiny CPU recipe on the benchmark's synthetic corpus of `clips` clips of 2-3 s."""
    from phonetune.train.config import load_config

    prepared = load_bench().write_synthetic_prepared(folder / "prep", clips, 0, 2.0, 3.0)
    settings = [f"data.prepared_dir={prepared}", f"run.output_dir={folder / 'run'}"]
    return load_config(
        REPO / "configs" / "tiny_cpu.yaml", [*settings, "data.locales=null", *overrides]
    )


def test_synthetic_corpus_is_a_prepared_dataset_training_can_read(tmp_path):
    from phonetune.train.batching import load_training_data

    config = synthetic_tiny_config(tmp_path, 30)
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
    """train.mixed_precision=bf16-weights is measured as it trains: the model's weights in bf16."""
    options = ["--budgets", "12", "--flop-steps", "0", "train.mixed_precision=bf16-weights"]
    result = run_tiny_bench(tmp_path / "out", *options)
    assert result["weights_dtype"] == "bfloat16" and result["mixed_precision"] == "bf16-weights"
    assert result["budgets"][0]["audio_s_per_s"] > 0


# --- --width-table: a budget by batch width ---------------------------------------------------------
def stub_fits(width, limit):
    """A `fits` for the search: a step fits when clips x width^2 <= limit (attention's growth)."""
    return lambda clips: (
        clips * width**2 <= limit,
        {"clips": clips, "fits": clips * width**2 <= limit},
    )


@pytest.mark.parametrize("start", [1, 40, 5000])  # doubling up to the boundary, or halving down
@pytest.mark.parametrize("tolerance", [0.05, 0.0])
def test_search_brackets_the_boundary_within_its_tolerance(start, tolerance):
    bench = load_bench()
    # 4 s clips, clips x 16 <= 10000: 625 clips fit, 626 do not
    found = bench.search_largest(stub_fits(4, 10_000), start, 10**6, tolerance=tolerance)
    good, bad = found["largest_fitting"], found["smallest_failing"]
    assert good <= 625 < bad
    # the bisection stops once the bracket is within the tolerance of the fitting value, or 1
    assert bad - good <= max(tolerance * good, 1)
    if tolerance == 0:
        assert (good, bad) == (625, 626)
    assert [t["fits"] for t in found["trials"]] == [t["clips"] <= 625 for t in found["trials"]]


def test_search_stops_at_its_bounds():
    bench = load_bench()
    nothing = bench.search_largest(lambda n: (False, {"n": n}), 40, 1000, lowest=3)
    # halved from 40 down to the lowest value: 40, 20, 10, 5 (round(2.5) = 2 < 3 is not tried)
    assert [t["n"] for t in nothing["trials"]] == [40, 20, 10, 5]
    assert nothing["largest_fitting"] is None and nothing["smallest_failing"] == 5
    everything = bench.search_largest(lambda n: (True, {"n": n}), 3, 100)
    assert [t["n"] for t in everything["trials"]] == [3, 6, 12, 24, 48, 96]
    assert everything["largest_fitting"] == 96 and everything["smallest_failing"] is None


def measurement(width, clips, peak=70.0):
    """A width's record as `width_record` makes it (samples: the width on the 0.1 s grid)."""
    samples = round(width * 16_000)
    return {
        "width": width,
        "samples": samples,
        "clips": clips,
        "seconds": clips * samples / 16_000 if clips else None,
        "peak_allocated_gib": peak if clips else None,
        "peak_reserved_gib": peak + 5 if clips else None,
    }


MEASURED = [measurement(8, 40), measurement(2, 300), measurement(3.3, 161), measurement(4, 130)]
# 0.9 x (300 x 2, 161 x 3.3, 130 x 4, 40 x 8) = 540, 478.17 (rounded down: 478.1), 468, 288
TABLE = {2: 540, 3.3: 478.1, 4: 468, 8: 288}


def test_budget_table_is_the_margin_of_what_fitted_sorted_by_width():
    bench = load_bench()
    table = bench.budget_table(MEASURED, 0.9, batch_seconds=80, max_duration=8)
    assert table["batch_seconds_by_width"] == TABLE
    assert list(table["batch_seconds_by_width"]) == [2, 3.3, 4, 8]
    assert [row["width"] for row in table["rows"]] == [2, 3.3, 4, 8]
    assert table["notes"] == []  # 80 s <= 288 s, and no clip is wider than 8 s
    assert table["override"] == "train.batch_seconds_by_width={2: 540, 3.3: 478.1, 4: 468, 8: 288}"
    halved = bench.budget_table(MEASURED, 0.5, batch_seconds=80)["batch_seconds_by_width"]
    assert halved == {2: 300, 3.3: 265.6, 4: 260, 8: 160}  # 531.3 / 2 = 265.65, rounded down


def test_budget_table_notes_what_it_does_not_cover():
    bench = load_bench()
    measured = [*MEASURED, measurement(16, 1), measurement(30, None)]
    table = bench.budget_table(measured, 0.9, batch_seconds=300, max_duration=20)
    # one 16 s clip: 0.9 x 16 s holds no clip of 16 s; no 30 s clip fitted at all
    assert table["batch_seconds_by_width"] == TABLE
    assert [row["budget"] for row in table["rows"]][-2:] == [None, None]
    notes = "\n".join(table["notes"])
    assert "16 s: 1 clip(s) fitted" in notes and "30 s: no clip(s) fitted" in notes
    assert (
        "train.batch_seconds (300 s) is larger than the budget of the widest width (288 s" in notes
    )
    assert "data.max_duration (20 s)" in notes and "add 20 to --width-table" in notes
    empty = bench.budget_table([measurement(4, None)], 0.9, batch_seconds=80)
    assert empty["batch_seconds_by_width"] == {} and empty["override"].endswith("=null")


@pytest.mark.parametrize("recipe", ["xlsr53_espeak_cv.yaml", "tiny_cpu.yaml"])
def test_width_table_loads_back_through_the_config(recipe, tmp_path):
    from phonetune.train.config import load_config

    bench = load_bench()
    table = bench.budget_table(MEASURED, 0.9, batch_seconds=80)
    written = tmp_path / "width_table.yaml"
    bench.write_width_yaml(table, written, "a test")
    places = [f"data.prepared_dir={tmp_path}", f"run.output_dir={tmp_path / 'run'}"]
    # the override the script prints
    config = load_config(REPO / "configs" / recipe, [*places, table["override"]])
    assert config.train.batch_seconds_by_width == TABLE
    # the YAML file merged into the recipe's train: section
    raw = yaml.safe_load((REPO / "configs" / recipe).read_text())
    raw["train"].update(yaml.safe_load(written.read_text())["train"])
    merged = tmp_path / "merged.yaml"
    merged.write_text(yaml.safe_dump(raw))
    assert load_config(merged, places).train.batch_seconds_by_width == TABLE


def test_benchmarks_section_shows_the_width_table():
    bench = load_bench()
    table = bench.budget_table(MEASURED, 0.9, batch_seconds=300)
    result = {
        "machine": {"gpu": "NVIDIA H100", "cpu_count": 16, "torch": "2", "transformers": "5"},
        "parameters": {"total": 315e6, "trainable": 311e6},
        "config": "configs/xlsr53_espeak_cv.yaml",
        "mixed_precision": "bf16",
        "budgets": [],
        "memory_limit_gib": 40,
        "label": "h100",
        "width_table": {"measured": MEASURED, **table},
    }
    text = bench.markdown_section([result])
    assert "h100, batch budget by width (`--width-table`, memory limit 40 GiB)" in text
    assert "| 2 | 300 | 600 | 540 | 70.0 / 75.0 |" in text
    assert "| 3.3 | 161 | 531.3 | 478.1 | 70.0 / 75.0 |" in text
    assert "| 8 | 40 | 320 | 288 | 70.0 / 75.0 |" in text
    # quoted for a shell: the flow mapping has spaces and braces
    assert f"As an override: `'{table['override']}'`." in text
    assert "Note: train.batch_seconds (300 s) is larger" in text


def test_width_table_refuses_to_run_without_a_gpu(tmp_path, monkeypatch, capsys):
    import torch

    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert bench.main(["--out", str(out), "--width-table", "2,4"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--width-table needs a CUDA GPU" in error
    assert not out.exists()  # refused before any work
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(["--help"])
    assert exited.value.code == 0
    assert "--width-table W1,W2,..." in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The benchmark's training pieces on the tiny CPU recipe, widths on a 0.1 s grid, LayerDrop on."""

    bench = load_bench()
    folder = tmp_path_factory.mktemp("tiny_bench")
    config = synthetic_tiny_config(
        folder, 12, "train.pad_to_multiple_of=1600", "model.layerdrop=0.5"
    )
    return bench, bench.Bench(config)


def test_width_search_runs_real_steps_on_batches_of_the_width(tiny_bench, monkeypatch):
    """On the CPU nothing runs out of memory: the search doubles up to its limit, every step a real
    training step on a batch as the sampler pads it, with every layer run."""
    bench, runner = tiny_bench
    runner.shapes_seen.clear()
    model = runner.parallel.unwrap(runner.module)
    layer_draws = model._layer_rng.getstate()
    # 0.55 s on the 0.1 s grid: batches of that entry are at most 0.5 s (8000 samples) wide; a
    # limit of 4 clips (what 4 x 8000 float32 samples take) stops the doubling after 1, 2, 4.
    record = runner.largest_clips(0.55, 1, 4 * 8000 * 4)
    assert record["samples"] == 8000 and record["clips"] == 4 and record["seconds"] == 2.0
    assert record["smallest_failing_clips"] is None
    assert runner.shapes_seen == {(1, 8000), (2, 8000), (4, 8000)}
    # the corpus has int(12 x duration) phones per clip of 2-3 s: 11.5 to 12 a second, 6 in 0.5 s
    assert record["phones_per_clip"] == 6
    # LayerDrop was off for the steps (no draw), and is back on after them
    assert model._layer_rng.getstate() == layer_draws and model.model.config.layerdrop == 0.5

    batch = bench.synthetic_batch(3, 8000, 6, [7, 9])
    assert batch.labels.shape == (3, 6) and set(batch.labels.unique().tolist()) == {7, 9}
    # normalised noise: 24000 samples put the mean within 0.05 (7 standard errors) of 0
    assert abs(float(batch.input_values.mean())) < 0.05
    assert abs(float(batch.input_values.std()) - 1) < 0.05

    # the budget search, on a stub: it halves down to the longest clip (2-3 s), no further
    monkeypatch.setattr(runner, "fits", lambda b: (False, {"batch_seconds": b, "fits": False}))
    largest = runner.largest_budget(160, 1000)
    assert [t["batch_seconds"] for t in largest["trials"]] == [160, 80, 40, 20, 10, 5]
    assert largest["largest_fitting_batch_seconds"] is None


def test_width_phase_writes_a_table_the_config_loads(tiny_bench, tmp_path, capsys):
    """The whole --width-table phase on the CPU, its memory limit standing in for the card's."""
    import argparse
    import shlex

    from phonetune.train.config import load_config

    bench, runner = tiny_bench
    args = argparse.Namespace(width_table=[0.5, 1.0], width_margin=0.9, out=tmp_path)
    # 2^18 bytes: the fp32 audio of 8 clips of 0.5 s (32000 bytes each) or 4 of 1 s, the limits
    # of the doubling; the search starts at min(160 s / 0.5 s, 8) clips, then at 4 s / 1 s.
    result = {"memory_limit_gib": 2**-12, "machine": {"gpu": "CPU"}, "command": "a test"}
    saved = []
    bench.write_width_table(runner, args, runner.config, result, lambda: saved.append(1))
    measured = result["width_table"]["measured"]
    assert [(r["width"], r["clips"], r["seconds"]) for r in measured] == [
        (0.5, 8, 4.0),
        (1.0, 4, 4.0),
    ]
    assert len(saved) == 3  # after each width, and with the table
    table = {0.5: 3.6, 1.0: 3.6}  # 0.9 x 4 s
    assert result["width_table"]["batch_seconds_by_width"] == table
    notes = result["width_table"]["notes"]  # the tiny recipe: 20 s budgets, clips up to 12 s
    assert len(notes) == 2 and "(20 s) is larger" in notes[0] and "(12 s)" in notes[1]
    printed = capsys.readouterr().out
    assert f"  {shlex.quote(result['width_table']['override'])}\n" in printed
    merged = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    merged["train"].update(yaml.safe_load((tmp_path / "width_table.yaml").read_text())["train"])
    (tmp_path / "merged.yaml").write_text(yaml.safe_dump(merged))
    config = load_config(
        tmp_path / "merged.yaml",
        [f"data.prepared_dir={tmp_path}", f"run.output_dir={tmp_path / 'run'}"],
    )
    assert config.train.batch_seconds_by_width == table


@pytest.mark.slow  # two benchmark runs of the tiny model
def test_the_prepared_gpu_measurements_rehearse_on_a_cpu(tmp_path):
    """scripts/gpu_issue15.sh, whose parts wait for a session with a GPU, still runs: its graphs
    part (eager and CUDA graphs on a 0.25 s grid, with bf16 weights and the Triton CTC, here in
    Triton's interpreter), the model made tiny and the profile small."""
    import os

    rehearsal = (
        "--config configs/tiny_cpu.yaml --architecture= --clips 40 --budgets 12 --warmup 2 "
        "--steps 2 --profile-budget 12"
    )
    env = {
        **os.environ,
        "GPU_ISSUE15_OPTIONS": rehearsal,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_issue15.sh"), "graphs", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, label in (("grid_eager", "eager"), ("grid_graphs", "CUDA graphs")):
        result = json.loads((tmp_path / name / "bench_gpu.json").read_text())
        assert result["label"].endswith(label) and result["mixed_precision"] == "bf16-weights"
        assert "train.ctc_implementation=triton" in result["overrides"]
        assert result["budgets"][0]["audio_s_per_s"] > 0
