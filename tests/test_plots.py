"""`phonetune report RUN`: PNG plots and one HTML page from a run's metrics.jsonl, at any time."""

from helpers import FAST, MICRO

from phonetune.cli import main


def test_report_draws_the_curves_of_a_running_run(prepared_dir, tmp_path, capsys):
    run = tmp_path / "run"
    settings = [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run}", *MICRO, *FAST]
    assert (
        main(
            ["train", "--config", "tiny_cpu", *settings, "train.max_steps=4", "train.eval_steps=2"]
        )
        == 0
    )
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 5, "lo')  # a line being written by the running run
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = run / "report"
    names = ["loss", "learning_rate", "dev_per", "blank_fraction", "throughput", "locale_seconds"]
    for name in names:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (out / "index.html").read_text()
    assert all(f'src="{name}.png"' in page for name in names)
    assert (
        "best checkpoint: step_" in page and "1 line(s) of metrics.jsonl could not be read" in page
    )
    assert "Last evaluation (step 4)" in page
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
