"""bf16 weights with fp32 master weights (`train.mixed_precision: bf16-weights`).

Autocast keeps the model in fp32 and casts every weight to bf16 in each forward pass, and each
weight's bf16 gradient back to fp32 in the backward pass: on an H200 about 1200 of the 2300 kernel
launches of a training step at XLSR-53 size, in a step whose pace the host sets (BENCHMARKS.md, GPU
section). Here the model itself is in bf16 and computes without autocast; the optimizer updates
fp32 copies of the trainable weights (the masters), so that updates smaller than bf16's resolution
(2^-8 of a weight) still add up, as in fairseq's FP16Optimizer and DeepSpeed's bf16 mode.

The trainable weights and their gradients live in four flat buffers, each parameter a view into
them, so that the work around the optimizer is one kernel each, whatever the number of weights:

- bf16 gradients (the model's `.grad`, accumulated in place by autograd and DDP) -> fp32 gradients
  (the masters' `.grad`): one copy;
- the gradient norm and the NaN/inf check over the one flat fp32 gradient;
- the fused AdamW step on the masters (its own multi-tensor kernels);
- fp32 masters -> bf16 weights (rounded to nearest): one copy; the bf16 gradients zeroed: one fill.

What differs from autocast: gradients are accumulated (over `train.grad_accum` batches) and averaged
over DDP processes in bf16, and every trainable weight has a gradient in every step, zero where
none was computed (a layer LayerDrop skipped, the transformer during `freeze_finetune_updates`):
AdamW then decays its moments and moves it by its momentum, as fairseq's fp16 optimizer (flat
gradients) did, and advances its step count. Weight decay with a frozen phase is therefore refused
(config.py), as under DeepSpeed.

The masters are the optimizer's parameters and hold the names of the model's, so checkpoints are
the same files as in every other mode: `model.safetensors` holds the fp32 masters (and the frozen
weights as they were loaded), the optimizer state is keyed by the same names, and a run continues
exactly, or under another precision.
"""

from __future__ import annotations

import torch
from torch import nn

BF16 = torch.bfloat16


class MasterWeights:
    """Takes a module's fp32 parameters as masters and gives the module bf16 ones in their place.

    The optimizer built over the module before keeps working on the same Parameter objects, which
    are now the masters (`holder`, a module tree with the model's parameter names).
    """

    def __init__(self, module: nn.Module) -> None:
        named = list(module.named_parameters())
        if any(p.dtype != torch.float32 for _, p in named):
            raise ValueError("bf16 weights need a model in float32 to take the masters from")
        trainable = [(name, p) for name, p in named if p.requires_grad]
        self.holder = nn.Module()
        # One flat buffer of each kind; parameter i is the slice offsets[i]:offsets[i+1].
        sizes = [p.numel() for _, p in trainable]
        device = named[0][1].device
        total = sum(sizes)
        self.flat = torch.empty(total, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.flat_bf16 = torch.empty(total, dtype=BF16, device=device)
        self.flat_bf16_grad = torch.zeros(total, dtype=BF16, device=device)
        self.masters: list[nn.Parameter] = []
        self._master_grads: list[torch.Tensor] = []
        start = 0
        with torch.no_grad():
            for (name, master), size in zip(trainable, sizes, strict=True):
                end = start + size
                self.flat[start:end].copy_(master.reshape(-1))
                master.data = self.flat[start:end].view(master.shape)
                self.flat_bf16[start:end].copy_(self.flat[start:end])
                weight = nn.Parameter(self.flat_bf16[start:end].view(master.shape))
                weight.grad = self.flat_bf16_grad[start:end].view(master.shape)
                self._swap(module, self.holder, name, master, weight)
                self.masters.append(master)
                self._master_grads.append(self.flat_grad[start:end].view(master.shape))
                start = end
            for name, frozen in named:
                if not frozen.requires_grad:
                    weight = nn.Parameter(frozen.detach().to(BF16), requires_grad=False)
                    self._swap(module, self.holder, name, frozen, weight)

    @staticmethod
    def _swap(
        module: nn.Module, holder: nn.Module, name: str, master: nn.Parameter, weight: nn.Parameter
    ) -> None:
        """`weight` in `module` under `name`; `master` in `holder` under the same name."""
        *path, attribute = name.split(".")
        owner, place = module, holder
        for part in path:
            owner = owner.get_submodule(part)
            if not hasattr(place, part):
                place.add_module(part, nn.Module())
            place = place.get_submodule(part)
        owner._parameters[attribute] = weight  # (not setattr: parametrized layers intercept it)
        place.register_parameter(attribute, master)

    def collect_gradients(self) -> torch.Tensor:
        """The step's bf16 gradients as the masters' fp32 gradients; returns them flat (one
        tensor: the norm and the NaN/inf check are one reduction)."""
        self.flat_grad.copy_(self.flat_bf16_grad)
        for master, grad in zip(self.masters, self._master_grads, strict=True):
            master.grad = grad  # (the loop's zero_grad(set_to_none=True) lets go of them)
        return self.flat_grad

    def publish(self) -> None:
        """After the optimizer's step: the masters, rounded to bf16, become the model's weights;
        the model's gradients start again from zero."""
        self.flat_bf16.copy_(self.flat)
        self.flat_bf16_grad.zero_()
