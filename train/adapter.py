"""LoRA adapters (`model.adapter: lora`): teach a trained model a new language in a few steps.

The model of `model.name_or_path` (an earlier export) is loaded as for any fine-tuning, its CTC
output layer extended by the prepared vocabulary's new phones (existing rows kept), then peft puts
a low-rank update (alpha / rank) * B @ A beside each targeted linear layer. Only those updates and
the output layer are trained; everything else stays as the base model had it.

Checkpoints stay plain transformers folders: `model/` holds the *merged* weights (W + the update),
so evaluation, export, averaging and transcription need not know an adapter was used, and the
exported folder is a Wav2Vec2ForCTC like any other. Each checkpoint also keeps the trained tensors
under their live names in `adapter.safetensors` (with a digest of the frozen base weights): a resumed
run rebuilds the base from `model.name_or_path`, adds them back, and continues exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from phonetune.data.errors import PhonetuneError
from phonetune.train.checkpoint import ADAPTER_FILE
from phonetune.train.config import ModelConfig

LORA_NAME = "default"  # peft's name for a model's one adapter
_LORA_A, _LORA_B, _BASE = f".lora_A.{LORA_NAME}.", f".lora_B.{LORA_NAME}.", ".base_layer."


def add_adapter(model: nn.Module, model_cfg: ModelConfig) -> str:
    """Insert the LoRA layers in place and leave only them and the output layer trainable; returns
    a description for the run summary."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=model_cfg.adapter_rank,
        lora_alpha=model_cfg.adapter_alpha,
        target_modules=list(model_cfg.adapter_target_modules),
        lora_dropout=0.0,  # the model's own dropout settings still apply around the layers
        bias="none",
    )
    inject_adapter_in_model(lora, model, adapter_name=LORA_NAME)  # freezes all other parameters
    model.lm_head.requires_grad_(True)
    adapted = sum(1 for name, _ in model.named_modules() if name.endswith(_LORA_A.rstrip(".")))
    return (
        f"LoRA adapter, rank {model_cfg.adapter_rank}, alpha {model_cfg.adapter_alpha:g}, on "
        f"{adapted} linear layers ({', '.join(model_cfg.adapter_target_modules)}); the output "
        "layer trained whole, the rest frozen"
    )


def is_adapter_weight(name: str) -> bool:
    return _LORA_A in name or _LORA_B in name


def merge_adapter_weights(
    weights: Mapping[str, torch.Tensor], model_cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The Wav2Vec2ForCTC weights (plain names) with each LoRA update folded into its layer.

    Works on the name-keyed weights every parallel mode gathers for a checkpoint, so FSDP shards and
    the live model are never modified. The update is computed in float32 whatever the weights' type.
    """
    scale = model_cfg.adapter_alpha / model_cfg.adapter_rank
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if is_adapter_weight(name):
            continue
        if name.endswith(_BASE + "weight"):
            prefix = name.removesuffix(_BASE + "weight")
            a = weights[prefix + _LORA_A + "weight"].float()
            b = weights[prefix + _LORA_B + "weight"].float()
            tensor = (tensor.float() + scale * (b @ a)).to(tensor.dtype)
        merged[name.replace(_BASE, ".")] = tensor
    return merged


def digest_base(weights: Mapping[str, torch.Tensor], trainable: set[str]) -> str:
    """SHA-256 of the frozen weights (names and values): a resumed run must start from the same
    base model, or the saved adapter would be added to different weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        if name in trainable or is_adapter_weight(name):
            continue
        digest.update(name.encode())
        digest.update(
            weights[name]
            .detach()
            .cpu()
            .contiguous()
            .reshape(-1)
            .view(torch.uint8)
            .numpy()
            .tobytes()
        )
    return digest.hexdigest()


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_adapter(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    trainable: set[str],
    model_cfg: ModelConfig,
    base_sha256: str,
) -> None:
    """The trained tensors under their live names, and what they were trained on (`base_sha256`:
    `digest_base` of the frozen weights)."""
    from safetensors.torch import save_file

    tensors = {name: weights[name].detach().cpu().contiguous() for name in sorted(trainable)}
    metadata = {"base": str(model_cfg.name_or_path), "base_sha256": base_sha256}
    save_file(tensors, str(path), metadata=metadata)


def load_adapter(model: nn.Module, checkpoint: Path) -> None:
    """Put a checkpoint's trained tensors back into a model just built with `add_adapter`, after
    checking that its frozen weights are the base the adapter was trained on."""
    from safetensors import SafetensorError, safe_open

    path = checkpoint / ADAPTER_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            saved = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except FileNotFoundError:
        raise PhonetuneError(
            f"{checkpoint} has no {ADAPTER_FILE}: it was not written by a run with model.adapter "
            "set, so it cannot be resumed as one"
        ) from None
    except (SafetensorError, OSError) as error:
        raise PhonetuneError(
            f"{path} is damaged ({error}); resume from another checkpoint"
        ) from None
    state = model.state_dict()
    trainable = trainable_names(model)
    if set(saved) != trainable or any(saved[n].shape != state[n].shape for n in saved):
        raise PhonetuneError(
            f"{path} does not fit the adapter of this config (its {len(saved)} tensors against "
            f"{len(trainable)} here): model.adapter_rank or adapter_target_modules changed since "
            "it was saved"
        )
    if metadata.get("base_sha256") != digest_base(state, trainable):
        raise PhonetuneError(
            f"{path}: the base model's weights differ from those the adapter was trained on "
            f"({metadata.get('base', 'unknown')}); resume with the same model.name_or_path contents"
        )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in saved:
                parameter.copy_(saved[name])
