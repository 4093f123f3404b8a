"""A CTC loss that takes its lengths on the device: `train.ctc_implementation: triton`.

PyTorch's CTC on a GPU copies the lengths and the targets' offsets to the device with blocking
copies in its forward and backward: the last host synchronisations of a training step (7 per step
in BENCHMARKS.md's profile at 80 s). cuDNN's CTC reads its lengths back to check them and takes at
most 255 labels. This one is two Triton kernels, one program per utterance, that read the lengths
where the batch already has them: nothing goes back to the host, and the launch sizes come from
tensor shapes alone.

The algorithm is Graves et al. (2006), in log space, over the extended label sequence
l' = (blank, l1, blank, l2, ..., blank) of 2L+1 states:
- forward (`_alpha_kernel`): log alpha_t(s) for every frame and state, kept for the backward; the
  loss is -log p(l|x) = -logsumexp(alpha_{T-1}(S-1), alpha_{T-1}(S-2)) (`_log_likelihood`);
- backward (`_occupancy_kernel`): log beta_t(s) frame by frame from the end, and each state's
  posterior occupancy gamma_t(s) = alpha_t(s) beta_t(s) / (y_t(l'_s) p). The gradient of the loss
  with respect to log y_t(k) is minus the occupancy summed over the states labelled k, which
  `CTCLoss.backward` gathers with torch (blank: a sum over the even states; labels: scatter_add).

The extended sequence and its allowed skips are made once with torch (`_extend_labels`) and read
by both kernels. Within a program, each frame's states are one vector; a state's predecessors
(s-1, s-2) are read back from the alpha rows in global memory after a barrier, the way a CUDA
kernel shares them through memory. Frames past an utterance's length and states past its labels
are not computed: their occupancy is zero. (The kernels' argument lists and log-sum-exp of three
stay written twice: a shared helper would have to be a jit function, which the interpreter path
would also have to wrap.)

The reduction is "none" (one loss per utterance) with PyTorch's `zero_infinity` meaning. The
gradient differs from PyTorch's in form, not in effect: PyTorch returns exp(log_probs) - occupancy,
the gradient with respect to the logits, counting on log_softmax's backward to leave it unchanged;
this returns the gradient with respect to the log-probabilities themselves, which log_softmax's
backward turns into the same gradient of the logits.

On a CPU, Triton's interpreter runs the same kernels in NumPy (far slower; float32 rounding may
differ from a GPU's, e.g. fused multiply-adds). That is how the tests check them against
`torch.nn.functional.ctc_loss` on machines without a GPU; they also compile them for sm_90.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _alpha_kernel(
    log_probs,  # (B, T, C) float32, any strides
    states,  # (B, BLOCK) int32: l'_s, -1 past the utterance's 2L+1 states (`_extend_labels`)
    skips,  # (B, BLOCK) bool: state s may also be entered from s-2
    input_lengths,  # (B,)
    alpha,  # (B, T, BLOCK) float32, written for t < max(T_b, 1)
    stride_lb,
    stride_lt,
    stride_lc,
    stride_ab,
    stride_at,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    frames = tl.load(input_lengths + b).to(tl.int32)
    s = tl.arange(0, BLOCK)
    label = tl.load(states + b * BLOCK + s)
    valid = label >= 0
    can_skip = tl.load(skips + b * BLOCK + s) != 0

    rows = log_probs + b * stride_lb + tl.maximum(label, 0) * stride_lc
    row_alpha = alpha + b * stride_ab + s
    a = tl.load(rows, mask=valid & (s < 2), other=-float("inf"))
    a = tl.where(valid & (s < 2), a, -float("inf"))
    tl.store(row_alpha, a)
    for t in range(1, frames):
        # first the frame's log-probabilities, which do not depend on the recursion: their
        # latency passes during the barrier and the reads that do
        emitted = tl.load(rows + t * stride_lt, mask=valid, other=0.0)
        tl.debug_barrier()  # the previous frame's row is in memory for every state
        previous = row_alpha + (t - 1) * stride_at
        a1 = tl.load(previous - 1, mask=s >= 1, other=-float("inf"))
        a2 = tl.load(previous - 2, mask=can_skip, other=-float("inf"))
        top = tl.maximum(tl.maximum(a, a1), a2)
        safe = tl.where(top == -float("inf"), 0.0, top)
        total = safe + tl.log(tl.exp(a - safe) + tl.exp(a1 - safe) + tl.exp(a2 - safe))
        a = tl.where(valid, total + emitted, -float("inf"))
        tl.store(row_alpha + t * stride_at, a)


def _occupancy_kernel(
    log_probs,
    states,
    skips,
    input_lengths,
    alpha,  # (B, T, BLOCK), from the forward
    nll,  # (B,)
    beta,  # (B, 2, BLOCK) scratch: this frame's and the next frame's rows
    occupancy,  # (B, T, BLOCK) float32, zero-initialised: gamma_t(s); alpha's strides
    stride_lb,
    stride_lt,
    stride_lc,
    stride_ab,
    stride_at,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    frames = tl.load(input_lengths + b).to(tl.int32)
    log_likelihood = -tl.load(nll + b)
    s = tl.arange(0, BLOCK)
    label = tl.load(states + b * BLOCK + s)
    valid = label >= 0
    ahead = s + 2 < BLOCK
    # s may go on to s+2 where s+2 may be entered from s; a path ends in the last two states
    can_skip = tl.load(skips + b * BLOCK + s + 2, mask=ahead, other=0) != 0
    ends = valid & (tl.load(states + b * BLOCK + s + 2, mask=ahead, other=-1) < 0)

    rows = log_probs + b * stride_lb + tl.maximum(label, 0) * stride_lc
    row_alpha = alpha + b * stride_ab + s
    row_occupancy = occupancy + b * stride_ab + s
    scratch = beta + b * 2 * BLOCK + s
    last = frames - 1
    emitted = tl.load(rows + tl.maximum(last, 0) * stride_lt, mask=valid, other=0.0)
    e = tl.where(ends, emitted, -float("inf"))
    for step in range(0, frames):
        t = last - step
        # (the loads that do not depend on the recursion come first, as in the forward)
        a = tl.load(row_alpha + t * stride_at, mask=valid, other=-float("inf"))
        if step > 0:
            emitted = tl.load(rows + t * stride_lt, mask=valid, other=0.0)
            tl.store(scratch + (t % 2) * BLOCK, e)  # beta_{t+1}, read back shifted
            tl.debug_barrier()
            e1 = tl.load(scratch + (t % 2) * BLOCK + 1, mask=s + 1 < BLOCK, other=-float("inf"))
            e2 = tl.load(scratch + (t % 2) * BLOCK + 2, mask=can_skip, other=-float("inf"))
            top = tl.maximum(tl.maximum(e, e1), e2)
            safe = tl.where(top == -float("inf"), 0.0, top)
            total = safe + tl.log(tl.exp(e - safe) + tl.exp(e1 - safe) + tl.exp(e2 - safe))
            e = tl.where(valid, total + emitted, -float("inf"))
        gamma = tl.exp(a + e - emitted - log_likelihood)
        tl.store(row_occupancy + t * stride_at, tl.where(valid, gamma, 0.0))


def _extend_labels(
    targets: torch.Tensor, target_lengths: torch.Tensor, blank: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each utterance's extended label sequence l' = (blank, l1, blank, ..., lL, blank) as
    (B, block) int32, -1 past its 2L+1 states, and where a state may also be entered from two
    states back (a label after a different label): both kernels read these, made once here."""
    rows = targets.shape[0]
    s = torch.arange(block, device=targets.device)
    # label state s = 2j + 1 carries targets[:, j]; the padding keeps the gather inside the rows
    padded = F.pad(targets, (0, block))
    carried = padded.gather(1, ((s - 1) // 2).clamp(min=0).expand(rows, block))
    label_state = s % 2 == 1
    states = torch.where(label_state, carried, blank)
    states = torch.where(s < 2 * target_lengths[:, None] + 1, states, -1).to(torch.int32)
    two_back = F.pad(states, (2, 0), value=-1)[:, :block]
    skips = label_state & (s >= 3) & (states >= 0) & (states != two_back)
    return states.contiguous(), skips.contiguous()


@functools.cache
def _compiled(kernel: Callable, device_type: str) -> Any:
    """The kernel compiled for GPUs, or run by Triton's interpreter for tensors on the CPU."""
    if device_type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(kernel)
    return triton.jit(kernel)


def _launch(kernel: Callable, device: torch.device, *args: Any, block: int) -> None:
    compiled = _compiled(kernel, device.type)
    # -inf is the log of zero probability: its arithmetic is intended (the interpreter's NumPy
    # would warn about every log(0) and inf - inf it meets). Fused multiply-adds are asked for by
    # name: Triton 3.9 warns when the choice is left to its default, which 3.10 changes.
    with np.errstate(divide="ignore", invalid="ignore"):
        compiled[(args[0].shape[0],)](
            *args, BLOCK=block, num_warps=_warps(block), enable_fp_fusion=True
        )


def _block(labels: int) -> int:
    return max(triton.next_power_of_2(2 * labels + 1), 16)


def _warps(block: int) -> int:
    return 4 if block <= 512 else 8


def _log_likelihood(
    alpha: torch.Tensor, input_lengths: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """log p(l|x) = logsumexp(alpha_{T-1}(S-1), alpha_{T-1}(S-2)): a path ends in the last label
    or the blank after it. (Gathered with torch rather than reduced in the kernel: Triton's
    reductions are themselves jit functions, which its interpreter runs only if everything was
    imported under TRITON_INTERPRET.)"""
    rows, _, block = alpha.shape
    last = (input_lengths.to(torch.long) - 1).clamp(min=0)
    final = alpha.gather(1, last[:, None, None].expand(rows, 1, block))[:, 0]
    states = 2 * target_lengths.to(torch.long) + 1
    ends = torch.stack([states - 1, (states - 2).clamp(min=0)], dim=1)
    end = final.gather(1, ends)
    end[:, 1] = torch.where(states >= 2, end[:, 1], -torch.inf)  # no labels: one state
    log_p = torch.logsumexp(end, dim=1)
    # no frames: only the empty label sequence has a path
    no_path = torch.where(target_lengths == 0, 0.0, -torch.inf)
    return torch.where(input_lengths > 0, log_p, no_path)


class CTCLoss(torch.autograd.Function):
    """-log p(targets | log_probs) per utterance; see the module's docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        log_probs: torch.Tensor,
        targets: torch.Tensor,
        input_lengths: torch.Tensor,
        target_lengths: torch.Tensor,
        blank: int,
        zero_infinity: bool,
    ) -> torch.Tensor:
        rows, frames, _ = log_probs.shape
        block = _block(targets.shape[1])
        states, skips = _extend_labels(targets, target_lengths, blank, block)
        alpha = torch.empty((rows, frames, block), dtype=torch.float32, device=log_probs.device)
        _launch(
            _alpha_kernel,
            log_probs.device,
            log_probs,
            states,
            skips,
            input_lengths,
            alpha,
            *log_probs.stride(),
            alpha.stride(0),
            alpha.stride(1),
            block=block,
        )
        nll = -_log_likelihood(alpha, input_lengths, target_lengths)
        ctx.save_for_backward(log_probs, states, skips, input_lengths, alpha, nll)
        ctx.blank, ctx.zero_infinity = blank, zero_infinity
        if zero_infinity:
            return torch.where(torch.isinf(nll), 0.0, nll)
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        log_probs, states, skips, input_lengths, alpha, nll = ctx.saved_tensors
        rows, frames, classes = log_probs.shape
        block = alpha.shape[2]
        beta = torch.empty((rows, 2, block), dtype=torch.float32, device=log_probs.device)
        occupancy = torch.zeros_like(alpha)
        _launch(
            _occupancy_kernel,
            log_probs.device,
            log_probs,
            states,
            skips,
            input_lengths,
            alpha,
            nll,
            beta,
            occupancy,
            *log_probs.stride(),
            alpha.stride(0),
            alpha.stride(1),
            block=block,
        )
        per_class = torch.zeros((rows, frames, classes), dtype=torch.float32, device=grad.device)
        # the odd states carry the labels, the even ones the blank; states past an utterance's
        # labels (-1) have zero occupancy, so any class may take their zeros
        labels = states[:, 1::2].clamp(0, classes - 1).to(torch.long)
        index = labels[:, None, :].expand(rows, frames, labels.shape[1])
        per_class.scatter_add_(2, index, occupancy[:, :, 1::2])
        per_class[:, :, ctx.blank] += occupancy[:, :, 0::2].sum(dim=2)
        grad_log_probs = -per_class * grad.to(torch.float32)[:, None, None]
        if ctx.zero_infinity:  # an infinite loss's occupancy is NaN (-inf - -inf): replaced
            grad_log_probs = torch.where(torch.isinf(nll)[:, None, None], 0.0, grad_log_probs)
        return grad_log_probs.to(log_probs.dtype), None, None, None, None, None


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    zero_infinity: bool = False,
) -> torch.Tensor:
    """Each utterance's CTC loss (reduction "none").

    log_probs: (batch, frames, classes), float32 log-probabilities (batch first, unlike
    `F.ctc_loss`). targets: (batch, max labels) class indices, anything past each utterance's
    length. input_lengths, target_lengths: (batch,) integer tensors on the same device.

    On a GPU the label gradient is gathered with `scatter_add_`, whose atomic sums of repeated
    labels are not deterministic (as in PyTorch's own CUDA CTC) unless
    `torch.use_deterministic_algorithms(True)`.
    """
    if log_probs.dtype != torch.float32:
        raise ValueError(f"the Triton CTC takes float32 log-probabilities, not {log_probs.dtype}")
    others = (targets, input_lengths, target_lengths)
    if any(t.device != log_probs.device for t in others):
        raise ValueError(
            "the Triton CTC takes targets and lengths on the log-probabilities' device"
        )
    if any(t.is_floating_point() for t in others):
        raise ValueError("the Triton CTC takes targets and lengths as integer tensors")
    # Lengths past the tensors are cut to them, on the device: the kernels never read outside
    # their rows (PyTorch's CTC checks lengths on the host, which is the wait this avoids).
    input_lengths = input_lengths.clamp(0, log_probs.shape[1])
    target_lengths = target_lengths.clamp(0, targets.shape[1])
    return CTCLoss.apply(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)
