"""Building, loading and wrapping the `Wav2Vec2ForCTC` that training fine-tunes.

Three ways in, one rule: the output layer has one row per token of the prepared vocab.json, and the
CTC blank is `<pad>` = id 0 = `pad_token_id`. Any disagreement between a checkpoint, `model.config`
and the vocabulary is an error, never a silent reshuffle of output rows.

- `model.config`: a randomly initialised model from Wav2Vec2Config arguments (tests, the tiny demo).
- `model.name_or_path` of a *pretrained* encoder (e.g. `facebook/wav2vec2-large-xlsr-53`, which holds
  a `Wav2Vec2ForPreTraining`): the encoder is loaded and a new CTC output layer is initialised. Hub ids
  are fetched through `from_pretrained` (and its cache); local directories are read directly.
- `model.name_or_path` of a *fine-tuned CTC* model (e.g. `facebook/wav2vec2-xlsr-53-espeak-cv-ft`):
  its vocab.json is read and the output rows (weight and bias) of the tokens both vocabularies share
  are kept, so continuing with a new or extended phone set starts from what the model knew.
"""

from __future__ import annotations

import contextlib
import functools
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phonetune.data import ctc
from phonetune.data.audio import SAMPLE_RATE
from phonetune.data.errors import PhonetuneError
from phonetune.data.files import read_json
from phonetune.data.vocab import BLANK_ID, BLANK_TOKEN, VOCAB_FILE
from phonetune.train.checkpoint import BUILD_ERRORS, load_pretrained
from phonetune.train.config import HF_TRAINING_SETTINGS, ModelConfig

# Wav2Vec2Config fields that decide the shapes of the weights: two configs that differ here describe
# different models, whatever their dropout or masking settings.
ARCHITECTURE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "conv_dim",
    "conv_kernel",
    "conv_stride",
    "conv_bias",
    "feat_extract_norm",
    "feat_extract_activation",
    "do_stable_layer_norm",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
    "add_adapter",
    "vocab_size",
)


def training_settings(model_cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config values training sets on top of any checkpoint (masking, dropout, CTC)."""
    return {key: getattr(model_cfg, key) for key in HF_TRAINING_SETTINGS}


def _hf_config_from_model_cfg(model_cfg: ModelConfig, vocab_size: int):  # -> Wav2Vec2Config
    from transformers import Wav2Vec2Config

    if isinstance(model_cfg.config, str):
        path = Path(model_cfg.config)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise PhonetuneError(f"model.config: {path} does not exist")
        values = read_json(path, dict, "model.config needs a config.json of Wav2Vec2Config values.")
    else:
        values = dict(model_cfg.config or {})
    if "vocab_size" in values and values["vocab_size"] != vocab_size:
        raise PhonetuneError(
            f"model.config says vocab_size={values['vocab_size']} but the prepared vocab.json has "
            f"{vocab_size} tokens; remove vocab_size from model.config (it comes from the vocabulary)"
        )
    if values.get("pad_token_id", BLANK_ID) != BLANK_ID:
        raise PhonetuneError(
            f"model.config says pad_token_id={values['pad_token_id']}, but the CTC blank is "
            f"{BLANK_TOKEN} = id {BLANK_ID}; remove pad_token_id from model.config"
        )
    values.update(training_settings(model_cfg))
    values.update(vocab_size=vocab_size, pad_token_id=BLANK_ID)
    try:
        return Wav2Vec2Config(**values)
    except (*BUILD_ERRORS, ValueError) as error:
        raise PhonetuneError(f"model.config: {type(error).__name__}: {error}") from None


def read_model_vocab(name_or_path: str) -> dict[str, int] | None:
    """The vocab.json next to a (local or hub) model, or None if it has none."""
    local = Path(name_or_path)
    if local.is_dir():
        path = local / VOCAB_FILE
        if not path.is_file():
            return None
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(
                name_or_path, VOCAB_FILE, _raise_exceptions_for_missing_entries=False
            )
        except OSError:
            return None
        if found is None:
            return None
        path = Path(found)
    raw = read_json(path, dict, "A model's vocab.json maps each token to its id.")
    if raw and all(isinstance(value, dict) for value in raw.values()):
        raise PhonetuneError(
            f"{name_or_path}/vocab.json holds one vocabulary per language; phonetune needs a single "
            "token -> id mapping. Pass model.reset_head=true to start a new output layer."
        )
    from phonetune.data.vocab import load_vocab

    return load_vocab(path)


def transfer_head(
    model: nn.Module, old_vocab: Mapping[str, int], new_vocab: Mapping[str, int]
) -> int:
    """Replace the CTC output layer by one for `new_vocab`, keeping the rows of shared tokens.

    Rows of new tokens are initialised as Hugging Face initialises a Linear layer (normal with
    `initializer_range`, zero bias). Returns how many rows were kept.
    """
    old_head: nn.Linear = model.lm_head
    if old_head.out_features != len(old_vocab):
        raise PhonetuneError(
            f"the checkpoint's CTC output layer has {old_head.out_features} rows but its vocab.json has "
            f"{len(old_vocab)} tokens: the checkpoint and its vocabulary do not belong together"
        )
    new_head = nn.Linear(
        old_head.in_features,
        len(new_vocab),
        dtype=old_head.weight.dtype,
        device=old_head.weight.device,
    )
    kept = 0
    with torch.no_grad():
        new_head.weight.normal_(0.0, model.config.initializer_range)
        new_head.bias.zero_()
        for token, new_id in new_vocab.items():
            old_id = old_vocab.get(token)
            if old_id is not None:
                new_head.weight[new_id] = old_head.weight[old_id]
                new_head.bias[new_id] = old_head.bias[old_id]
                kept += 1
    model.lm_head = new_head
    model.config.vocab_size = len(new_vocab)
    model.config.pad_token_id = BLANK_ID
    return kept


def build_model(model_cfg: ModelConfig, vocab: Mapping[str, int]) -> tuple[nn.Module, str]:
    """A Wav2Vec2ForCTC for `vocab` as `model_cfg` describes; returns (model, how it was made).

    The feature encoder is frozen (always, as in fairseq's wav2vec 2.0 fine-tuning).
    """
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    vocab_size = len(vocab)
    if model_cfg.config is not None:
        config = _hf_config_from_model_cfg(model_cfg, vocab_size)
        config._attn_implementation = model_cfg.attn_implementation
        try:
            model = Wav2Vec2ForCTC(config)
        except (*BUILD_ERRORS, ValueError) as error:
            raise PhonetuneError(
                f"model.config: no model can be built from these values ({type(error).__name__}: "
                f"{error})"
            ) from None
        origin = f"random initialisation from model.config ({_count(model) / 1e6:.1f}M parameters)"
        if model_cfg.feature_encoder_init == "filterbank":
            init_filterbank_encoder(model)
            origin += ", mel filterbank feature encoder"
    else:
        source = model_cfg.name_or_path
        try:
            source_config = Wav2Vec2Config.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise PhonetuneError(
                f"model.name_or_path={source!r} could not be loaded: {error}. Give a local directory with "
                "config.json and weights, or a Hugging Face hub id (needs network or a filled cache)."
            ) from None
        has_head = any("ForCTC" in name for name in (source_config.architectures or []))
        common = dict(
            dtype=torch.float32,
            attn_implementation=model_cfg.attn_implementation,
            **training_settings(model_cfg),
        )
        if has_head and not model_cfg.reset_head:
            old_vocab = read_model_vocab(source)
            if old_vocab is None:
                raise PhonetuneError(
                    f"{source} is a fine-tuned CTC model but has no vocab.json, so its output rows cannot "
                    "be matched to the prepared vocabulary. Put its vocab.json next to it, or pass "
                    "model.reset_head=true to train a new output layer."
                )
            if source_config.vocab_size != len(old_vocab):
                raise PhonetuneError(
                    f"{source}: config.json says vocab_size={source_config.vocab_size} but its vocab.json "
                    f"has {len(old_vocab)} tokens"
                )
            if source_config.pad_token_id != old_vocab.get(BLANK_TOKEN):
                raise PhonetuneError(
                    f"{source}: its blank (pad_token_id={source_config.pad_token_id}) is not {BLANK_TOKEN} "
                    f"(id {old_vocab.get(BLANK_TOKEN)}) of its vocab.json"
                )
            model = load_pretrained(source, **common)
            kept = transfer_head(model, old_vocab, vocab)
            origin = (
                f"fine-tuned CTC model {source}; kept the output rows of {kept} of "
                f"{vocab_size} tokens shared with its vocabulary"
            )
        else:
            model = load_pretrained(
                source,
                vocab_size=vocab_size,
                pad_token_id=BLANK_ID,
                ignore_mismatched_sizes=has_head,
                **common,
            )
            origin = (
                f"pretrained encoder {source} with a new CTC output layer of {vocab_size} tokens"
            )
    check_model_vocab(model, vocab, where=str(model_cfg.name_or_path or "model.config"))
    prepare_for_training(model, model_cfg)
    return model, origin


def init_filterbank_encoder(model: nn.Module, sample_rate: int = SAMPLE_RATE) -> None:
    """Set a one-convolution feature encoder to a bank of mel-spaced band-pass filters.

    Each frequency gets four filters (Hann-windowed cosine and sine, each with both signs): after
    the encoder's GELU, +x and -x together carry |x|, so the layers above can read band energies.
    The weights are a function of the config alone, so the model is still "initialised from a
    config", and the encoder is frozen like every phonetune feature encoder.
    """
    conv = model.wav2vec2.feature_extractor.conv_layers[0].conv
    channels, _, kernel = conv.weight.shape
    bands = channels // 4
    low, high = (2595 * torch.log10(1 + torch.tensor(f) / 700) for f in (60.0, 7600.0))
    mels = torch.linspace(float(low), float(high), bands, dtype=torch.float64)
    freqs = 700 * (10 ** (mels / 2595) - 1)
    t = torch.arange(kernel, dtype=torch.float64) / sample_rate
    window = torch.hann_window(kernel, periodic=False, dtype=torch.float64)
    phase = 2 * torch.pi * freqs[:, None] * t[None, :]
    cos, sin = torch.cos(phase) * window, torch.sin(phase) * window
    cos = cos / cos.norm(dim=1, keepdim=True)
    sin = sin / sin.norm(dim=1, keepdim=True)
    filters = torch.stack([cos, -cos, sin, -sin], dim=1).reshape(channels, 1, kernel)
    with torch.no_grad():
        conv.weight.copy_(filters.to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.zero_()


def load_checkpoint_model(
    checkpoint: str | Path, model_cfg: ModelConfig | None = None
) -> tuple[nn.Module, dict[str, int]]:
    """The model and vocabulary of a training checkpoint (`…/checkpoints/step_<n>`).

    Weights come from `model/model.safetensors`. With `model_cfg`, its training settings (masking,
    dropout, attention kernel) are applied, as when resuming; without, the saved config is used as is
    (export, evaluation). The model is returned in eval mode when `model_cfg` is None.
    """
    from phonetune.train.checkpoint import MODEL_DIR, read_checkpoint_vocab

    checkpoint = Path(checkpoint)
    vocab = read_checkpoint_vocab(checkpoint)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if model_cfg is not None:
        kwargs.update(
            training_settings(model_cfg), attn_implementation=model_cfg.attn_implementation
        )
    # phonetune writes checkpoints as safetensors only: any other weights file there is foreign.
    model = load_pretrained(checkpoint / MODEL_DIR, use_safetensors=True, **kwargs)
    check_model_vocab(model, vocab, where=str(checkpoint))
    if model_cfg is None:
        model.eval()
    else:
        prepare_for_training(model, model_cfg)
    return model, vocab


def check_model_vocab(model: nn.Module, vocab: Mapping[str, int], where: str) -> None:
    problems = []
    if model.config.vocab_size != len(vocab) or model.lm_head.out_features != len(vocab):
        problems.append(
            f"the model has {model.lm_head.out_features} output rows (vocab_size={model.config.vocab_size}) "
            f"but the vocabulary has {len(vocab)} tokens"
        )
    if model.config.pad_token_id != BLANK_ID or vocab.get(BLANK_TOKEN) != BLANK_ID:
        problems.append(
            f"the blank must be {BLANK_TOKEN} = id {BLANK_ID} = pad_token_id "
            f"(model pad_token_id={model.config.pad_token_id})"
        )
    if problems:
        raise PhonetuneError(f"{where}: model and vocabulary disagree: {'; '.join(problems)}")


def prepare_for_training(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Freeze the feature encoder; enable non-reentrant gradient checkpointing if asked."""
    model.freeze_feature_encoder()
    if model_cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs and LayerDrop (the reentrant variant does not).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )


def architecture_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Architecture keys whose values differ between two config.json mappings."""
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in ARCHITECTURE_KEYS
        if saved.get(key) != current.get(key)
    ]


def expected_architecture(model_cfg: ModelConfig, vocab_size: int) -> dict[str, Any] | None:
    """The config.json values `model_cfg` would build (without loading weights), or None if the
    pretrained source's config cannot be read (e.g. offline with an empty cache)."""
    from transformers import Wav2Vec2Config

    if model_cfg.config is not None:
        return _hf_config_from_model_cfg(model_cfg, vocab_size).to_dict()
    try:
        values = Wav2Vec2Config.from_pretrained(model_cfg.name_or_path).to_dict()
    except (OSError, ValueError):
        return None
    values["vocab_size"] = vocab_size
    return values


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, _count(model)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fft_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int
) -> torch.Tensor:
    """`F.conv1d(x, weight, bias, padding=padding, groups=groups)` (stride 1) through real FFTs.

    A convolution layer computes a cross-correlation; with the kernel reversed it is a linear
    convolution, which is a product of spectra once both are zero-padded to at least
    length + kernel - 1 (a power of two: the fastest FFT sizes). The zero padding of the layer is
    then a shift of where the result is read. Same function, float32 rounding apart (~1e-6 of
    the output's scale); on a CPU 2 to 5 times faster than oneDNN's grouped convolution for the
    positional convolution's wide kernels (BENCHMARKS.md, training section).
    """
    batch, _, length = x.shape
    out_channels, per_group, kernel = weight.shape
    if not 0 <= padding <= kernel - 1:
        raise ValueError(f"padding {padding} must be within 0..{kernel - 1}")
    size = 1 << (length + kernel - 2).bit_length()  # the power of two >= length + kernel - 1
    spectrum = torch.fft.rfft(x, n=size).reshape(batch, groups, per_group, -1)
    kernel_spectrum = torch.fft.rfft(weight.flip(-1), n=size)
    kernel_spectrum = kernel_spectrum.reshape(groups, out_channels // groups, per_group, -1)
    product = torch.einsum("bgif,goif->bgof", spectrum, kernel_spectrum)
    full = torch.fft.irfft(product.reshape(batch, out_channels, -1), n=size)
    start = kernel - 1 - padding
    out = full[..., start : start + length + 2 * padding - kernel + 1]
    return out if bias is None else out + bias[:, None]


def _positional_conv_forward(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """The positional convolution: through FFTs for float32 on a CPU, as the layer itself elsewhere
    (cuDNN is fast on GPUs; bf16/fp16 autocast keeps the layer's own precision rules)."""
    # Compiled (train.compile), the layer itself: the FFT size is a function of the length, which
    # would make every new length a new graph.
    eager_fp32_cpu = x.device.type == "cpu" and x.dtype == torch.float32
    if not eager_fp32_cpu or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return conv._conv_forward(x, conv.weight, conv.bias)
    return fft_conv1d(x, conv.weight, conv.bias, conv.padding[0], conv.groups)


def draw_span_mask(
    lengths: torch.Tensor,
    width: int,
    prob: float,
    span: int,
    min_spans: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """SpecAugment spans, drawn on the device: a (rows, width) bool mask.

    The distribution of transformers' `_compute_mask_indices` (fairseq's `compute_mask_indices`):
    row i gets n_i = max(floor(prob * L_i / span + u), min_spans) spans (u ~ U(0, 1), one draw for
    all rows), at most width // span and L_i - span + 1, whose starts are drawn uniformly without
    replacement from 0 .. L_i - span; each masks `span` frames from its start (spans may overlap).
    Drawn with torch from `generator` on the lengths' device, with no value read back to the host.
    """
    rows, device = lengths.shape[0], lengths.device
    noise = torch.rand((), generator=generator, device=device)
    count = torch.floor(prob * lengths / span + noise).long().clamp(min=min_spans)
    count = torch.minimum(count.clamp(max=width // span), (lengths - (span - 1)).clamp(min=0))
    # A random order of the valid starts of each row (invalid ones sorted last); its first n_i.
    positions = torch.arange(width, device=device)
    scores = torch.rand((rows, width), generator=generator, device=device)
    scores = scores.masked_fill(positions > (lengths - span)[:, None], 2.0)
    chosen = (positions < count[:, None]).to(torch.int32)
    starts = torch.zeros((rows, width), dtype=torch.int32, device=device)
    starts.scatter_(1, scores.argsort(dim=1), chosen)
    # Frame t is masked when a span starts in (t - span, t].
    started = starts.cumsum(dim=1)
    return started - F.pad(started, (span, 0))[:, :width] > 0


class CTCModel(nn.Module):
    """The Wav2Vec2ForCTC forward pass for training, with nothing read back to the host.

    The same function as `Wav2Vec2ForCTC` with the same weights (checkpoints and exports are
    transformers' own model): the feature encoder, projection, SpecAugment, the encoder layers and
    the CTC head run in transformers' modules, in the order transformers runs them. phonetune's own
    code is the glue between them, which in transformers waits on the device: SpecAugment draws its
    masks with torch on the model's device (`draw_span_mask`) instead of in NumPy after reading the
    clip lengths back, padded frames are zeroed with `torch.where` instead of boolean indexing, the
    attention mask is built from the lengths, and LayerDrop decides on the host from its own
    generator. Both generators belong to the run (`seed_random`, `random_state`) and are saved with
    every checkpoint, so a resumed run masks and drops layers as the uninterrupted one would.

    The transformer can be frozen (fairseq's freeze_finetune_updates): it then runs under
    `torch.no_grad()` rather than with `requires_grad` flipped, so that the parameters the optimizer
    and DistributedDataParallel registered at start-up stay the same set for the whole run (DDP
    ignores parameters that start frozen and never syncs them once unfrozen). Returns logits only;
    the loss is computed by the training loop (fp32, token-normalised).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        if getattr(model.config, "add_adapter", False):
            raise PhonetuneError(
                "this model has an adapter after its encoder (config add_adapter=true), which "
                "phonetune does not train; start from a model without one"
            )
        # Group-norm feature encoders (wav2vec2-base) were trained without attention masks and
        # expect zero-padded input only; layer-norm ones (XLSR) need the mask.
        self.use_attention_mask = model.config.feat_extract_norm == "layer"
        # The same weights and function, a faster algorithm on CPUs (see fft_conv1d). Only this
        # training wrapper uses it; exported models keep transformers' own layer.
        conv = model.wav2vec2.encoder.pos_conv_embed.conv
        if conv.stride == (1,) and conv.dilation == (1,):
            conv.forward = functools.partial(_positional_conv_forward, conv)
        self._cudagraphs = False  # compile_blocks("reduce-overhead")
        self.run_every_layer = False  # LayerDrop by torch.where (see _layers_to_run)
        self.seed_random(0)

    # --- the run's generators ---------------------------------------------------------------------
    def seed_random(self, seed: int) -> None:
        """Seed the SpecAugment masks (a torch generator on the model's device, made at first use)
        and LayerDrop (a host generator)."""
        self._mask_seed = seed
        self._mask_generator: torch.Generator | None = None
        self._pending_mask_state: torch.Tensor | None = None
        self._layer_rng = random.Random(seed)

    def random_state(self) -> dict[str, Any]:
        """Both generators' states, as tensors and plain containers (for rng_state_<rank>.pt)."""
        masks = self._mask_generator
        return {
            "mask_seed": self._mask_seed,
            "masks": masks.get_state() if masks is not None else self._pending_mask_state,
            "layers": self._layer_rng.getstate(),
        }

    def set_random_state(self, state: dict[str, Any]) -> None:
        self.seed_random(int(state["mask_seed"]))
        self._pending_mask_state = state["masks"]
        version, internal, gauss = state["layers"]
        self._layer_rng.setstate((version, tuple(internal), gauss))

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._mask_generator
        if generator is None or generator.device != device:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._mask_seed)
            if self._pending_mask_state is not None:
                try:
                    generator.set_state(self._pending_mask_state)
                except RuntimeError:  # saved on another kind of device: the masks start afresh
                    warnings.warn(
                        "the checkpoint's SpecAugment generator belongs to another kind of device; "
                        "masking continues from a fresh seed",
                        stacklevel=2,
                    )
                self._pending_mask_state = None
            self._mask_generator = generator
        return generator

    # --- the forward pass --------------------------------------------------------------------------
    def forward(
        self,
        input_values: torch.Tensor,
        input_lengths: torch.Tensor,
        freeze_transformer: bool = False,
    ) -> torch.Tensor:
        wav2vec2 = self.model.wav2vec2
        if self._cudagraphs:  # a new pass: CUDA graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        features = wav2vec2.feature_extractor(input_values).transpose(1, 2)
        frames = self.output_lengths(input_lengths)
        valid = None
        if self.use_attention_mask:
            valid = torch.arange(features.shape[1], device=frames.device) < frames[:, None]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_transformer):
            hidden, _ = wav2vec2.feature_projection(features)
            hidden = self.spec_augment(hidden, frames if valid is not None else None)
            hidden = self.encode(hidden, valid)
        return self.model.lm_head(self.model.dropout(hidden))

    def spec_augment(self, hidden: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """Time masks (the learned mask embedding over spans of frames), then feature masks (zeros
        over spans of channels), as transformers' `_mask_hidden_states` applies them."""
        config = self.model.config
        if not self.training or not getattr(config, "apply_spec_augment", True):
            return hidden
        rows, length, channels = hidden.shape
        if config.mask_time_prob > 0:
            if frames is None:  # no attention mask: every row counts as the whole padded length
                frames = torch.full((rows,), length, device=hidden.device)
            mask = draw_span_mask(
                frames,
                length,
                config.mask_time_prob,
                config.mask_time_length,
                config.mask_time_min_masks,
                self._generator(hidden.device),
            )
            embedding = self.model.wav2vec2.masked_spec_embed.to(hidden.dtype)
            hidden = torch.where(mask[..., None], embedding, hidden)
        if config.mask_feature_prob > 0:
            mask = draw_span_mask(
                torch.full((rows,), channels, device=hidden.device),
                channels,
                config.mask_feature_prob,
                config.mask_feature_length,
                config.mask_feature_min_masks,
                self._generator(hidden.device),
            )
            hidden = hidden.masked_fill(mask[:, None, :], 0.0)
        return hidden

    def encode(self, hidden: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """transformers' Wav2Vec2Encoder (post-norm, wav2vec2-base) or ...StableLayerNorm (pre-norm,
        XLSR): padded frames zeroed and not attended to, the positional convolution, the layers
        (each skipped with probability layerdrop while training), the final layer norm."""
        encoder, config = self.model.wav2vec2.encoder, self.model.config
        attention_mask = None
        if valid is not None:
            hidden = torch.where(valid[..., None], hidden, 0.0)
            attention_mask = self._attention_mask(valid, hidden.dtype)
        hidden = hidden + encoder.pos_conv_embed(hidden)
        stable = config.do_stable_layer_norm
        if not stable:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)
        for layer, keep in self._layers_to_run(encoder.layers, hidden.device):
            output = layer(hidden, attention_mask=attention_mask)
            output = output[0] if isinstance(output, tuple) else output  # a tuple before v5
            hidden = output if keep is None else torch.where(keep, output, hidden)
        return encoder.layer_norm(hidden) if stable else hidden

    def _attention_mask(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(rows, 1, 1, frames): which keys each query may attend to. SDPA takes it as booleans;
        the eager attention adds it to its scores."""
        mask = valid[:, None, None, :]
        if self.model.config._attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )

    def _layers_to_run(
        self, layers: nn.ModuleList, device: torch.device
    ) -> list[tuple[nn.Module, torch.Tensor | None]]:
        """The layers to run, each with None (its output is kept) or a bool tensor (keep its output
        where true, else its input).

        LayerDrop while training: each layer is kept with probability 1 - layerdrop, drawn on the
        host from the run's generator (no device read). Dropped layers are skipped, unless
        `run_every_layer` (CUDA graphs): then every layer runs and a dropped one's output is
        discarded by `torch.where`, so that each step replays the same graphs in the same order
        (CUDA graph trees record a new path for every new sequence of layers). That costs the
        dropped layers' compute (layerdrop, 10% in the recipe) and gives their weights a zero
        gradient instead of none: AdamW then decays their moments and moves them by their momentum,
        as fairseq's fp16 optimizer (flat gradients, zero where none) did. Both ways draw the same
        numbers, so they drop the same layers."""
        drop = self.model.config.layerdrop
        if not self.training or drop <= 0:
            return [(layer, None) for layer in layers]
        kept = [self._layer_rng.random() >= drop for _ in layers]
        if not self.run_every_layer:
            return [(layer, None) for layer, keep in zip(layers, kept, strict=True) if keep]
        flags = torch.tensor(kept)
        if device.type == "cuda":  # a copy from pinned memory does not wait for the device
            flags = flags.pin_memory().to(device, non_blocking=True)
        return [(layer, flags[i]) for i, layer in enumerate(layers)]

    @property
    def conv_layers(self) -> tuple[tuple[int, int], ...]:
        return ctc.conv_layers(self.model.config)

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """CTC frames the encoder produces for inputs of `input_lengths` samples."""
        return ctc.count_frames(input_lengths, self.conv_layers).to(torch.long)

    def evaluating(self) -> contextlib.AbstractContextManager:
        """Around evaluation passes: under CUDA graphs ("reduce-overhead") the compiled blocks run
        eagerly. Dev batches take every width (no grid), and each new shape would record graphs
        of its own, kept for the rest of the run in time and GPU memory; the training step's
        graphs are left as they are. Other compile modes evaluate compiled."""
        if self._cudagraphs:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    @classmethod
    def for_training(cls, model: nn.Module, compile: bool | str = False) -> CTCModel:
        """The wrapper, its blocks compiled as `train.compile` says (false, true or a mode)."""
        module = cls(model)
        if compile:
            module.compile_blocks("default" if compile is True else compile)
        return module

    def compile_blocks(self, mode: str) -> None:
        """torch.compile each block of the forward pass in place (parameter names unchanged): the
        feature encoder and projection, every encoder layer, the head. Regions rather than the
        whole pass: LayerDrop chooses layers per step, and every encoder layer shares one compiled
        graph; under CUDA graphs ("reduce-overhead") every layer runs (`run_every_layer`). The
        positional convolution stays eager: inductor's backward of a grouped convolution fixes the
        length, so every new batch width would compile it again."""
        wav2vec2 = self.model.wav2vec2
        graphed = [wav2vec2.feature_projection, *wav2vec2.encoder.layers, self.model.lm_head]
        # CUDA graphs ("reduce-overhead") own their outputs until the next replay: the frozen
        # feature encoder, whose output the projection keeps for its backward, is compiled plain.
        self._cudagraphs = "reduce-overhead" in mode
        self.run_every_layer = self._cudagraphs
        wav2vec2.feature_extractor.compile(dynamic=True)
        for block in graphed:
            # dynamic: one graph for every batch shape, instead of a static one first and a
            # dynamic one at the second shape (CUDA graphs are still recorded per shape)
            block.compile(mode=None if mode == "default" else mode, dynamic=True)
