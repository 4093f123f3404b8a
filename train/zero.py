"""DeepSpeed ZeRO stage 2 under `phonetune train` (`configs/accelerate/deepspeed_zero2_8gpu.yaml`).

ZeRO-2 keeps whole weights on every process (in bf16 with mixed precision) and shards the fp32
master weights, the Adam moments and the reduced gradients. phonetune keeps what it owns:

- accumulation: the loop tells the engine which backward closes the step
  (`set_gradient_accumulation_boundary`) and passes losses already normalised by the step's global
  token count (`backward(scale_wrt_gas=False)`), so the DeepSpeed config's own accumulation stays 1;
- clipping at `train.max_grad_norm` and skipping a step whose gradient is NaN/inf: the engine does
  both in `step()` (its overflow check is a collective, so every process skips the same steps), and
  reports the norm before clipping, as the other launchers do;
- the learning-rate schedule: phonetune's scheduler, stepped after skipped steps too;
- checkpoints: the same files as under DDP and FSDP. `model.safetensors` holds the fp32 master
  weights (not the bf16 copies the forward pass used) and `optimizer.pt` the name-keyed Adam state
  of every parameter, assembled from the shards (DeepSpeed's `safe_get_full_*`), so a run saved
  under ZeRO-2 continues under DDP, FSDP or one process, and the other way round.

Two differences from the other launchers, both from ZeRO's flat fp32 partitions: one Adam step
count per parameter group, and parameters without a gradient in a step (the transformer during
`train.freeze_finetune_updates`) take an update with a zero gradient. With weight decay 0 (the
recipe) such an update leaves them unchanged, but their step count still advances: once they
unfreeze, their moments start from zero without the early-step bias correction, so their first
updates are larger than under DDP (as in fairseq's FP16Optimizer, which zero-fills the missing
gradients of its flat fp32 copy). Weight decay during a frozen phase would shrink frozen weights, so
that combination is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from data.errors import PhonetuneError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from train.config import Config


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def check_deepspeed_launch(accelerator: Accelerator, config: Config) -> None:
    """ZeRO stage 2 without offload; phonetune's config decides accumulation and clipping.

    Fills the DeepSpeed config's batch fields, which Accelerate would otherwise take from a
    DataLoader's fixed batch size (phonetune's batches are cut by duration, so the number is
    nominal: DeepSpeed uses it only to count samples).
    """
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    problems = []
    if zero.get("stage") != 2:
        problems.append(
            f"zero_optimization.stage is {zero.get('stage')}: phonetune train runs ZeRO stage 2 "
            "(set zero_stage: 2; for sharded weights use FSDP, configs/accelerate/fsdp_8gpu.yaml)"
        )
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in (None, "none"):
            problems.append(
                f"zero_optimization.{part}.device is {device}: offload is not supported"
            )
    if zero.get("compute_grad_norm") is False:
        problems.append("zero_optimization.compute_grad_norm is false: the gradient norm is needed")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(
                f"the DeepSpeed config has a {key!r} section: phonetune builds its own from the "
                "train.* settings; remove the section"
            )
    accumulation = ds.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        problems.append(
            f"gradient_accumulation_steps is {accumulation}: set it to 1 in the Accelerate config and "
            f"use train.grad_accum={accumulation} instead"
        )
    clipping = ds.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != config.train.max_grad_norm:
        problems.append(
            f"gradient_clipping is {clipping} but train.max_grad_norm is "
            f"{config.train.max_grad_norm:g}: remove gradient_clipping from the Accelerate config "
            "(phonetune's train.max_grad_norm decides)"
        )
    if (
        ds.get("fp16", {}).get("enabled") in (True, "true")
        or config.train.mixed_precision == "fp16"
    ):
        problems.append(
            "fp16 is not supported under DeepSpeed (its loss scale is not kept in phonetune's "
            "checkpoints, so a resumed run would differ); use train.mixed_precision=bf16"
        )
    if ds.get("bf16", {}).get("check_grad_overflow") is False:
        problems.append(
            "bf16.check_grad_overflow is false: steps with a NaN/inf gradient must be skipped"
        )
    # ZeRO-2 reduces gradients in buckets filled as backward reaches each parameter: processes
    # skipping different layers would fill different buckets and reduce mismatched tensors.
    if config.model.layerdrop > 0:
        problems.append(
            f"model.layerdrop={config.model.layerdrop:g}: processes would skip different layers "
            "and reduce mismatched gradient buckets; set model.layerdrop=0"
        )
    if config.train.freeze_finetune_updates > 0 and config.train.weight_decay > 0:
        problems.append(
            "train.weight_decay > 0 with train.freeze_finetune_updates > 0: ZeRO updates the frozen "
            "transformer with a zero gradient, so weight decay would shrink it; set "
            "train.weight_decay=0 (the recipe's)"
        )
    if problems:
        raise PhonetuneError(
            "this DeepSpeed launch cannot run phonetune train:\n  - "
            + "\n  - ".join(problems)
            + "\n(or launch with DDP: configs/accelerate/8gpu_ddp.yaml)"
        )
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = config.train.max_grad_norm  # 0: no clipping, as train.max_grad_norm
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["train_batch_size"] = accelerator.num_processes


def trainable_fp32_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights before DeepSpeed casts the model to bf16 (CPU, fp32)."""
    return {
        name: parameter.detach().to("cpu", torch.float32, copy=True)
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }


def set_fp32_masters(engine: Any, weights: dict[str, torch.Tensor]) -> None:
    """Start the fp32 master weights from `weights` instead of the bf16-rounded model.

    DeepSpeed builds its masters from the model it was given, after casting it to bf16: a fresh
    run would start from pretrained weights rounded to 8 bits of mantissa and a resumed one would
    lose the masters' precision. Every process calls this (each sets its own shard).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    for name, parameter in engine.module.named_parameters():
        if name in weights:
            safe_set_full_fp32_param(parameter, weights[name].to(parameter.device))


def step(engine: Any) -> tuple[float, bool]:
    """Reduce, clip and update (or skip a non-finite step); the gradient norm before clipping and
    whether the step was skipped."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm), not engine.was_step_applied()


def gather_state(engine: Any, keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Whole fp32 weights (CTCModel names) and the name-keyed Adam state, as
    torch.distributed.checkpoint's full optimizer state dict lays it out, on the CPU.

    Every process calls this (each parameter is assembled from all shards by a collective); only
    where `keep` (the process that writes) are the results kept, elsewhere both dicts are empty.
    """
    from deepspeed.utils import (
        lazy_init_hp_params_optimizer_state,
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
    )

    zero, adam = engine.optimizer, engine.optimizer.optimizer
    names = {id(parameter): name for name, parameter in engine.module.named_parameters()}
    # Frozen parameters and buffers as the forward pass used them (bf16 under bf16).
    weights = {
        name: tensor.detach().to("cpu", torch.float32)
        for name, tensor in (engine.module.state_dict().items() if keep else ())
    }
    state: dict[str, dict[str, torch.Tensor]] = {}
    groups = []
    for index, group in enumerate(adam.param_groups):
        members = zero.bit16_groups[index]
        flat = zero.single_partition_of_fp32_groups[index]
        flat_state = adam.state.get(flat, {})
        if "step" in flat_state:
            # DeepSpeed 0.19 links each parameter to its slice of the Adam state once, after the
            # first group's first update, when the other groups have no state yet: link them now.
            lazy_init_hp_params_optimizer_state(members, flat, adam.state)
        for parameter in members:
            name = names[id(parameter)]
            weight = safe_get_full_fp32_param(parameter)
            moments = {  # none before the first update
                key: safe_get_full_optimizer_state(parameter, key)
                for key in ("exp_avg", "exp_avg_sq")
                if "step" in flat_state
            }
            if not keep:
                continue
            weights[name] = weight.cpu()
            if moments:
                step = flat_state["step"].detach().cpu().clone()
                state[name] = {"step": step, **{k: v.cpu() for k, v in moments.items()}}
        settings = {key: value for key, value in group.items() if key != "params"}
        groups.append({**settings, "params": [names[id(parameter)] for parameter in members]})
    return weights, {"state": state, "param_groups": groups} if keep else {}


def restore_optimizer(engine: Any, saved: dict[str, Any]) -> None:
    """Load a name-keyed Adam state (from any launcher) into ZeRO's shards.

    A parameter the saved state lacks (it had no gradient yet under DDP) starts with zero moments;
    each group takes the largest step count saved for its members (ZeRO keeps one per group).
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

    zero, adam = engine.optimizer, engine.optimizer.optimizer
    names = {id(parameter): name for name, parameter in engine.module.named_parameters()}
    saved_groups = {frozenset(group["params"]): group for group in saved.get("param_groups", [])}
    for index, group in enumerate(adam.param_groups):
        members = zero.bit16_groups[index]
        member_names = [names[id(parameter)] for parameter in members]
        saved_group = saved_groups.get(frozenset(member_names))
        if saved_group is None:
            raise PhonetuneError(
                "the checkpoint's optimizer groups do not match this model's trainable parameters "
                "(was the model or model.freeze_feature_encoder changed?)"
            )
        group.update({key: value for key, value in saved_group.items() if key != "params"})
        steps = [
            float(saved["state"][name]["step"]) for name in member_names if name in saved["state"]
        ]
        if not steps:
            continue
        flat = zero.single_partition_of_fp32_groups[index]
        adam.state[flat] = {
            "step": torch.tensor(max(steps), dtype=torch.float32, device=flat.device),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
        lazy_init_hp_params_optimizer_state(members, flat, adam.state)
        for parameter, name in zip(members, member_names, strict=True):
            if name in saved["state"]:
                for key in ("exp_avg", "exp_avg_sq"):
                    value = saved["state"][name][key].to(flat.device, torch.float32)
                    safe_set_full_optimizer_state(parameter, value, key)
