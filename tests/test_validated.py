"""`phonetune prepare --splits validated`: speaker- and sentence-disjoint train/dev/test from
validated.tsv, counted like the official splits."""

import csv
import shutil
from pathlib import Path

import pytest
from datasets import load_from_disk

from phonetune.cli import main
from phonetune.data.commonvoice import Clip
from phonetune.data.errors import PhonetuneError
from phonetune.data.prepare import PrepareOptions, prepare
from phonetune.data.validated import split_validated


def clips_of(speakers, sentence=lambda speaker, i: f"{speaker} says {i}"):
    """{speaker: clip count} -> Clips of the validated split."""
    return [
        Clip("en", "validated", f"{s}_{i}.mp3", sentence(s, i), s, Path(f"/c/{s}_{i}.mp3"))
        for s, count in speakers.items()
        for i in range(count)
    ]


def test_speakers_are_disjoint_and_sizes_follow_the_fractions():
    speakers = {f"s{n}": 1 + n % 7 for n in range(120)} | {"prolific": 200, "": 15}
    clips = clips_of(speakers)
    kept, rejected = split_validated(clips, dev_fraction=0.1, test_fraction=0.15)
    assert rejected == []  # every sentence is different
    split_of = {}
    for clip in kept:
        assert split_of.setdefault(clip.client_id, clip.split) == clip.split, clip.client_id
    assert split_of["prolific"] == "train" and split_of[""] == "train"
    counts = {s: sum(c.split == s for c in kept) for s in ("train", "dev", "test")}
    # Whole speakers of up to 7 clips fill each held-out split to at most its target and within
    # one speaker's clips of it.
    for split, fraction in (("dev", 0.1), ("test", 0.15)):
        target = round(fraction * len(clips))
        assert target - 7 < counts[split] <= target, (split, counts)
    assert sum(counts.values()) == len(clips)


def test_the_split_does_not_depend_on_row_order():
    clips = clips_of({f"s{n}": 1 + n % 3 for n in range(60)})
    first, _ = split_validated(clips, 0.2, 0.2)
    second, _ = split_validated(list(reversed(clips)), 0.2, 0.2)
    assert {(c.path, c.split) for c in first} == {(c.path, c.split) for c in second}


def test_train_never_shares_a_sentence_with_dev_or_test():
    # Every sentence is read by three speakers (as Common Voice sentences often are).
    clips = clips_of(
        {f"s{n}": 4 for n in range(60)}, sentence=lambda s, i: f"Sentence {(int(s[1:]) + i) % 20}."
    )
    kept, rejected = split_validated(clips, 0.1, 0.1)
    by_split = {
        s: {c.sentence.casefold() for c in kept if c.split == s} for s in ("train", "dev", "test")
    }
    assert not by_split["train"] & (by_split["dev"] | by_split["test"])
    assert not by_split["dev"] & by_split["test"]
    assert len(kept) + len(rejected) == len(clips)
    assert {r.reason for r in rejected} <= {"sentence_in_held_out", "sentence_in_test"}
    assert all(r.split in ("train", "dev") for r in rejected)


def test_prepare_from_validated_tsv(cv_corpus, tmp_path):
    """One locale of the shared corpus, with a few sentences also read by other speakers."""
    root = tmp_path / "cv"
    shutil.copytree(cv_corpus / "fr", root / "fr")
    tsv = root / "fr" / "validated.tsv"
    with open(tsv, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row, other in zip(rows[:8], rows[8:16], strict=True):
        row["sentence"] = other["sentence"]
    with open(tsv, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, rows[0].keys(), delimiter="\t", quoting=csv.QUOTE_NONE)
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "prep"
    options = PrepareOptions(
        root, ["fr"], out, splits=("validated",), dev_fraction=0.2, test_fraction=0.2
    )
    report = prepare(options)

    totals = report["totals"]
    assert totals["read"] == len(rows) == totals["kept"] + totals["rejected"]
    splits = report["per_locale"]["fr"]["splits"]
    assert set(splits) <= {"train", "dev", "test", "validated"} and "test" in splits
    assert sum(s["read"] for s in splits.values()) == len(rows)
    dataset = load_from_disk(str(out))
    speakers = {s: set(dataset[s]["client_id"]) for s in ("train", "dev", "test")}
    assert not speakers["train"] & (speakers["dev"] | speakers["test"])
    assert not speakers["dev"] & speakers["test"]
    sentence_of = {f"fr/clips/{row['path']}": row["sentence"].casefold() for row in rows}
    sentences = {s: {sentence_of[p] for p in dataset[s]["path"]} for s in ("train", "dev", "test")}
    assert not sentences["train"] & (sentences["dev"] | sentences["test"])
    for split in ("train", "dev", "test"):
        assert splits[split]["kept"] == len(dataset[split])
    assert report["settings"]["splits"] == ["validated"]
    assert report["settings"]["dev_fraction"] == 0.2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--splits", "validated,train"], "give it alone"),
        (
            ["--splits", "validated", "--dev-fraction", "0.6", "--test-fraction", "0.5"],
            "leave some",
        ),
        (["--splits", "everything"], "unknown split"),
    ],
)
def test_bad_split_options_are_clear_errors(cv_corpus, tmp_path, capsys, argv, message):
    code = main(
        [
            "prepare",
            "--cv-root",
            str(cv_corpus),
            "--locales",
            "fr",
            "--out",
            str(tmp_path / "p"),
            *argv,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_validated_needs_validated_tsv(cv_corpus, tmp_path):
    root = tmp_path / "cv"
    shutil.copytree(cv_corpus / "fr", root / "fr")
    (root / "fr" / "validated.tsv").unlink()
    with pytest.raises(PhonetuneError, match="validated.tsv"):
        prepare(PrepareOptions(root, ["fr"], tmp_path / "p", splits=("validated",)))
