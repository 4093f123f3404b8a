"""Building and loading Wav2Vec2ForCTC: vocabulary checks, head transfer, freezing, XLSR-53 size."""

import contextlib
import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from phonetune.data.errors import PhonetuneError
from phonetune.train.config import ModelConfig
from phonetune.train.loop import ctc_losses
from phonetune.train.model import (
    CTCModel,
    build_model,
    count_parameters,
    draw_span_mask,
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


def tiny_cfg(architecture=None, **changes):
    config = {**TINY, **(architecture or {})}
    return ModelConfig(**{"config": config, "mask_time_prob": 0.0, "layerdrop": 0.0, **changes})


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
    audio, lengths = torch.randn(2, 16000), torch.tensor([16000, 16000])
    module(audio, lengths, freeze_transformer=True).sum().backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert with_grad == {"model.lm_head.weight", "model.lm_head.bias"}
    module.zero_grad(set_to_none=True)
    module(audio, lengths, freeze_transformer=False).sum().backward()
    with_grad = {name for name, p in module.named_parameters() if p.grad is not None}
    assert "model.wav2vec2.encoder.layers.0.attention.q_proj.weight" in with_grad
    assert not any(name.startswith("model.wav2vec2.feature_extractor") for name in with_grad)


def test_padding_does_not_change_the_logits_of_real_frames():
    model, _ = build_model(tiny_cfg(), VOCAB)
    module = CTCModel(model).eval()
    audio = torch.randn(1, 16000, dtype=torch.float64)
    padded = torch.cat([audio, torch.zeros(1, 8000, dtype=torch.float64)], dim=1)
    module.double()
    with torch.no_grad():
        alone = module(audio, torch.tensor([16000]))
        with_padding = module(padded, torch.tensor([16000]))
    frames = int(module.output_lengths(torch.tensor([16000]))[0])
    # float64: the two differ only in the order of sums over padded (zero) positions
    torch.testing.assert_close(with_padding[:, :frames], alone, rtol=0, atol=1e-10)


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


@pytest.mark.parametrize(
    "architecture",
    [
        {},  # XLSR: layer-norm feature encoder, pre-norm layers, attention mask
        {"attn_implementation": "eager"},
        {"feat_extract_norm": "group", "do_stable_layer_norm": False},  # wav2vec2-base style
    ],
    ids=["xlsr-sdpa", "xlsr-eager", "base"],
)
def test_training_wrapper_computes_what_transformers_computes(architecture):
    """CTCModel's own glue between transformers' modules (no host reads) computes Wav2Vec2ForCTC:
    the same logits and gradients, with padding. In float64, where the positional convolution is
    transformers' own layer too (the FFT form is float32-only, tested above), so the two differ
    only in the rounding of a few reordered operations: far below 1e-9 of the outputs' scale."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    attention = architecture.pop("attn_implementation", "sdpa")
    no_dropout = dict(
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        final_dropout=0.0,
        feat_proj_dropout=0.0,
    )
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        cfg = tiny_cfg(architecture, attn_implementation=attention, **no_dropout)
        models.append(build_model(cfg, vocab)[0].double().train())
    wrapped, plain = CTCModel(models[0]), models[1]
    audio = torch.randn(2, 16000, dtype=torch.float64)
    audio[1, 12000:] = 0
    lengths = torch.tensor([16000, 12000])
    ours = wrapped(audio, lengths)
    if wrapped.use_attention_mask:
        mask = (torch.arange(16000) < lengths[:, None]).long()
        theirs = plain(audio, attention_mask=mask).logits
    else:  # group-norm encoders take no mask, in transformers as in phonetune
        theirs = plain(audio).logits
    scale = float(theirs.detach().abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9 * scale)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    grads = [(n, a.grad, b.grad) for (n, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True)]  # fmt: skip
    scale = max(float(b.abs().max()) for _, _, b in grads if b is not None)
    for name, a, b in grads:
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * scale, msg=name)
    # exported weights are transformers' own: the state dicts have the same keys
    assert set(models[0].state_dict()) == set(models[1].state_dict())


@pytest.mark.parametrize(
    "lengths, prob, span, min_spans",
    [([200, 120, 37, 9], 0.3, 10, 2), ([64] * 4, 0.25, 16, 0), ([500, 250], 0.75, 10, 2)],
)
def test_spec_augment_masks_drawn_on_the_device_follow_transformers(lengths, prob, span, min_spans):
    """The masked fraction and the lengths of masked runs, per row length, match transformers'
    NumPy `_compute_mask_indices` within sampling noise (both means over 2000 draws; the bound is
    5 standard errors of their difference)."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    draws, width = 2000, max(lengths)
    lengths_t = torch.tensor(lengths)
    generator = torch.Generator().manual_seed(0)
    ours = torch.stack(
        [draw_span_mask(lengths_t, width, prob, span, min_spans, generator) for _ in range(draws)]
    ).numpy()
    attention = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    np.random.seed(0)
    theirs = np.stack(
        [
            _compute_mask_indices(
                (len(lengths), width), prob, span, torch.from_numpy(attention), min_spans
            )
            for _ in range(draws)
        ]
    )
    assert not ours[:, attention == 0].any()  # nothing masked past a row's length
    for row, length in enumerate(lengths):
        for statistic in (masked_fraction, mean_run_length):
            a = np.array([statistic(mask[row, :length]) for mask in ours])
            b = np.array([statistic(mask[row, :length]) for mask in theirs])
            noise = 5 * np.sqrt(a.var() / draws + b.var() / draws) + 1e-12
            assert abs(a.mean() - b.mean()) <= noise, (row, statistic.__name__, a.mean(), b.mean())


def masked_fraction(mask):
    return mask.mean()


def mean_run_length(mask):
    """Mean length of the runs of masked frames (overlapping spans merge), 0 without any."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return float((ends - starts).mean()) if len(starts) else 0.0


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
    logits = module(audio, torch.tensor([16000]))
    assert logits.shape == (1, 49, 392)
    loss = ctc_losses(
        logits, module.output_lengths(torch.tensor([16000])), labels, torch.tensor([6]), True
    ).sum()
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before_head)
    assert torch.equal(model.wav2vec2.feature_extractor.conv_layers[0].conv.weight, before_conv)
    assert time.time() - started < 120


@pytest.mark.slow  # inductor compiles the blocks: about a minute on 2 CPU cores
def test_compiled_blocks_compute_what_eager_blocks_compute():
    """train.compile: torch.compile of each block computes the eager forward and backward (float64,
    where the fused kernels' reordered sums differ by rounding alone: far below 1e-9 of the
    outputs' scale), and leaves the parameter names, so checkpoints, as they were."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    no_dropout = dict(
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, final_dropout=0.0
    )
    results, names = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, _ = build_model(tiny_cfg(**no_dropout), vocab)
        module = CTCModel(model.double()).train()
        if compiled:
            module.compile_blocks("default")
        audio = torch.randn(2, 16000, dtype=torch.float64)
        audio[1, 12000:] = 0
        logits = module(audio, torch.tensor([16000, 12000]))
        logits.square().sum().backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
        names.append(list(module.state_dict()))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert names[0] == names[1]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-9 * float(eager.abs().max()))
    assert compiled_grads.keys() == eager_grads.keys()
    scale = max(float(g.abs().max()) for g in eager_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-9 * scale, msg=name)


def test_evaluation_under_cuda_graphs_runs_the_blocks_eagerly():
    """train.compile=reduce-overhead: dev batches (every width, no grid) would each record CUDA
    graphs of their own, so evaluation runs the compiled blocks eagerly: nothing is compiled,
    and the logits are the eager model's to the bit. (No compile happens here at all: blocks
    compile at their first call.)"""
    from torch._dynamo.utils import counters

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    torch.manual_seed(0)
    model, _ = build_model(tiny_cfg(), vocab)
    eager = CTCModel(model).eval()
    graphed = CTCModel(copy.deepcopy(model)).eval()
    graphed.compile_blocks("reduce-overhead")
    audio = torch.randn(2, 9000)
    lengths = torch.tensor([9000, 7000])
    before = sum(counters["stats"].values())
    with torch.no_grad(), graphed.evaluating():
        logits = graphed(audio, lengths)
    assert sum(counters["stats"].values()) == before  # dynamo did not even look at a frame
    with torch.no_grad():
        assert torch.equal(logits, eager(audio, lengths))
    assert isinstance(eager.evaluating(), contextlib.nullcontext)


def test_layerdrop_by_mask_drops_the_layers_skipping_drops():
    """LayerDrop for CUDA graphs (`run_every_layer`: every layer runs, a dropped one's output is
    discarded by torch.where) drops the same layers as skipping them, from the same draws, and
    computes the same thing bit for bit: torch.where selects values without arithmetic, and the
    dropped layers' backward adds exact zeros. Their weights get a zero gradient instead of none."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    no_dropout = dict(
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, final_dropout=0.0
    )
    architecture = {"num_hidden_layers": 8}
    runs = []
    for every_layer in (False, True):
        torch.manual_seed(0)
        model, _ = build_model(tiny_cfg(architecture, layerdrop=0.5, **no_dropout), vocab)
        module = CTCModel(model).train()
        module.seed_random(3)
        module.run_every_layer = every_layer
        outputs = []
        for step in range(3):  # a new draw of layers each pass
            audio = torch.randn(2, 8000, generator=torch.Generator().manual_seed(step))
            logits = module(audio, torch.tensor([8000, 6000]))
            logits.square().sum().backward()
            outputs.append(logits.detach())
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        runs.append((outputs, grads))
    (skipped, skip_grads), (masked, mask_grads) = runs
    for a, b in zip(skipped, masked, strict=True):
        assert torch.equal(a, b)
    never_ran = [n for n, g in skip_grads.items() if g is None]
    assert never_ran, "with 8 layers dropped at 0.5 over 3 passes, some layer should never run"
    assert all(n.startswith("model.wav2vec2.encoder.layers.") for n in never_ran)
    for name, grad in mask_grads.items():
        if skip_grads[name] is None:
            assert torch.count_nonzero(grad) == 0, name
        else:
            assert torch.equal(grad, skip_grads[name]), name
