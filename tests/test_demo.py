"""A short `phonetune demo` run end to end: every stage leaves its files in --out."""

import json

from phonetune.cli import main


def test_short_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out", str(out),
            "--locales", "en,ru",
            "--clips-per-locale", "12",
            "--max-steps", "4",
            "train.eval_steps=2",
            "train.save_steps=2",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "6/6 transcribe" in printed and "test PER" in printed
    metrics = json.loads((out / "test_metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["per_locale"]) == {"en", "ru"}
    fields = {"per", "substitutions", "deletions", "insertions", "ref_phones", "utterances"}
    assert fields <= set(metrics["overall"])
    assert metrics["overall"]["utterances"] == sum(
        m["utterances"] for m in metrics["per_locale"].values()
    )
    for path in ["corpus/en/test.tsv", "prepared/vocab.json", "prepared/prep_report.json",
                 "run/metrics.jsonl", "run/checkpoints/step_4/state.json",
                 "export/model.safetensors", "export/preprocessor_config.json"]:  # fmt: skip
        assert (out / path).is_file(), path
    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    assert summary["test_per"] == metrics["overall"]["per"]
    # A model that says nothing yet gets a word on why, and on how to continue the demo.
    overall = metrics["overall"]
    blank = overall["deletions"] == overall["ref_phones"] and not overall["insertions"]
    assert ("outputs only blanks" in printed) == blank
    assert ("`phonetune demo --max-steps N` continues" in printed) == blank
