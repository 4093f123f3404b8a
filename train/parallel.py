"""How the training processes share the work: one process, DDP, FSDP version 2 or DeepSpeed ZeRO-2.

The one module that tells them apart. `Parallel` builds the Accelerator from the launcher's settings,
refuses what cannot work with the fix named, and does each backend's part of a step (preparing the
model, accumulating, backward, the clipped update, gathering and restoring the whole training state
for checkpoints), so the training loop has no backend branches.

- DDP (and one process): gradients are averaged over processes in the last backward of a step.
- FSDP version 2 (`configs/accelerate/fsdp_8gpu.yaml`, torch's `fully_shard`): each process holds a
  shard of every weight; a forward pass is a collective, so evaluation keeps processes in step, and
  LayerDrop and fp16 are refused (see `check_fsdp_launch`).
- DeepSpeed ZeRO-2 (`configs/accelerate/deepspeed_zero2_8gpu.yaml`): whole bf16 weights on every
  process, the fp32 masters, Adam moments and reduced gradients sharded. phonetune drives the engine
  and keeps what it owns: accumulation (the loop tells the engine which backward closes the step,
  `set_gradient_accumulation_boundary`, and passes losses already normalised by the step's global
  token count, `backward(scale_wrt_gas=False)`), the learning-rate schedule, and checkpoints in the
  same files as the other launchers (`model.safetensors` = fp32 masters, a name-keyed Adam state
  assembled from the shards), so a run saved under one launcher continues under any other. The
  engine clips at `train.max_grad_norm` and skips a NaN/inf step on every process together.
  Two differences from the others, both from ZeRO's flat fp32 partitions: one Adam step count per
  parameter group, and parameters without a gradient in a step (the transformer during
  `train.freeze_finetune_updates`) take an update with a zero gradient. With weight decay 0 (the
  recipe) that leaves them unchanged but advances their step count: once they unfreeze, their
  moments start from zero without the early-step bias correction, so their first updates are larger
  than under DDP (as in fairseq's FP16Optimizer). Weight decay during a frozen phase is refused.

Also `cpu_launch_processes`: `accelerate launch --cpu --num_processes N` starts a single process
unless MPI is set up; `python -m phonetune` reads the launcher's count and starts N with torchrun.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from phonetune.data.errors import PhonetuneError
from phonetune.train.masters import MasterWeights

if TYPE_CHECKING:
    from accelerate import Accelerator

    from phonetune.train.config import Config

# Set by an MPI or torchrun launcher: this process is already one of several.
_GROUP_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class Parallel:
    """This process's place among the training processes, and each backend's part of a step."""

    def __init__(self, accelerator: Accelerator, bf16_weights: bool = False) -> None:
        self.accelerator = accelerator
        # train.mixed_precision=bf16-weights: the fp32 masters, made by `prepare`
        self.bf16_weights = bf16_weights
        self.masters: MasterWeights | None = None
        kind = accelerator.distributed_type.name
        self.fsdp = kind == "FSDP"
        self.deepspeed = kind == "DEEPSPEED"
        self.device: torch.device = accelerator.device
        self.num_processes: int = accelerator.num_processes
        self.process_index: int = accelerator.process_index
        self.is_main: bool = accelerator.is_main_process
        self.print = accelerator.print  # on the main process only
        self._host_group = None  # for agreeing on host values (`max`)

    # --- processes -------------------------------------------------------------------------------
    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process (collective)."""
        return self.max(1 if flag else 0) > 0

    def max(self, value: int) -> int:
        """The largest `value` over the processes (collective). Through a gloo group on the CPUs:
        agreeing on a host value never waits for the device's queue of work."""
        if self.num_processes == 1:
            return value
        import torch.distributed as dist

        if self._host_group is None:
            gloo = dist.get_backend() == "gloo"
            self._host_group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._host_group)
        return int(tensor[0])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the processes (collective, stays on the device)."""
        return tensor if self.num_processes == 1 else self.accelerator.reduce(tensor, "sum")

    def gather_objects(self, items: list) -> list:
        """Every process's `items`, concatenated in process order (collective)."""
        if self.num_processes == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def describe(self) -> str:
        sharding = ""
        if self.fsdp:
            sharding = ", FSDP (weights and optimizer state sharded)"
        elif self.deepspeed:
            sharding = ", DeepSpeed ZeRO-2 (optimizer state and gradients sharded)"
        return f"{self.num_processes} on {self.device.type}{sharding}"

    @property
    def equal_eval_batches(self) -> bool:
        """Whether every process must run the same number of evaluation batches: under FSDP each
        forward pass gathers the weights from all processes."""
        return self.fsdp

    # --- the model and its update ----------------------------------------------------------------
    def check_model(self, module: torch.nn.Module) -> None:
        if self.fsdp:
            check_fsdp_wrapping(self.accelerator, module)

    def prepare(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        # DeepSpeed casts the model to bf16 and builds its fp32 masters from that: keep them exact.
        fp32_weights = _trainable_fp32_weights(module) if self.deepspeed else None
        if self.bf16_weights:  # the optimizer's parameters become the masters, on the device
            module.to(self.device)
            self.masters = MasterWeights(module)
        module, optimizer = self.accelerator.prepare(module, optimizer)
        if self.masters is not None:
            self.masters.rebind()
        if fp32_weights is not None:
            _set_fp32_masters(module, fp32_weights)
        return module, optimizer

    def unwrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The model inside the backend's wrapper. Accelerate's `unwrap_model` imports DeepSpeed
        whenever it is installed (and DeepSpeed prints a warning on a machine without a GPU), so
        the other backends unwrap here: DDP wraps, FSDP version 2 changes the module in place."""
        if self.deepspeed:
            return self.accelerator.unwrap_model(module)
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        return getattr(module, "_orig_mod", module)  # a whole-model torch.compile (Accelerate's)

    def input_dtype(self, module: torch.nn.Module) -> torch.dtype:
        """The dtype the model's weights are in, for the audio fed to it: fp32, except under
        DeepSpeed with bf16, which casts the model itself instead of using autocast."""
        return next(self.unwrap(module).parameters()).dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def accumulating(self, module: torch.nn.Module, last: bool) -> Iterator[None]:
        """Around one batch's forward and backward: gradients are reduced across processes only in
        the last backward of a step."""
        if self.deepspeed:
            module.set_gradient_accumulation_boundary(last)
        with contextlib.nullcontext() if last else self.accelerator.no_sync(module):
            yield

    def backward(self, module: torch.nn.Module, loss: torch.Tensor) -> None:
        """Backward of a loss already normalised over the whole step (no 1/grad_accum scaling)."""
        if self.deepspeed:
            module.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def update(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip to `max_grad_norm` (0: no clipping) and update unless the gradient is NaN/inf;
        returns the norm before clipping and whether the update was skipped, as device tensors.

        One process and DDP read nothing back: the fused AdamW kernel takes the clipping as its
        `grad_scale` (it divides every gradient by it) and skips the whole update, step count
        included, when `found_inf` is 1, as it does for a loss scaler. DDP's gradients are whole on
        every process, so every process computes the same norm and skips the same steps. FSDP,
        DeepSpeed and fp16 (a loss scaler) decide on the host, as their libraries do. With bf16
        weights the optimizer steps the fp32 masters, and the masters, rounded, then become the
        weights (train/masters.py).
        """
        if self.deepspeed:
            return self._tensors(*_deepspeed_step(module))
        if self.fsdp or self.accelerator.scaler is not None:
            return self._tensors(*self._update_on_host(module, optimizer, max_grad_norm))
        if self.masters is not None:
            grads = self.masters.collect_gradients()
        else:
            grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        found_inf = (~torch.isfinite(norm)).to(torch.float32)  # the fused kernels take float32
        inner = _torch_optimizer(optimizer)
        inner.found_inf = found_inf
        if max_grad_norm > 0:
            # torch's clip_grad_norm_ factor, max_norm / (norm + 1e-6), as the kernel's divisor
            inner.grad_scale = ((norm + 1e-6) / max_grad_norm).clamp(min=1.0).float()
        try:
            inner.step()
        finally:
            inner.found_inf = inner.grad_scale = None
        if self.masters is not None:
            self.masters.publish()
        return norm, found_inf.bool()

    def _update_on_host(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float
    ) -> tuple[float, bool]:
        parameters = [p for p in module.parameters() if p.requires_grad]
        max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(parameters, max_norm)
        if hasattr(
            grad_norm, "full_tensor"
        ):  # under FSDP a DTensor: the norm of the whole gradient
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(grad_norm))
        skipped = not finite
        if finite or self.accelerator.scaler is not None:
            optimizer.step()  # with fp16 the grad scaler skips an overflowing step and lowers its scale
            skipped = skipped or self.accelerator.optimizer_step_was_skipped
        return float(grad_norm), skipped

    def _tensors(self, norm: float, skipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(norm, dtype=torch.float32, device=self.device),
            torch.tensor(skipped, device=self.device),
        )

    # --- checkpoints -----------------------------------------------------------------------------
    def gather_state(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The whole model weights (Wav2Vec2ForCTC names) and optimizer state, on the main process.

        Every process must call this: under FSDP and ZeRO-2 both are gathered from the shards. The
        optimizer state is keyed by parameter name, not position, so a checkpoint resumes under one
        process, DDP, FSDP or ZeRO-2 alike.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.deepspeed:
            weights, optimizer_state = _deepspeed_gather_state(module, keep=self.is_main)
        elif self.masters is not None:  # the fp32 masters (copied: they are views of one buffer)
            holder = self.masters.holder
            weights = {n: t.detach().to("cpu", copy=True) for n, t in holder.state_dict().items()}
            optimizer_state = get_optimizer_state_dict(
                holder, _torch_optimizer(optimizer), options=whole
            )
        else:
            # (Accelerate's get_state_dict would import DeepSpeed, see `unwrap`.)
            weights = (
                get_model_state_dict(module, options=whole)
                if self.fsdp
                else self.unwrap(module).state_dict()
            )
            optimizer_state = get_optimizer_state_dict(
                module,
                _torch_optimizer(optimizer),
                options=whole,
            )
        # CTCModel names: "model." + Wav2Vec2ForCTC's
        return {name.removeprefix("model."): t for name, t in weights.items()}, optimizer_state

    def restore_optimizer(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        saved: dict[str, Any],
        path: Any,
    ) -> None:
        """Load a name-keyed optimizer state (see gather_state), sharding it under FSDP or ZeRO-2."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if any(isinstance(key, int) for key in saved.get("state", {})):
            raise PhonetuneError(
                f"{path}/optimizer.pt keys its state by position (a phonetune before FSDP support "
                "wrote it), and this version cannot continue from it. Export it (phonetune export) "
                "and start a new run from the export with model.name_or_path=EXPORT_DIR."
            )
        if self.deepspeed:
            _deepspeed_restore_optimizer(module, saved)
            return
        inner = _torch_optimizer(optimizer)
        # (bf16 weights: the optimizer's parameters are the masters, named as the model's)
        named = self.unwrap(module) if self.masters is None else self.masters.holder
        # Not strict: a parameter that had no gradient before the checkpoint (the transformer
        # during train.freeze_finetune_updates, a layer LayerDrop always skipped) has no state
        # in it, and torch would refuse it. Before 2.10 torch raises a KeyError for such a
        # trainable parameter even when not strict: it is frozen for the call, so torch skips it.
        unsaved = [
            parameter
            for name, parameter in named.named_parameters()
            if parameter.requires_grad and name not in saved["state"]
        ]
        for parameter in unsaved:
            parameter.requires_grad_(False)
        try:
            set_optimizer_state_dict(
                module if self.masters is None else named,
                inner,
                optim_state_dict=saved,
                options=StateDictOptions(full_state_dict=True, strict=False),
            )
        finally:
            for parameter in unsaved:
                parameter.requires_grad_(True)
        # torch first gives every parameter a state (a zero-gradient step at lr 0, step count 1):
        # those the checkpoint had none for start again without one, as in the run that went on,
        # or their first real update would be bias-corrected as a second one.
        for name, parameter in named.named_parameters():
            if name not in saved["state"]:
                inner.state.pop(parameter, None)


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's AcceleratedOptimizer


# --- building the accelerator ---------------------------------------------------------------------
def exit_launched_process() -> None:
    """End a launched process (one of several) now that its run is over: flush what it wrote and
    leave without the interpreter's shutdown.

    On that shutdown, C++ threads of the process group (gloo's, and under DeepSpeed its own) are
    destroyed while still holding work whose release needs a Python that is being torn down: the
    process then dies with SIGABRT ("terminate called without an active exception") after the run
    has finished and its last checkpoint is committed, and the launcher reports the run as failed
    (pytorch/pytorch#179291). It happened in 3 of 5 full test runs on 2026-12-07, under DDP and
    ZeRO-2, and destroying the process group first did not prevent it under ZeRO-2. Every
    collective is done by then (the last checkpoint's save waits for all processes), the metrics
    file and trackers are closed, so nothing is left for the shutdown to do. A single process
    returns normally."""
    import logging
    import sys

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_parallel(config: Config) -> Parallel:
    """The Accelerator the launcher asked for, checked against the config."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise PhonetuneError(
            "train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on this machine"
        )
    bf16_weights = config.train.mixed_precision == "bf16-weights"
    # LayerDrop and the frozen-transformer phase leave parameters without gradients in some steps;
    # DDP must then look for them or it waits forever ("Expected to have finished reduction").
    find_unused = config.model.layerdrop > 0 or config.train.freeze_finetune_updates > 0
    try:
        accelerator = Accelerator(
            # bf16-weights: no autocast, the model itself is bf16 (train/masters.py)
            mixed_precision="no" if bf16_weights else config.train.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
            # Without a GPU, say so: several processes started by torchrun (`accelerate launch
            # --multi_gpu`, `torchrun`) then form a gloo process group instead of each running alone.
            cpu=not torch.cuda.is_available(),
        )
    except ImportError as error:  # a launcher config needing DeepSpeed, which is not installed
        raise PhonetuneError(
            f"the launch needs a package that is not installed: {error} "
            '(for DeepSpeed: pip install -e ".[deepspeed]")'
        ) from error
    launched = accelerator.distributed_type.name
    for variable, asked in (
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
        ("ACCELERATE_USE_FSDP", "FSDP"),
    ):
        if os.environ.get(variable, "").lower() == "true" and launched not in ("DEEPSPEED", "FSDP"):
            accelerator.print(
                f"warning: the launcher config asks for {asked}, which Accelerate runs only on "
                f"GPUs; these {accelerator.num_processes} process(es) train without it (DDP on the "
                f"{accelerator.device.type}, nothing sharded)"
            )
    if launched == "MEGATRON_LM":
        raise PhonetuneError(
            "the launcher asked for Megatron-LM, which phonetune train does not support. "
            "Launch with DDP (configs/accelerate/8gpu_ddp.yaml), FSDP "
            "(configs/accelerate/fsdp_8gpu.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2_8gpu.yaml)."
        )
    return checked(accelerator, config)


def checked(accelerator: Accelerator, config: Config) -> Parallel:
    """`accelerator` as a Parallel, after the checks of its backend (FSDP or DeepSpeed)."""
    kind = accelerator.distributed_type.name
    if kind == "FSDP":
        check_fsdp_launch(accelerator, config)
    if kind == "DEEPSPEED":
        check_deepspeed_launch(accelerator, config)
    bf16_weights = config.train.mixed_precision == "bf16-weights"
    if kind in ("FSDP", "DEEPSPEED") and bf16_weights:
        raise PhonetuneError(
            f"train.mixed_precision=bf16-weights runs with one process or DDP; under {kind} use "
            "train.mixed_precision=bf16 (DeepSpeed's bf16 already keeps bf16 weights with fp32 masters)"
        )
    return Parallel(accelerator, bf16_weights=bf16_weights)


def check_fsdp_launch(accelerator: Accelerator, config: Config) -> None:
    """FSDP version 2 (per-parameter sharding), without LayerDrop or fp16 loss scaling."""
    if not accelerator.is_fsdp2:
        raise PhonetuneError(
            "phonetune train shards with FSDP version 2 (torch's fully_shard): set "
            "fsdp_config.fsdp_version: 2 in the Accelerate config, as configs/accelerate/fsdp_8gpu.yaml"
        )
    # fp16 failed on an H200: Accelerate 1.15 unscales the gradients twice when clipping under
    # FSDP, and a plain GradScaler may find overflows per shard, so processes could disagree on which
    # steps to skip (not checked). bf16 needs no loss scaling.
    if config.train.mixed_precision == "fp16":
        raise PhonetuneError(
            "train.mixed_precision=fp16 is not supported under FSDP (loss scaling over shards); "
            "use train.mixed_precision=bf16, or launch fp16 runs with DDP (configs/accelerate/8gpu_ddp.yaml)"
        )
    # Every process gathers a layer's shards together before running it; LayerDrop skips layers at
    # random per process, so one would wait for a gather that the others never join.
    if config.model.layerdrop > 0:
        raise PhonetuneError(
            f"model.layerdrop={config.model.layerdrop:g} cannot run under FSDP: processes skip "
            "different layers, and a sharded layer runs only when all of them gather it. Set "
            "model.layerdrop=0, or launch with DDP (configs/accelerate/8gpu_ddp.yaml)."
        )


def check_fsdp_wrapping(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """The layer classes the Accelerate config shards one by one exist in this model (a
    wav2vec2-base encoder has Wav2Vec2EncoderLayer, not XLSR's ...StableLayerNorm)."""
    wanted = accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap or []
    present = {type(child).__name__ for child in module.modules()}
    missing = [name for name in wanted if name not in present]
    if missing:
        layers = sorted(name for name in present if "EncoderLayer" in name)
        raise PhonetuneError(
            f"the Accelerate config shards layers of class {', '.join(missing)}, which this model "
            f"does not have; set fsdp_config.fsdp_transformer_layer_cls_to_wrap to its encoder "
            f"layer class (this model's layer classes: {', '.join(layers)})"
        )


# --- DeepSpeed ZeRO-2 -----------------------------------------------------------------------------
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


def _trainable_fp32_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights before DeepSpeed casts the model to bf16 (CPU, fp32)."""
    return {
        name: parameter.detach().to("cpu", torch.float32, copy=True)
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }


def _set_fp32_masters(engine: Any, weights: dict[str, torch.Tensor]) -> None:
    """Start the fp32 master weights from `weights` instead of the bf16-rounded model.

    DeepSpeed builds its masters from the model it was given, after casting it to bf16: a fresh
    run would start from pretrained weights rounded to 8 bits of mantissa and a resumed one would
    lose the masters' precision. Every process calls this (each sets its own shard).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    for name, parameter in engine.module.named_parameters():
        if name in weights:
            safe_set_full_fp32_param(parameter, weights[name].to(parameter.device))


def _deepspeed_step(engine: Any) -> tuple[float, bool]:
    """Reduce, clip and update (or skip a non-finite step); the gradient norm before clipping and
    whether the step was skipped."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm), not engine.was_step_applied()


def _deepspeed_gather_state(
    engine: Any, keep: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _deepspeed_restore_optimizer(engine: Any, saved: dict[str, Any]) -> None:
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


# --- `accelerate launch --cpu --num_processes N` ----------------------------------------------------
def cpu_launch_processes() -> int:
    """The process count an `accelerate launch --cpu` parent asked for, if it started only this one.

    Accelerate's simple launcher sets ACCELERATE_USE_CPU, and MASTER_ADDR only when more than one
    process or machine was asked for, but passes on neither count: it is read from the launcher's
    own command line. Returns 1 when this process was not started that way.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return 1
    if "MASTER_ADDR" not in os.environ or any(v in os.environ for v in _GROUP_VARIABLES):
        return 1
    import psutil
    from accelerate.commands.launch import launch_command_parser

    parent = psutil.Process().parent()
    command = parent.cmdline() if parent is not None else []
    starts = [
        i
        for i, token in enumerate(command)
        if token == "launch"
        or token.endswith("accelerate.commands.launch")
        or token.endswith(os.path.join("commands", "launch.py"))
    ]
    if not starts:
        return 1
    launch_args, _ = launch_command_parser().parse_known_args(command[starts[0] + 1 :])
    processes, machines = launch_args.num_processes, launch_args.num_machines
    if launch_args.config_file:
        from accelerate.commands.config import load_config_from_file

        defaults = load_config_from_file(launch_args.config_file)
        processes = processes or defaults.num_processes
        machines = machines or defaults.num_machines
    if (machines or 1) > 1:
        raise PhonetuneError(
            "`accelerate launch --cpu` across several machines needs MPI (Accelerate's "
            "--mpirun_hostfile). Without it, run `torchrun --nnodes M --nproc_per_node N "
            "--rdzv_endpoint HOST:PORT -m phonetune train ...` on every machine."
        )
    return int(processes or 1)
