"""`phonetune export`: the folder reloads with identical logits, runs the model card's code and the ASR
pipeline, decodes to single-spaced phones, matches in ONNX, and refuses what it must refuse.

Tiny checkpoints in the training stage's layout and a tiny prepared dataset come from helpers.py.
"""

import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    SAMPLE_RATE,
    VOCAB,
    speech,
    write_checkpoint,
    write_prepared,
)
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor, pipeline

from phonetune.cli import main
from phonetune.data.ctc import conv_layers, count_frames, greedy_decode
from phonetune.data.errors import PhonetuneError
from phonetune.data.vocab import SPECIAL_TOKENS
from phonetune.infer.checks import LOGITS_TOLERANCE, ONNX_TOLERANCE
from phonetune.infer.export import export_model
from phonetune.infer.recognize import normalize_batch
from phonetune.train.checkpoint import select_checkpoint


def checkpoint_logits(step_dir, wave):
    """The checkpoint's logits for one clip, fed as training feeds it."""
    model = Wav2Vec2ForCTC.from_pretrained(str(step_dir / "model")).eval()
    with torch.inference_mode():
        return model(**normalize_batch([wave], model.config.feat_extract_norm == "layer")).logits


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rows = [
        {
            "audio": speech("the cat sat on the mat"),
            "phones": "ð ə k æ t",
            "locale": "en",
            "split": "dev",
        },
        {
            "audio": speech("bonjour mes amis", "fr-fr"),
            "phones": "b ɔ̃ ʒ u ʁ",
            "locale": "fr",
            "split": "dev",
        },
        {"audio": speech("a big red apple"), "phones": "ɐ b ɪ ɡ", "locale": "en", "split": "train"},
        {
            "audio": speech("merci beaucoup", "fr-fr"),
            "phones": "m ɛ ʁ s i",
            "locale": "fr",
            "split": "train",
        },
    ]
    return write_prepared(tmp_path_factory.mktemp("prepared") / "prep", rows)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared):
    """Steps 2 (best) and 4 (newest), plus an interrupted save and a folder without state.json."""
    run = tmp_path_factory.mktemp("run") / "run"
    write_checkpoint(run, 2, seed=2, prepared_dir=prepared, eval_per=0.40)
    write_checkpoint(run, 4, seed=4, prepared_dir=prepared, eval_per=0.45)
    interrupted = write_checkpoint(run, 6, seed=6, prepared_dir=prepared)
    interrupted.rename(interrupted.with_name("step_6.tmp"))
    (write_checkpoint(run, 8, seed=8, prepared_dir=prepared) / "state.json").unlink()
    (run / "checkpoints" / "best.json").write_text(
        json.dumps({"step": 2, "eval_per": 0.40, "path": "step_2"})
    )
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "eval_per": 0.45, "eval_per_locale": {"en": 0.5, "fr": 0.4}})
        + "\n"
        + '{"step": 4, "trunc'  # a line cut short by a crash is skipped
    )
    return run


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    return export_model(
        run_dir, tmp_path_factory.mktemp("exports") / "phones", onnx=True, verbose=False
    )


@pytest.fixture(scope="module")
def clip():
    return speech("she sells sea shells by the sea shore")


# --- the folder ---------------------------------------------------------------------------------
def test_export_reloads_with_identical_logits(run_dir, export_dir, clip):
    processor = Wav2Vec2Processor.from_pretrained(export_dir)
    model = Wav2Vec2ForCTC.from_pretrained(export_dir).eval()
    with torch.inference_mode():
        exported = model(
            processor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        ).logits
    reference = checkpoint_logits(
        run_dir / "checkpoints" / "step_4", clip
    )  # the newest complete one
    assert exported.shape == reference.shape
    assert (exported - reference).abs().max() <= 1e-5
    other = checkpoint_logits(run_dir / "checkpoints" / "step_2", clip)
    assert (exported - other).abs().max() > 1e-2  # the comparison can tell checkpoints apart


def test_folder_has_the_layout_transformers_4_and_5_read(export_dir):
    names = {p.name for p in export_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "vocab.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "model.onnx",
    } <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)  # safetensors only
    mode = (export_dir / "model.safetensors").stat().st_mode & 0o777
    assert mode == (export_dir / "config.json").stat().st_mode & 0o777  # not owner-only
    preprocessor = json.loads((export_dir / "preprocessor_config.json").read_text())
    assert preprocessor["sampling_rate"] == 16_000
    assert preprocessor["do_normalize"] is True
    assert preprocessor["return_attention_mask"] is True  # layer-normalised feature encoder
    tokenizer_config = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "Wav2Vec2PhonemeCTCTokenizer"
    assert tokenizer_config["do_phonemize"] is False
    special = json.loads((export_dir / "special_tokens_map.json").read_text())
    assert special["pad_token"] == "<pad>"
    assert json.loads((export_dir / "config.json").read_text())["pad_token_id"] == 0


def test_hub_layout_without_processor_config_loads_the_same(export_dir, tmp_path, clip):
    """The released hub folder has only preprocessor_config.json: that alone must be enough."""
    hub = tmp_path / "hub"
    shutil.copytree(export_dir, hub)
    (hub / "processor_config.json").unlink()
    processor = Wav2Vec2Processor.from_pretrained(hub)
    assert processor.feature_extractor.return_attention_mask is True
    reference = Wav2Vec2Processor.from_pretrained(export_dir)(
        clip, sampling_rate=SAMPLE_RATE
    ).input_values
    assert np.array_equal(processor(clip, sampling_rate=SAMPLE_RATE).input_values[0], reference[0])


def test_model_card_snippet_gives_phone_strings(run_dir, export_dir, clip):
    # The released model card's code, unchanged but for the folder and the audio.
    processor = Wav2Vec2Processor.from_pretrained(export_dir)
    model = Wav2Vec2ForCTC.from_pretrained(export_dir)
    input_values = processor(clip, return_tensors="pt").input_values
    with torch.no_grad():
        logits = model(input_values).logits
    predicted_ids = torch.argmax(logits, dim=-1)
    transcription = processor.batch_decode(predicted_ids)

    assert isinstance(transcription, list) and len(transcription) == 1
    text = transcription[0]
    assert text and "  " not in text and text == text.strip()
    assert set(text.split(" ")) <= set(VOCAB) - {"<pad>"}
    # The same phones as training's own greedy decoder (which also drops <s>, </s>, <unk>).
    expected = greedy_decode(
        checkpoint_logits(run_dir / "checkpoints" / "step_4", clip).argmax(-1)[0].tolist(),
        {i: t for t, i in VOCAB.items()},
    )
    assert " ".join(p for p in text.split(" ") if p not in SPECIAL_TOKENS) == expected


def test_asr_pipeline_returns_the_same_phones(export_dir, clip):
    recognizer = pipeline("automatic-speech-recognition", model=str(export_dir), device="cpu")
    result = recognizer(clip)
    processor = Wav2Vec2Processor.from_pretrained(export_dir)
    model = Wav2Vec2ForCTC.from_pretrained(export_dir).eval()
    with torch.no_grad():
        logits = model(
            processor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        ).logits
    assert result["text"] == processor.batch_decode(logits.argmax(-1))[0]
    assert result["text"]


def test_tokenizer_decodes_single_spaced_phones_without_word_delimiter(export_dir):
    processor = Wav2Vec2Processor.from_pretrained(export_dir)
    tokenizer = processor.tokenizer
    ids = [0, 4, 4, 0, 4, 5, 5, 6, 0, 0, 8, 7, 7, 0, 6]  # blanks between repeats keep them apart
    assert processor.batch_decode(torch.tensor([ids]))[0] == "a a aɪ tʃ i5 n tʃ"
    assert tokenizer.decode(ids) == "a a aɪ tʃ i5 n tʃ"
    assert tokenizer.do_phonemize is False
    assert tokenizer.word_delimiter_token is None
    assert " " not in tokenizer.all_special_tokens and "|" not in tokenizer.get_vocab()
    # Phones in, ids out, with no espeak-ng involved.
    assert tokenizer("aɪ tʃ i5").input_ids == [5, 6, 8]


def test_onnx_matches_pytorch_on_new_batch_sizes_and_lengths(export_dir):
    import onnx
    import onnxruntime

    graph = onnx.load(str(export_dir / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_values", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    assert all(
        d.dim_param for d in graph.input[0].type.tensor_type.shape.dim
    )  # batch, samples dynamic

    model = Wav2Vec2ForCTC.from_pretrained(export_dir).eval()
    waves = [speech("one two three"), speech("four"), speech("five six seven eight", "fr-fr")]
    batch = normalize_batch(waves, uses_attention_mask=True)
    session = onnxruntime.InferenceSession(
        str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    result = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
    with torch.inference_mode():
        reference = model(**batch).logits.numpy()
    assert result.shape == reference.shape and result.shape[0] == 3
    for row, wave in enumerate(waves):
        frames = count_frames(len(wave), conv_layers(model.config))
        assert np.abs(result[row, :frames] - reference[row, :frames]).max() <= ONNX_TOLERANCE


def test_model_card_reports_data_training_and_versions(export_dir):
    card = (export_dir / "README.md").read_text()
    assert "step_4" in card and "step 4" in card
    assert "| en | 0.250 | 50.00 % | not measured |" in card  # hours, dev PER from metrics.jsonl
    assert "| fr | 0.500 | 40.00 % | not measured |" in card
    assert "| **all** | 0.750 | 45.00 % | not measured |" in card
    assert "`strip=False`" in card and "`with_stress=False`" in card
    assert "`remove-flags`" in card and "en -> en-us" in card
    assert "| data preparation | 1.52.0 | 3.3.0 |" in card
    assert "Wav2Vec2Processor.from_pretrained" in card and "processor.batch_decode" in card
    assert "tiny-random-wav2vec2" in card
    assert f"tolerance {ONNX_TOLERANCE:g}" in card and f"tolerance {LOGITS_TOLERANCE:g}" in card


def test_group_norm_model_exports_without_attention_mask(tmp_path, clip):
    import onnx

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=1, feat_extract_norm="group")
    out = export_model(run, tmp_path / "export", onnx=True, verbose=False)
    assert (
        json.loads((out / "preprocessor_config.json").read_text())["return_attention_mask"] is False
    )
    assert [i.name for i in onnx.load(str(out / "model.onnx")).graph.input] == ["input_values"]
    processor = Wav2Vec2Processor.from_pretrained(out)
    assert "attention_mask" not in processor(clip, sampling_rate=SAMPLE_RATE)
    model = Wav2Vec2ForCTC.from_pretrained(out).eval()
    with torch.inference_mode():
        logits = model(
            processor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        ).logits
    assert (logits - checkpoint_logits(run / "checkpoints" / "step_10", clip)).abs().max() <= 1e-5
    # No prepared data in this checkpoint's config: the check ran on espeak-ng speech.
    assert "synthesised by espeak-ng" in (out / "README.md").read_text()


# --- choosing the checkpoint ---------------------------------------------------------------------
def test_select_checkpoint_ignores_incomplete_saves(run_dir):
    assert select_checkpoint(run_dir).step == 4  # not step_6.tmp, not step_8 (no state.json)
    assert select_checkpoint(run_dir / "checkpoints").step == 4
    assert select_checkpoint(run_dir, "best").path.name == "step_2"
    for step in (2, "2", "step 2", "step_2"):
        assert select_checkpoint(run_dir, step).step == 2
    assert select_checkpoint(run_dir / "checkpoints" / "step_2").step == 2
    with pytest.raises(
        PhonetuneError, match=r"no complete checkpoint for step 6; available steps: 2, 4"
    ):
        select_checkpoint(run_dir, 6)
    with pytest.raises(PhonetuneError, match="not a complete checkpoint"):
        select_checkpoint(run_dir / "checkpoints" / "step_8")
    with pytest.raises(PhonetuneError, match="not a complete checkpoint"):
        select_checkpoint(run_dir / "checkpoints" / "step_6.tmp")
    with pytest.raises(PhonetuneError, match="give the run folder"):
        select_checkpoint(run_dir / "checkpoints" / "step_2", "best")
    with pytest.raises(PhonetuneError, match="latest, best, step N"):
        select_checkpoint(run_dir, "newest")


def test_best_without_best_json_says_why(tmp_path):
    write_checkpoint(tmp_path / "run", 3)
    with pytest.raises(PhonetuneError, match=r"best\.json does not exist.*available steps: 3"):
        select_checkpoint(tmp_path / "run", "best")


def test_no_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhonetuneError, match="no complete checkpoint in"):
        export_model(tmp_path / "empty", tmp_path / "out")
    interrupted = tmp_path / "run" / "checkpoints" / "step_5.tmp"
    interrupted.mkdir(parents=True)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "no complete checkpoint" in error and "step_5.tmp" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_best_and_step_selection_and_overwrite(run_dir, tmp_path, clip):
    out = tmp_path / "export"
    export_model(run_dir, out, which="best", verbose=False)
    assert "`step_2`" in (out / "README.md").read_text()
    model = Wav2Vec2ForCTC.from_pretrained(out).eval()
    processor = Wav2Vec2Processor.from_pretrained(out)
    with torch.inference_mode():
        logits = model(
            processor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        ).logits
    assert (
        logits - checkpoint_logits(run_dir / "checkpoints" / "step_2", clip)
    ).abs().max() <= 1e-5

    with pytest.raises(PhonetuneError, match="not empty.*--overwrite"):
        export_model(run_dir, out, which=4, verbose=False)
    assert "`step_2`" in (out / "README.md").read_text()  # untouched

    export_model(run_dir, out, which=4, overwrite=True, verbose=False)
    assert "`step_4`" in (out / "README.md").read_text()
    assert not (out / "model.onnx").exists()  # nothing left over from another export
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left behind


def test_refuses_non_empty_out_dir(run_dir, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    # --overwrite replaces an earlier export, never a folder of other files.
    with pytest.raises(PhonetuneError, match="thesis.tex"):
        export_model(run_dir, out, overwrite=True, verbose=False)
    assert (out / "thesis.tex").read_text() == "precious"
    with pytest.raises(PhonetuneError, match="would overwrite the checkpoint"):
        export_model(run_dir, run_dir / "checkpoints" / "step_4", verbose=False)


# --- the checks catch what they exist for --------------------------------------------------------
def test_changed_weights_fail_the_export(run_dir, tmp_path, monkeypatch):
    """As if a weight-norm parameter were renamed and re-initialised on the way to disk."""
    original = Wav2Vec2ForCTC.save_pretrained

    def save_with_a_changed_weight(self, *args, **kwargs):
        conv = self.wav2vec2.encoder.pos_conv_embed.conv
        with torch.no_grad():
            conv.bias.add_(0.5)
        try:
            return original(self, *args, **kwargs)
        finally:
            with torch.no_grad():
                conv.bias.sub_(0.5)

    monkeypatch.setattr(Wav2Vec2ForCTC, "save_pretrained", save_with_a_changed_weight)
    with pytest.raises(PhonetuneError, match="reloaded logits differ"):
        export_model(run_dir, tmp_path / "export", verbose=False)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging left


def test_missing_weights_fail_the_export(run_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    original = Wav2Vec2ForCTC.save_pretrained

    def save_without_weight_norm(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        weights = load_file(f"{folder}/model.safetensors")
        kept = {k: v for k, v in weights.items() if "pos_conv_embed.conv.parametrizations" not in k}
        save_file(kept, f"{folder}/model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(Wav2Vec2ForCTC, "save_pretrained", save_without_weight_norm)
    with pytest.raises(PhonetuneError, match="weights missing.*pos_conv_embed"):
        export_model(run_dir, tmp_path / "export", verbose=False)


def test_preprocessing_that_differs_from_training_fails_the_export(run_dir, tmp_path, monkeypatch):
    import phonetune.infer.export as export_module

    build = export_module.build_processor

    def unnormalised(vocab_path, uses_attention_mask):
        processor = build(vocab_path, uses_attention_mask)
        processor.feature_extractor.do_normalize = False
        return processor

    monkeypatch.setattr(export_module, "build_processor", unnormalised)
    with pytest.raises(PhonetuneError, match="reloaded logits differ"):
        export_model(run_dir, tmp_path / "export", verbose=False)


def test_unreadable_check_audio_is_a_clear_error(run_dir, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(PhonetuneError, match="--audio .*bad.wav"):
        export_model(run_dir, tmp_path / "export", audio=bad, verbose=False)
    assert not (tmp_path / "export").exists()


def test_the_command_names_the_next_one(run_dir, tmp_path, capsys):
    out = tmp_path / "cli export"  # a path the hint must quote for a shell
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    prepared = select_checkpoint(run_dir, "latest").prepared_dir()
    data = shlex.quote(str(prepared)) if prepared else "PREPARED_DIR"
    hint = f"next: phonetune evaluate {shlex.quote(str(out))} --data {data} --split test"
    assert capsys.readouterr().out.strip().splitlines()[-1] == hint


# --- averaging ------------------------------------------------------------------------------------
def saved_weights(step_dir):
    from safetensors.torch import load_file

    return load_file(step_dir / "model" / "model.safetensors")


def test_average_last_exports_the_mean_of_the_checkpoints(prepared, tmp_path, capsys):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    steps = [2, 4, 6, 8]
    for step in steps:  # different random weights at each step
        write_checkpoint(run, step, seed=step, prepared_dir=prepared)
    out = export_model(run, tmp_path / "avg", average_last=3, verbose=False)
    exported = load_file(out / "model.safetensors")
    parts = [saved_weights(run / "checkpoints" / f"step_{step}") for step in (4, 6, 8)]
    for name, tensor in exported.items():
        if tensor.is_floating_point():  # float64 sums, oldest first, as the export sums them
            mean = (parts[0][name].double() + parts[1][name].double() + parts[2][name].double()) / 3
            assert torch.equal(tensor, mean.float()), name
    assert not torch.equal(exported["lm_head.weight"], parts[-1]["lm_head.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["phonetune_averaged_steps"] == [4, 6, 8]
    card = (out / "README.md").read_text()
    assert "the mean of the checkpoints of steps 4, 6, 8" in card

    # --average names the steps; up to --step chooses where the last N end
    out = export_model(run, tmp_path / "picked", average_steps=[2, 8], verbose=False)
    assert json.loads((out / "config.json").read_text())["phonetune_averaged_steps"] == [2, 8]
    out = export_model(run, tmp_path / "upto", which=6, average_last=2, verbose=False)
    assert json.loads((out / "config.json").read_text())["phonetune_averaged_steps"] == [4, 6]

    # evaluate says what it evaluates
    assert main(["evaluate", str(tmp_path / "avg"), "--data", str(prepared), "--split", "dev"]) == 0
    assert "the mean of the weights of steps 4, 6, 8" in capsys.readouterr().out


def test_averaging_refusals_name_the_fix(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    for step in (2, 4):
        write_checkpoint(run, step, seed=step, prepared_dir=prepared)
    lone = tmp_path / "copied" / "step_4"  # a step folder outside its run: no other checkpoints
    shutil.copytree(run / "checkpoints" / "step_4", lone)
    for argv, words in (
        ([f"{run}", "--average-last", "3"], "holds 2 checkpoint(s) up to step 4"),
        ([f"{run}", "--average", "2,4", "--best"], "--best and --step do not apply"),
        ([f"{lone}", "--average-last", "2"], "needs a run folder"),
        ([f"{run}", "--average", "2,5"], "step"),
    ):
        assert main(["export", *argv, "--out", str(tmp_path / "x")]) == 2, argv
        assert words in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):  # argparse: one of the two, and a list of two steps or more
        main(["export", str(run), "--out", str(tmp_path / "x"), "--average", "4"])
    assert "give two steps or more" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
