"""`phonetune export --onnx --quantize int8 --onnx-fp16`: the quantized files are written, run on
ONNX Runtime's CPU provider like the PyTorch model, and are checked by PER on real clips; a
quantized model that loses more than the tolerance stops the export with nothing written."""

import pytest
from helpers import constant_model, speech, write_checkpoint, write_prepared

from phonetune.cli import main
from phonetune.data.errors import PhonetuneError
from phonetune.data.per import score_predictions
from phonetune.infer import quantize
from phonetune.infer.checks import export_onnx
from phonetune.infer.evaluate import evaluate_model
from phonetune.infer.export import export_model
from phonetune.infer.quantize import load_onnx_model, transcribe_clips
from phonetune.infer.recognize import load_model

# Every dev clip's reference is "aɪ", what helpers.constant_model("aɪ") says on any audio.
TEXTS = ["hello there", "good morning", "we like warm bread", "a cup of tea"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rows = [{"audio": speech(t), "phones": "aɪ", "locale": "en", "split": "dev"} for t in TEXTS]
    return write_prepared(tmp_path_factory.mktemp("prepared") / "prep", rows)


@pytest.fixture(scope="module")
def random_export(tmp_path_factory, prepared):
    """A random tiny model (its output changes with every weight) exported with both files."""
    root = tmp_path_factory.mktemp("random")
    write_checkpoint(root / "run", 2, seed=2, prepared_dir=prepared)
    argv = ["export", str(root / "run"), "--out", str(root / "export")]
    assert main([*argv, "--quantize", "int8", "--onnx-fp16"]) == 0
    return root / "export"


def test_quantized_files_run_like_the_model(random_export, prepared, capsys):
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
        assert (random_export / name).is_file()
    card = (random_export / "README.md").read_text(encoding="utf-8")
    assert "`model.int8.onnx` (int8" in card and "`model.fp16.onnx` (fp16" in card
    assert f"4 clips of the dev split of {prepared}" in card
    # The ONNX session stands in for the PyTorch model in the same recognition code.
    waves = [speech(t) for t in TEXTS]
    reference = transcribe_clips(load_model(random_export), waves)
    assert transcribe_clips(load_onnx_model(random_export, "model.onnx"), waves) == reference
    for name in ("model.int8.onnx", "model.fp16.onnx"):
        loaded = load_onnx_model(random_export, name, threads=1)
        results = evaluate_model(loaded, prepared, "dev", verbose=False)
        assert results["model"] == str(random_export / name)
        # A random model's frame posteriors are nearly flat, so rounding its weights flips some
        # argmaxes (measured: 3 % of phones for int8, none for fp16); a broken graph would
        # disagree on nearly every phone.
        phones = transcribe_clips(loaded, waves)
        disagreement = score_predictions(phones, reference, ["en"] * len(waves))["overall"]["per"]
        assert disagreement < 0.1, name


def test_a_quantized_model_that_loses_accuracy_stops_the_export(tmp_path, prepared, monkeypatch):
    """The checkpoint says "aɪ" (PER 0 on the dev split); a "quantized" file that says "n"
    everywhere has PER 1 (one substitution per clip): far past the tolerance."""
    write_checkpoint(tmp_path / "run", 1, constant_model("aɪ"), prepared_dir=prepared)

    def write_wrong_model(source, target):
        export_onnx(constant_model("n"), target, uses_attention_mask=True)

    monkeypatch.setitem(quantize.WRITERS, "int8", write_wrong_model)
    with pytest.raises(PhonetuneError, match=r"int8 check failed.*PER 100.00 % against 0.00 %"):
        export_model(tmp_path / "run", tmp_path / "export", quantize=["int8"], verbose=False)
    assert not (tmp_path / "export").exists()


def test_without_training_data_the_check_compares_with_pytorch(tmp_path):
    """No prepared dataset: the check clips (--audio) have no reference phones, so the card
    states the PER of the int8 model's phones against PyTorch's instead (a constant model's
    are the same)."""
    import soundfile

    soundfile.write(tmp_path / "clip.wav", speech("the quick brown fox"), 16000)
    write_checkpoint(tmp_path / "run", 1, constant_model("aɪ"))
    out = export_model(
        tmp_path / "run",
        tmp_path / "export",
        quantize=["int8"],
        audio=tmp_path / "clip.wav",
        verbose=False,
    )
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "(no reference phones) its phones differ from PyTorch's by a PER of 0.00 %" in card
    assert str(tmp_path / "clip.wav") in card


def test_parity_clips_stop_at_the_audio_budget(prepared, monkeypatch):
    """The first clips of dev up to PARITY_SECONDS of audio (the clips' lengths are about those of
    espeak-ng speaking TEXTS again, within samples: the budget ends mid-way through the third),
    each with its reference phones."""
    lengths = [len(speech(t)) / 16000 for t in TEXTS]
    monkeypatch.setattr(quantize, "PARITY_SECONDS", lengths[0] + lengths[1] + 0.5 * lengths[2])
    clips = quantize.read_parity_clips(prepared, [], "unused")
    assert len(clips.waves) == 2 and clips.references == ["aɪ", "aɪ"]
    assert clips.source == f"2 clips of the dev split of {prepared}"
