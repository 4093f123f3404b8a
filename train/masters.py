"""bf16 weights with fp32 master weights (`train.mixed_precision: bf16-weights`).

Autocast keeps the model in fp32 and casts every weight to bf16 in each forward pass, and each
weight's bf16 gradient back to fp32 in the backward pass: on an H200 about 1200 of the 2300 kernel
launches of a training step at XLSR-53 size, in a step whose pace the host sets (BENCHMARKS.md, GPU
section). Here the model itself is in bf16 and computes without autocast; the optimizer updates
fp32 copies of the trainable weights (the masters), so that updates smaller than bf16's resolution
(2^-8 of a weight) still add up, as in fairseq's FP16Optimizer and DeepSpeed's bf16 mode.

The masters, and the model's bf16 weights, are views into one flat buffer each, so that the work
around the optimizer takes a handful of kernels, whatever the number of weights:

- bf16 gradients -> the masters' fp32 gradients (views into a third flat buffer): one multi-tensor
  copy. Autograd gives each weight its gradient as it would an fp32 one (no accumulation into a
  preset buffer, which would cost an addition per weight);
- the gradient norm and the NaN/inf check (multi-tensor, as in every mode);
- the fused AdamW step on the masters (its own multi-tensor kernels);
- fp32 masters -> bf16 weights (rounded to nearest): one copy.

A weight without a gradient in a step (a layer LayerDrop skipped, the transformer during
`freeze_finetune_updates`) leaves its master without one, and AdamW skips it, as in the other
modes. What differs from autocast: gradients are accumulated (over `train.grad_accum` batches) and
averaged over DDP processes in bf16.

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
        # One flat buffer of each kind, trainable parameter after trainable parameter.
        sizes = [p.numel() for _, p in trainable]
        device = named[0][1].device
        total = sum(sizes)
        self.flat = torch.empty(total, dtype=torch.float32, device=device)
        self.flat_grad = torch.empty(total, dtype=torch.float32, device=device)
        self.flat_bf16 = torch.empty(total, dtype=BF16, device=device)
        self.weights: list[nn.Parameter] = []
        self.masters: list[nn.Parameter] = []
        self._weight_views: list[torch.Tensor] = []
        self._grad_views: list[torch.Tensor] = []
        start = 0
        with torch.no_grad():
            for (name, master), size in zip(trainable, sizes, strict=True):
                end = start + size
                self.flat[start:end].copy_(master.reshape(-1))
                master.data = self.flat[start:end].view(master.shape)
                self.flat_bf16[start:end].copy_(self.flat[start:end])
                view = self.flat_bf16[start:end].view(master.shape)
                weight = nn.Parameter(view)
                self._swap(module, self.holder, name, master, weight)
                self.weights.append(weight)
                self._weight_views.append(view)
                self.masters.append(master)
                self._grad_views.append(self.flat_grad[start:end].view(master.shape))
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
            if part not in place._modules:
                place.add_module(part, nn.Module())
            place = place._modules[part]
        owner._parameters[attribute] = weight  # (not setattr: parametrized layers intercept it)
        place.register_parameter(attribute, master)

    def rebind(self) -> None:
        """Make the model's weights views of the flat buffer again where something gave them
        storage of their own (Accelerate moves the model to "cpu:0" under several CPU processes,
        which copies every CPU tensor); the Parameter objects, which DDP holds, stay the same."""
        with torch.no_grad():
            for weight, view in zip(self.weights, self._weight_views, strict=True):
                if weight.data_ptr() != view.data_ptr():
                    view.copy_(weight)
                    weight.data = view

    def collect_gradients(self) -> list[torch.Tensor]:
        """The step's bf16 gradients as the masters' fp32 gradients (one multi-tensor copy);
        returns those gradients. A weight without a gradient leaves its master without one."""
        sources, targets = [], []
        for weight, master, view in zip(self.weights, self.masters, self._grad_views, strict=True):
            if weight.grad is None:
                master.grad = None
            else:
                sources.append(weight.grad)
                targets.append(view)
                master.grad = view  # (the loop's zero_grad(set_to_none=True) lets go of it)
        if sources:
            torch._foreach_copy_(targets, sources)
        return targets

    def publish(self) -> None:
        """After the optimizer's step: the masters, rounded to bf16, become the model's weights;
        the model's gradients are let go (the next step's backward makes new ones)."""
        self.flat_bf16.copy_(self.flat)
        for weight in self.weights:
            weight.grad = None
