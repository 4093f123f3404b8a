"""Building and loading Wav2Vec2ForCTC: vocabulary checks, head transfer, freezing, XLSR-53 size."""

import json
import time
from pathlib import Path

import pytest
import torch

from phonetune.data.errors import PhonetuneError
from phonetune.train.config import ModelConfig
from phonetune.train.loop import ctc_loss
from phonetune.train.model import (
    CTCModel,
    build_model,
    count_parameters,
    fft_conv1d,
    load_checkpoint_model,
    transfer_head,
)

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[16] * 7,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "tʃ": 6}


def tiny_cfg(**changes):
    return ModelConfig(config=dict(TINY), mask_time_prob=0.0, layerdrop=0.0, **changes)


def test_random_init_takes_vocab_size_and_blank_from_the_vocabulary():
    model, origin = build_model(tiny_cfg(), VOCAB)
    assert model.config.vocab_size == 7 and model.lm_head.out_features == 7
    assert model.config.pad_token_id == 0
    assert model.config._attn_implementation == "sdpa"
    assert "random initialisation" in origin
    assert not any(p.requires_grad for p in model.wav2vec2.feature_extractor.parameters())
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_config_disagreeing_with_the_vocabulary_is_an_error():
    with pytest.raises(PhonetuneError, match="vocab_size=50 but the prepared vocab.json has 7"):
        build_model(ModelConfig(config={**TINY, "vocab_size": 50}), VOCAB)
    with pytest.raises(PhonetuneError, match="pad_token_id=3"):
        build_model(ModelConfig(config={**TINY, "pad_token_id": 3}), VOCAB)


def test_training_settings_override_the_checkpoint(tmp_path):
    model, _ = build_model(tiny_cfg(), VOCAB)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "vocab.json").write_text(json.dumps(VOCAB))
    cfg = ModelConfig(
        name_or_path=str(tmp_path / "m"), mask_time_prob=0.3, hidden_dropout=0.2, layerdrop=0.05
    )
    loaded, _ = build_model(cfg, VOCAB)
    assert (
        loaded.config.mask_time_prob,
        loaded.config.hidden_dropout,
        loaded.config.layerdrop,
    ) == (0.3, 0.2, 0.05)


def test_continuing_a_ctc_model_keeps_the_rows_of_shared_phones(tmp_path):
    source, _ = build_model(tiny_cfg(), VOCAB)
    source.save_pretrained(tmp_path / "ft")
    (tmp_path / "ft" / "vocab.json").write_text(json.dumps(VOCAB, ensure_ascii=False))
    new_vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "tʃ": 4, "ʒ": 5, "a": 6}
    model, origin = build_model(ModelConfig(name_or_path=str(tmp_path / "ft")), new_vocab)
    assert "kept the output rows of 6 of 7" in origin
    old_w, old_b = source.lm_head.weight.detach(), source.lm_head.bias.detach()
    new_w, new_b = model.lm_head.weight.detach(), model.lm_head.bias.detach()
    assert new_w.shape == (7, 32) and model.config.vocab_size == 7
    for token, new_id in new_vocab.items():
        if token in VOCAB:
            assert (
                torch.equal(new_w[new_id], old_w[VOCAB[token]])
                and new_b[new_id] == old_b[VOCAB[token]]
            )
    assert not torch.equal(new_w[5], old_w[5])  # ʒ is new: a fresh row, not b's
    # the encoder came from the checkpoint
    name = "wav2vec2.encoder.layers.0.attention.q_proj.weight"
    assert torch.equal(model.state_dict()[name], source.state_dict()[name])


def test_a_ctc_model_without_its_vocabulary_is_refused_unless_the_head_is_reset(tmp_path):
    source, _ = build_model(tiny_cfg(), VOCAB)
    source.save_pretrained(tmp_path / "ft")
    with pytest.raises(PhonetuneError, match="has no vocab.json"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "ft")), VOCAB)
    model, origin = build_model(
        ModelConfig(name_or_path=str(tmp_path / "ft"), reset_head=True), {**VOCAB, "x": 7}
    )
    assert model.lm_head.out_features == 8 and "new CTC output layer" in origin
    (tmp_path / "ft" / "vocab.json").write_text(
        json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3})
    )
    with pytest.raises(PhonetuneError, match="says vocab_size=7 but its vocab.json has 4"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "ft")), VOCAB)


def test_a_pretrained_encoder_gets_a_new_head(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    encoder = Wav2Vec2Model(Wav2Vec2Config(**TINY))
    encoder.save_pretrained(tmp_path / "pt")
    model, origin = build_model(ModelConfig(name_or_path=str(tmp_path / "pt")), VOCAB)
    assert model.lm_head.out_features == 7 and "pretrained encoder" in origin
    name = "encoder.layers.1.feed_forward.output_dense.weight"
    assert torch.equal(model.wav2vec2.state_dict()[name], encoder.state_dict()[name])


def test_missing_pretrained_model_is_a_clear_error(tmp_path):
    with pytest.raises(PhonetuneError, match="could not be loaded"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "nothing-here")), VOCAB)


def test_transfer_head_refuses_a_vocabulary_of_another_size():
    model, _ = build_model(tiny_cfg(), VOCAB)
    with pytest.raises(PhonetuneError, match="do not belong together"):
        transfer_head(model, {"<pad>": 0}, VOCAB)


def test_checkpoint_model_reloads_identically(tmp_path):
    from transformers import Wav2Vec2ForCTC

    model, _ = build_model(tiny_cfg(), VOCAB)
    (tmp_path / "ckpt").mkdir()
    model.save_pretrained(tmp_path / "ckpt" / "model")
    (tmp_path / "ckpt" / "vocab.json").write_text(json.dumps(VOCAB, ensure_ascii=False))
    loaded, vocab = load_checkpoint_model(tmp_path / "ckpt")
    assert vocab == VOCAB and isinstance(loaded, Wav2Vec2ForCTC) and not loaded.training
    model.eval()
    audio = torch.randn(1, 8000)
    assert torch.equal(model(audio).logits, loaded(audio).logits)
    (tmp_path / "ckpt" / "vocab.json").write_text(json.dumps({**VOCAB, "z": 7}))
    with pytest.raises(PhonetuneError, match="model and vocabulary disagree"):
        load_checkpoint_model(tmp_path / "ckpt")


def test_frozen_transformer_trains_only_the_output_layer():
    model, _ = build_model(tiny_cfg(), VOCAB)
    module = CTCModel(model)
    audio, mask = torch.randn(2, 16000), torch.ones(2, 16000, dtype=torch.long)
    module(audio, mask, freeze_transformer=True).sum().backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert with_grad == {"model.lm_head.weight", "model.lm_head.bias"}
    module.zero_grad(set_to_none=True)
    module(audio, mask, freeze_transformer=False).sum().backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert "model.wav2vec2.encoder.layers.0.attention.q_proj.weight" in with_grad
    assert not any(name.startswith("model.wav2vec2.feature_extractor") for name in with_grad)


def test_padding_does_not_change_the_logits_of_real_frames():
    model, _ = build_model(tiny_cfg(), VOCAB)
    module = CTCModel(model).eval()
    audio = torch.randn(1, 16000)
    padded = torch.cat([audio, torch.zeros(1, 8000)], dim=1)
    mask = torch.cat([torch.ones(1, 16000), torch.zeros(1, 8000)], dim=1).long()
    with torch.no_grad():
        alone = module(audio, torch.ones(1, 16000, dtype=torch.long))
        with_padding = module(padded, mask)
    frames = int(module.output_lengths(torch.tensor([16000]))[0])
    torch.testing.assert_close(with_padding[:, :frames], alone, rtol=1e-4, atol=1e-4)


def xlsr53_config():
    """facebook/wav2vec2-large-xlsr-53's architecture, as shipped for random-init builds."""
    path = Path(__file__).resolve().parents[1] / "configs" / "xlsr53_architecture.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "channels, groups, kernel, length",
    [(32, 4, 16, 50), (48, 16, 64, 70), (16, 2, 5, 9), (64, 16, 128, 300)],
)
def test_fft_convolution_is_the_grouped_convolution(channels, groups, kernel, length):
    torch.manual_seed(0)
    x = torch.randn(3, channels, length, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(
        channels, channels // groups, kernel, dtype=torch.float64, requires_grad=True
    )
    bias = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    for padding in sorted({0, kernel // 2, kernel - 1}):
        expected = torch.nn.functional.conv1d(x, weight, bias, padding=padding, groups=groups)
        got = fft_conv1d(x, weight, bias, padding, groups)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        upstream = torch.randn_like(expected)
        grads = torch.autograd.grad(expected, (x, weight, bias), upstream)
        fft_grads = torch.autograd.grad(got, (x, weight, bias), upstream)
        for a, b in zip(fft_grads, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_training_wrapper_computes_what_transformers_computes():
    """CTCModel's faster positional convolution changes no logit or gradient beyond rounding."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(
            build_model(
                tiny_cfg(
                    hidden_dropout=0.0,
                    activation_dropout=0.0,
                    attention_dropout=0.0,
                    final_dropout=0.0,
                    feat_proj_dropout=0.0,
                ),
                vocab,
            )[0].train()
        )
    wrapped, plain = CTCModel(models[0]), models[1]
    audio = torch.randn(2, 16000)
    mask = torch.ones_like(audio, dtype=torch.long)
    mask[1, 12000:] = 0
    ours = wrapped(audio, mask)
    theirs = plain(audio, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)
    # exported weights are transformers' own: the state dicts have the same keys
    assert set(models[0].state_dict()) == set(models[1].state_dict())


@pytest.mark.slow
def test_xlsr53_size_model_takes_a_training_step():
    started = time.time()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"p{i}": i + 4 for i in range(388)}}
    cfg = ModelConfig(
        config=xlsr53_config(),
        mask_time_prob=0.75,
        mask_feature_prob=0.25,
        mask_feature_length=64,
        layerdrop=0.1,
        activation_dropout=0.1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        final_dropout=0.0,
    )
    torch.manual_seed(0)
    model, _ = build_model(cfg, vocab)
    trainable, total = count_parameters(model)
    assert 310e6 < total < 320e6 and total - trainable > 4e6  # ~315M, feature encoder frozen
    module = CTCModel(model).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    audio = torch.randn(1, 16000)
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before_head = model.lm_head.weight.detach().clone()
    before_conv = model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.detach().clone()
    logits = module(audio, torch.ones_like(audio, dtype=torch.long))
    assert logits.shape == (1, 49, 392)
    loss = ctc_loss(
        logits, module.output_lengths(torch.tensor([16000])), labels, torch.tensor([6]), "sum", True
    )
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before_head)
    assert torch.equal(model.wav2vec2.feature_extractor.conv_layers[0].conv.weight, before_conv)
    assert time.time() - started < 120
