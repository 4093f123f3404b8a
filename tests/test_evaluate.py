"""`phonetune evaluate`: PER per locale and overall, computed by hand where it can be, and the same
whatever the batching; plus the inference helpers evaluate shares with export and transcribe."""

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    VOCAB,
    constant_model,
    normalisation_tolerance,
    speech,
    write_checkpoint,
    write_prepared,
)
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

from phonetune.cli import main
from phonetune.data.errors import PhonetuneError
from phonetune.data.per import score_predictions
from phonetune.data.prepared import batches_longest_first
from phonetune.data.vocab import SPECIAL_TOKENS
from phonetune.infer.evaluate import evaluate_model
from phonetune.infer.export import export_model
from phonetune.infer.recognize import normalize_batch

FIELDS = {"per", "substitutions", "deletions", "insertions", "ref_phones", "utterances"}

# Test references, and what a model that always says "aɪ" scores on each (worked out by hand):
REFERENCES = [
    ("en", "aɪ tʃ aɪ", "she sells sea shells"),  # 2 deletions
    ("en", "n ə", "the cat sat on the mat"),  # 1 substitution + 1 deletion
    ("en", "s t aɪ", "one two three four five six"),  # 2 deletions
    ("fr", "ʁ ɛ", "bonjour mes amis"),  # 1 substitution + 1 deletion
    ("fr", "aɪ", "merci"),  # correct
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rows = [
        {
            "audio": speech(text, "en-us" if locale == "en" else "fr-fr"),
            "phones": phones,
            "locale": locale,
            "split": "test",
        }
        for locale, phones, text in REFERENCES
    ]
    rows.append(
        {"audio": speech("good morning"), "phones": "ɡ ʊ d", "locale": "en", "split": "dev"}
    )
    return write_prepared(tmp_path_factory.mktemp("prepared") / "prep", rows)


@pytest.fixture(scope="module")
def constant_run(tmp_path_factory, prepared):
    """A checkpoint whose every frame says "aɪ": its PER is known without running it."""
    run = tmp_path_factory.mktemp("constant") / "run"
    write_checkpoint(run, 7, constant_model("aɪ"), prepared_dir=prepared)
    return run


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, prepared):
    run = tmp_path_factory.mktemp("random") / "run"
    write_checkpoint(run, 3, seed=3, prepared_dir=prepared)
    return run


# --- the metric itself ------------------------------------------------------------------------
def test_per_by_hand():
    scores = score_predictions(
        predictions=["a b c", "x", "aɪ tʃ z", "p q"],
        references=["a b d e", "x y", "a ɪ tʃ", "p"],
        locales=["en", "en", "fr", "de"],
    )
    # en: "a b d e" -> "a b c": d->c substituted, e deleted; "x y" -> "x": y deleted.
    assert scores["per_locale"]["en"] == {
        "per": 3 / 6,
        "substitutions": 1,
        "deletions": 2,
        "insertions": 0,
        "ref_phones": 6,
        "utterances": 2,
    }
    # fr: tokens, not characters: "a ɪ tʃ" -> "aɪ tʃ z" is 1 substitution (a->aɪ), 1 deletion (ɪ)
    # and 1 insertion (z), or an equivalent 3-edit alignment: 3 errors over 3 reference phones.
    fr = scores["per_locale"]["fr"]
    assert fr["substitutions"] + fr["deletions"] + fr["insertions"] == 3 and fr["per"] == 1.0
    # de: "p" -> "p q": one insertion.
    assert (
        scores["per_locale"]["de"]["insertions"] == 1 and scores["per_locale"]["de"]["per"] == 1.0
    )
    # Micro-average: all errors over all reference phones, not the mean of the locale rates.
    assert scores["overall"]["per"] == pytest.approx((3 + 3 + 1) / (6 + 3 + 1))
    assert scores["overall"]["utterances"] == 4


# --- helpers shared with export and transcribe ------------------------------------------------
def test_normalize_batch_matches_the_feature_extractor():
    waves = [speech("hello there"), speech("hi"), 0.3 * speech("good evening", "fr-fr")]
    batch = normalize_batch(waves, uses_attention_mask=True)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor(waves, sampling_rate=16_000, padding=True, return_tensors="pt")
    assert torch.equal(batch["attention_mask"], expected["attention_mask"].long())
    tolerance = normalisation_tolerance(max(map(len, waves)), expected["input_values"].abs().max())
    assert (batch["input_values"] - expected["input_values"]).abs().max() <= tolerance
    assert batch["input_values"][1, len(waves[1]) :].abs().max() == 0  # padded with zeros
    assert "attention_mask" not in normalize_batch(waves, uses_attention_mask=False)


def test_batches_longest_first_keep_padded_audio_under_budget():
    durations = [1.0, 5.0, 2.0, 2.0, 9.0]
    batches = [batch.tolist() for batch in batches_longest_first(durations, 6.0)]
    assert batches == [[4], [1], [2, 3, 0]]  # longest first; a clip over budget goes alone
    assert sorted(i for batch in batches for i in batch) == list(range(5))


# --- evaluation -------------------------------------------------------------------------------
def test_evaluate_known_predictions(constant_run, prepared, tmp_path):
    out = tmp_path / "metrics.json"
    results = evaluate_model(constant_run, prepared, split="test", out=out, verbose=False)
    on_disk = json.loads(out.read_text())
    assert set(on_disk["overall"]) == FIELDS
    assert set(on_disk["per_locale"]) == {"en", "fr"}
    assert all(set(m) == FIELDS for m in on_disk["per_locale"].values())
    assert on_disk["per_locale"]["en"] == {
        "per": 6 / 8,
        "substitutions": 1,
        "deletions": 5,
        "insertions": 0,
        "ref_phones": 8,
        "utterances": 3,
    }
    assert on_disk["per_locale"]["fr"] == {
        "per": 2 / 3,
        "substitutions": 1,
        "deletions": 1,
        "insertions": 0,
        "ref_phones": 3,
        "utterances": 2,
    }
    assert on_disk["overall"]["per"] == pytest.approx(8 / 11)
    assert on_disk["split"] == "test" and "step 7" in on_disk["model"]
    assert on_disk["examples"]["fr"][1] == {"reference": "aɪ", "prediction": "aɪ"}
    assert on_disk["audio_seconds_per_second"] > 0
    assert results["overall"] == on_disk["overall"]


def test_evaluate_is_the_same_whatever_the_batching(random_run, prepared):
    """Batched, padded evaluation decodes exactly as the model card does one clip at a time."""
    one_batch = evaluate_model(random_run, prepared, batch_seconds=1000, verbose=False)
    one_by_one = evaluate_model(random_run, prepared, batch_seconds=0.1, verbose=False)
    assert one_batch["overall"] == one_by_one["overall"]
    assert one_batch["per_locale"] == one_by_one["per_locale"]

    model_dir = random_run / "checkpoints" / "step_3" / "model"
    model = Wav2Vec2ForCTC.from_pretrained(str(model_dir)).eval()
    export = export_model(random_run, random_run.parent / "export", verbose=False)
    processor = Wav2Vec2Processor.from_pretrained(export)
    import datasets

    stored = datasets.load_from_disk(str(prepared))["test"]
    predictions = []
    for row in stored:
        wave = np.asarray(row["audio"], dtype=np.float32) / 32768  # the clip as evaluate reads it
        with torch.no_grad():
            ids = model(processor(wave, return_tensors="pt").input_values).logits.argmax(-1)
        decoded = processor.batch_decode(ids)[0]
        predictions.append(" ".join(p for p in decoded.split() if p not in SPECIAL_TOKENS))
    expected = score_predictions(predictions, stored["phones"], stored["locale"])
    assert one_batch["overall"] == expected["overall"]
    assert one_batch["per_locale"] == expected["per_locale"]
    assert one_batch["overall"]["insertions"] > 0  # a random model babbles: a non-trivial case
    # The export folder evaluates the same as its checkpoint.
    assert evaluate_model(export, prepared, verbose=False)["per_locale"] == one_batch["per_locale"]


def test_locale_filter_and_errors(constant_run, prepared):
    fr_only = evaluate_model(constant_run, prepared, locales=["fr"], verbose=False)
    assert list(fr_only["per_locale"]) == ["fr"]
    assert fr_only["overall"]["ref_phones"] == 3
    with pytest.raises(PhonetuneError, match="--locales de: not in the test split"):
        evaluate_model(constant_run, prepared, locales=["de"], verbose=False)
    with pytest.raises(
        PhonetuneError, match="no 'train' split.*dev, test|no 'train' split.*test, dev"
    ):
        evaluate_model(constant_run, prepared, split="train", verbose=False)
    with pytest.raises(PhonetuneError, match="not a prepared dataset"):
        evaluate_model(constant_run, prepared.parent, verbose=False)


def test_cli_writes_results_next_to_the_checkpoint_for_the_model_card(
    constant_run, prepared, capsys, tmp_path
):
    assert main(["evaluate", str(constant_run), "--data", str(prepared), "--locales", "en,fr"]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "72.73" in printed and "audio seconds per second" in printed
    results = constant_run / "checkpoints" / "step_7" / "eval_test.json"
    assert json.loads(results.read_text())["overall"]["per"] == pytest.approx(8 / 11)

    # `phonetune export` finds it and fills the test column of the model card.
    card = (
        export_model(constant_run, tmp_path / "export", verbose=False) / "README.md"
    ).read_text()
    assert "| en | 0.250 | not measured | 75.00 % |" in card
    assert "| fr | 0.500 | not measured | 66.67 % |" in card
    assert "72.73 %" in card

    # --evaluate measures dev on the export itself.
    card = (
        export_model(constant_run, tmp_path / "export2", evaluate_splits=["dev"], verbose=False)
        / "README.md"
    ).read_text()
    assert "| en | 0.250 | 100.00 % | 75.00 % |" in card  # "ɡ ʊ d" -> "aɪ": 1 sub + 2 del


# --- zero-shot: mapping the model's phones onto a target inventory ----------------------------
@pytest.fixture(scope="module")
def spanish(tmp_path_factory):
    """A locale whose train transcripts give the inventory {a, s, t} and whose test clips say
    "a" and "s a": the constant "aɪ" model's scores with and without mapping follow by hand."""
    rows = [
        {"audio": speech("casa", "es"), "phones": "a s a", "locale": "es", "split": "train"},
        {"audio": speech("sata", "es"), "phones": "s a t a", "locale": "es", "split": "train"},
        {"audio": speech("ah", "es"), "phones": "a", "locale": "es", "split": "test"},
        {"audio": speech("sa", "es"), "phones": "s a", "locale": "es", "split": "test"},
    ]
    return write_prepared(tmp_path_factory.mktemp("spanish") / "prep", rows)


def test_zero_shot_known_predictions(constant_run, spanish, tmp_path):
    out = tmp_path / "zero_shot.json"
    results = evaluate_model(constant_run, spanish, zero_shot=True, out=out, verbose=False)
    assert json.loads(out.read_text())["zero_shot"] == json.loads(
        json.dumps(results["zero_shot"], ensure_ascii=False)
    )
    assert set(results["overall"]) == FIELDS  # the existing fields are unchanged
    es = results["zero_shot"]["per_locale"]["es"]
    assert es["inventory"]["phones"] == ["a", "s", "t"]
    assert "train transcripts" in es["inventory"]["source"]
    assert es["mapping"]["aɪ"] == "a"  # the diphthong's nucleus
    assert not {"a", "s", "t"} & set(es["mapping"])  # inventory phones map to themselves
    assert es["model_phones"] == len(VOCAB) - 4 and es["model_phones_in_inventory"] == 3
    assert es["inventory_phones_not_in_model"] == [] and es["unmappable"] == []
    assert (es["predicted_phones"], es["predicted_outside_inventory"]) == (2, 2)  # "aɪ" twice
    # Without mapping "aɪ" never matches: "a" -> "aɪ" 1 sub; "s a" -> "aɪ" 1 sub + 1 del.
    before = es["without_mapping"]
    assert (before["substitutions"], before["deletions"], before["per"]) == (2, 1, 1.0)
    assert before == {
        **results["per_locale"]["es"],
        "pfer": before["pfer"],
        "feature_errors": before["feature_errors"],
    }
    # PFER: a vs aɪ costs 1/9 (tests/test_articulatory.py), a deletion 1: (1/9 + 1 + 1/9) / 3.
    assert before["pfer"] == pytest.approx((1 / 9 + 1 + 1 / 9) / 3)
    # With mapping aɪ -> a: "a" is right, "s a" -> "a" is one deletion.
    after = es["with_mapping"]
    assert (after["substitutions"], after["deletions"], after["insertions"]) == (0, 1, 0)
    assert after["per"] == pytest.approx(1 / 3) and after["pfer"] == pytest.approx(1 / 3)
    assert results["zero_shot"]["overall"]["with_mapping"]["per"] == pytest.approx(1 / 3)
    assert results["zero_shot"]["examples"]["es"][1] == {
        "reference": "s a",
        "prediction": "aɪ",
        "mapped": "a",
    }


def test_zero_shot_inventory_options(constant_run, prepared, spanish, tmp_path, capsys):
    # A phone list for one locale: fr's references "ʁ ɛ" and "aɪ" with the inventory {aɪ, ʁ, ɛ}.
    inventory = tmp_path / "fr.txt"
    inventory.write_text("ʁ ɛ aɪ\n", encoding="utf-8")
    fr = evaluate_model(
        constant_run, prepared, locales=["fr"], zero_shot=True, inventory=inventory, verbose=False
    )["zero_shot"]["per_locale"]["fr"]
    assert fr["inventory"]["source"] == f"file {inventory}"
    assert fr["without_mapping"]["per"] == fr["with_mapping"]["per"] == pytest.approx(2 / 3)
    # Text phonemized with espeak-ng: Spanish "casa" gives k a s a.
    text = tmp_path / "es.txt"
    text.write_text("casa\n", encoding="utf-8")
    es = evaluate_model(constant_run, spanish, zero_shot=True, inventory_text=text, verbose=False)[
        "zero_shot"
    ]["per_locale"]["es"]
    assert es["inventory"]["phones"] == ["a", "k", "s"]
    assert es["inventory"]["source"].startswith(f"1 sentences of {text} phonemized")

    # Mistakes are one-paragraph errors, before any decoding.
    with pytest.raises(PhonetuneError, match="describes one language, but 2 locales"):
        evaluate_model(constant_run, prepared, zero_shot=True, inventory=inventory, verbose=False)
    with pytest.raises(PhonetuneError, match="add --zero-shot"):
        evaluate_model(constant_run, prepared, inventory=inventory, verbose=False)
    with pytest.raises(PhonetuneError, match="no train transcripts of en"):
        evaluate_model(constant_run, prepared, zero_shot=True, verbose=False)
    assert main(["evaluate", str(constant_run), "--data", str(prepared), "--zero-shot"]) == 2
    assert "--inventory FILE" in capsys.readouterr().err


def test_cli_zero_shot_prints_both_rates(constant_run, spanish, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                str(constant_run),
                "--data",
                str(spanish),
                "--zero-shot",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "PFER" in printed
    table = printed.split("\nzero-shot: ", 1)[1]  # the table after its heading
    line = next(row for row in table.splitlines() if row.startswith("es "))
    assert line.split()[3:5] == ["100.00", "33.33"]  # PER without mapping, with mapping
    assert json.loads(out.read_text())["zero_shot"]["per_locale"]["es"]["mapping"]["aɪ"] == "a"


def test_data_the_model_never_saw_is_noted_and_counted(prepared, tmp_path, capsys):
    """Locales outside the model's training locales, and reference phones outside its vocabulary
    (which it can never output), are said before decoding and counted in the results, for a
    checkpoint (from its training config) and for its export (from config.json) alike."""
    phones = [t for t in VOCAB if t not in ("ʁ", "ɛ")]  # the French references need both
    vocab = {token: index for index, token in enumerate(phones)}
    run = tmp_path / "run"
    step = write_checkpoint(run, 2, prepared_dir=prepared, vocab=vocab)
    config = yaml.safe_load((step / "config.yaml").read_text())
    config["data"]["locales"] = ["en"]
    (step / "config.yaml").write_text(yaml.safe_dump(config))
    export = export_model(run, tmp_path / "export", verbose=False)
    for model in (run, export):
        capsys.readouterr()
        results = evaluate_model(model, prepared, split="test")
        printed = capsys.readouterr().out
        assert results["unseen_locales"] == ["fr"], model
        assert results["phones_outside_vocabulary"] == {"ʁ": 1, "ɛ": 1}, model
        notes = [line for line in printed.splitlines() if line.startswith("note: ")]
        assert len(notes) == 2, printed
        assert "fr not among the model's training locales (en)" in notes[0]
        assert "2 of 11 reference phones (2 distinct)" in notes[1] and "ʁ (1)" in notes[1]
    # Nothing to say when the data is what the model knows.
    capsys.readouterr()
    results = evaluate_model(run, prepared, split="test", locales=["en"])
    assert results["unseen_locales"] == [] and results["phones_outside_vocabulary"] == {}
    assert "note: " not in capsys.readouterr().out
