"""Per-locale prepare runs + `phonetune merge` = one prepare run over every locale."""

import json
import os
import shutil
from pathlib import Path

import pytest
from datasets import load_from_disk
from helpers import FAST, MICRO, TEST_LOCALES, TINY, read_metrics

from phonetune.data.errors import PhonetuneError
from phonetune.data.merge import merge
from phonetune.data.prepare import PrepareOptions, prepare

# Three jobs, as a cluster would run them: one with two locales, two with one each.
GROUPS = [["en", "fr"], ["ru"], ["zh-CN"]]


@pytest.fixture(scope="module")
def per_locale_dirs(cv_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("per_locale")
    dirs = []
    for group in GROUPS:
        out = root / "-".join(group)
        prepare(PrepareOptions(cv_root=cv_corpus, locales=group, out=out))
        dirs.append(out)
    return dirs


@pytest.fixture(scope="module")
def merged(per_locale_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "prep"
    return merge(out, per_locale_dirs), out


def _report(path):
    return json.loads((Path(path) / "prep_report.json").read_text(encoding="utf-8"))


def test_merge_gives_the_vocab_rows_and_totals_of_one_run(merged, prepared_dir):
    """`prepared_dir` is one prepare run over TEST_LOCALES, the order GROUPS are merged in."""
    assert [loc for group in GROUPS for loc in group] == TEST_LOCALES
    report, out = merged
    assert (out / "vocab.json").read_bytes() == (prepared_dir / "vocab.json").read_bytes()
    one, many = load_from_disk(str(prepared_dir)), load_from_disk(str(out))
    assert set(one) == set(many) == {"train", "dev", "test"}
    for split in one:
        # Every column of every row, in the same order (audio samples included).
        assert many[split].data.table.equals(one[split].data.table), split
    single = _report(prepared_dir)
    assert report == _report(out)
    for key in ("read", "kept", "rejected", "rejected_by_reason"):
        assert report["totals"][key] == single["totals"][key], key
    assert report["totals"]["hours_kept"] == pytest.approx(
        single["totals"]["hours_kept"], abs=1e-4 * len(GROUPS)
    )
    totals = report["totals"]
    assert totals["read"] == totals["kept"] + totals["rejected"]
    assert totals["kept"] == sum(len(many[split]) for split in many)
    assert totals["rejected"] == len(report["rejected"])
    assert report["per_locale"] == single["per_locale"]
    assert list(report["per_locale"]) == TEST_LOCALES
    assert sorted(map(json.dumps, report["rejected"])) == sorted(
        map(json.dumps, single["rejected"])
    )
    assert report["vocab"] == single["vocab"]
    assert report["versions"] == single["versions"]
    assert report["settings"]["locales"] == TEST_LOCALES


def test_arrow_files_are_hard_links_to_the_inputs(merged, per_locale_dirs):
    report, out = merged
    state = json.loads((out / "train" / "state.json").read_text(encoding="utf-8"))
    first = out / "train" / state["_data_files"][0]["filename"]
    source = per_locale_dirs[0] / "train" / "data-00000-of-00002.arrow"  # en's train shard
    assert first.samefile(source)
    linked = sum(
        len(list((d / s).glob("*.arrow")))
        for d in per_locale_dirs
        for s in report["settings"]["splits"]
    )
    assert report["merge"] == {"files_linked": linked, "files_copied": 0}


def test_merged_dataset_trains(merged, tmp_path):
    from phonetune.cli import main

    _, out = merged
    run = tmp_path / "run"
    steps = ["train.max_steps=2", "train.eval_steps=2", "train.save_steps=2"]
    args = ["train", "--config", str(TINY), f"data.prepared_dir={out}", f"run.output_dir={run}"]
    assert main([*args, *FAST, *MICRO, *steps]) == 0
    losses, evals = read_metrics(run)
    assert [r["step"] for r in losses] == [1, 2]
    assert set(evals[-1]["eval_per_locale"]) == set(TEST_LOCALES)


def _copy_with_report(source, target, change):
    """A hard-linked copy of a prepared folder whose report `change` edits."""
    shutil.copytree(source, target, copy_function=os.link)
    path = target / "prep_report.json"
    report = json.loads(path.read_text(encoding="utf-8"))
    change(report)
    path.unlink()  # a new file: the original is a hard link of the same inode
    path.write_text(json.dumps(report), encoding="utf-8")
    return target


def test_merge_refuses_incompatible_inputs(per_locale_dirs, prepared_dir, tmp_path):
    en_fr, ru, zh = per_locale_dirs
    with pytest.raises(PhonetuneError, match=r"locale en is in .*Each locale must come from one"):
        merge(tmp_path / "a", [en_fr, prepared_dir])

    def other_espeak(report):
        report["versions"]["espeak_ng"] = "1.51"

    def other_duration(report):
        report["settings"]["max_duration"] = 30.0

    def given_vocab(report):
        report["vocab"]["source"] = "my_vocab.json"

    for change, message in [
        (other_espeak, r"espeak_ng versions differ \(.*: 1\.51"),
        (other_duration, r"setting max_duration differs"),
        (given_vocab, r"others were given one with --vocab"),
    ]:
        odd = _copy_with_report(ru, tmp_path / change.__name__, change)
        with pytest.raises(PhonetuneError, match=message):
            merge(tmp_path / "out", [en_fr, odd])
        assert not (tmp_path / "out").exists()  # nothing written before the checks pass

    def lost_clip(report):
        report["per_locale"]["ru"]["splits"]["train"]["kept"] -= 1

    odd = _copy_with_report(ru, tmp_path / "lost", lost_clip)
    with pytest.raises(PhonetuneError, match=r"report counts .* but its dataset holds"):
        merge(tmp_path / "out", [en_fr, odd])
    old = _copy_with_report(ru, tmp_path / "old", lambda report: report.pop("shards"))
    with pytest.raises(
        PhonetuneError, match=r"not a report of this phonetune's prepare \(missing: shards"
    ):
        merge(tmp_path / "out", [en_fr, old])
    broken = _copy_with_report(ru, tmp_path / "broken", lambda report: None)
    next((broken / "train").glob("*.arrow")).unlink()
    with pytest.raises(PhonetuneError, match=r"cannot read .*\.arrow"):
        merge(tmp_path / "out", [en_fr, broken])
    with pytest.raises(PhonetuneError, match="OUT_DIR .* already holds a dataset"):
        merge(prepared_dir, [zh])
    with pytest.raises(PhonetuneError, match="not a finished prepared dataset"):
        merge(tmp_path / "out", [en_fr, tmp_path])


def test_cli_merges_and_reports_errors_without_traceback(per_locale_dirs, tmp_path, capsys):
    from phonetune.cli import main

    en_fr, ru, _ = per_locale_dirs
    assert main(["merge", str(tmp_path / "m"), str(en_fr), str(ru)]) == 0
    printed = capsys.readouterr().out
    assert "read 90 clips" in printed and "hard-linked" in printed
    assert main(["merge", str(tmp_path / "m2"), str(en_fr), str(en_fr)]) == 2
    err = capsys.readouterr().err
    assert "given twice" in err and "Traceback" not in err
