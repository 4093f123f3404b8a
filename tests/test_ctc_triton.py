"""train.ctc_implementation=triton: the CTC loss of train/ctc_triton.py, run here by Triton's
interpreter (the same kernels a GPU compiles), against PyTorch's CTC in float64."""

import pytest
import torch
import torch.nn.functional as F
import triton

from phonetune.train.ctc_triton import ctc_loss

EPS32 = torch.finfo(torch.float32).eps


def make_batch(frames, labels, classes, seed=0):
    """Logits (B, T, C), padded targets (-100 past each length) and the lengths."""
    generator = torch.Generator().manual_seed(seed)
    rows, width = len(frames), max(max(labels), 1)
    logits = torch.randn(rows, max(frames), classes, generator=generator) * 3
    targets = torch.randint(1, classes, (rows, width), generator=generator)
    targets[torch.arange(width)[None, :] >= torch.tensor(labels)[:, None]] = -100
    return logits, targets, torch.tensor(frames), torch.tensor(labels)


def reference(logits, targets, frames, labels, zero_infinity):
    """PyTorch's CTC on the same log-probabilities, computed in float64; the gradient w.r.t. the
    logits (through log_softmax, as training takes it)."""
    leaf = logits.double().requires_grad_()
    log_probs = F.log_softmax(leaf, dim=-1).float().double()  # the fp32 inputs the kernel sees
    loss = F.ctc_loss(
        log_probs.transpose(0, 1), targets.clamp(min=0), frames, labels,
        reduction="none", zero_infinity=zero_infinity,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(torch.where(torch.isinf(loss), 0.0, loss).sum(), leaf)
    return loss.detach(), grad


def ours(logits, targets, frames, labels, zero_infinity, transposed=False):
    leaf = logits.clone().requires_grad_()
    log_probs = F.log_softmax(leaf, dim=-1)
    if transposed:  # (T, B, C) memory, seen batch first: strides, not copies
        log_probs = log_probs.transpose(0, 1).contiguous().transpose(0, 1)
    loss = ctc_loss(log_probs, targets, frames, labels, blank=0, zero_infinity=zero_infinity)
    (grad,) = torch.autograd.grad(torch.where(torch.isinf(loss), 0.0, loss).sum(), leaf)
    return loss.detach(), grad


def tolerance(frames, loss):
    """The kernels add one rounded log-sum-exp per frame to log alpha (and log beta), values of
    at most the loss's size: at most ~T eps |loss| each, doubled for margin. The occupancy
    exp(alpha + beta - y + loss) <= 1 carries the sum of those errors as a relative error."""
    return 2 * frames * EPS32 * (loss.abs() + 1)


# rows: full length, repeated labels (a blank between each pair is needed), no labels, frames
# shorter than the batch, a row that cannot align (4 repeated labels need 7 frames; it has 5)
FRAMES = [40, 40, 25, 30, 5]
LABELS = [15, 9, 0, 12, 4]


def with_repeats(targets):
    targets[1, :9] = torch.tensor([3, 3, 3, 5, 5, 2, 3, 3, 4])
    targets[4, :4] = 6
    return targets


@pytest.mark.parametrize("zero_infinity", [True, False])
def test_losses_and_gradients_are_pytorchs(zero_infinity):
    logits, targets, frames, labels = make_batch(FRAMES, LABELS, classes=9)
    targets = with_repeats(targets)
    want_loss, want_grad = reference(logits, targets, frames, labels, zero_infinity)
    loss, grad = ours(logits, targets, frames, labels, zero_infinity)
    if zero_infinity:
        assert loss[4] == 0 and torch.count_nonzero(grad[4]) == 0
    else:
        assert loss[4] == float("inf") and torch.isinf(want_loss[4])
    feasible = slice(0, 4)
    limit = tolerance(frames[feasible].double(), want_loss[feasible])
    assert torch.all((loss[feasible].double() - want_loss[feasible]).abs() <= limit)
    for row in range(4):
        atol = 3 * float(limit[row])  # alpha, beta and the loss each
        torch.testing.assert_close(grad[row].double(), want_grad[row], rtol=0, atol=atol)
        assert torch.count_nonzero(grad[row, int(frames[row]) :]) == 0  # frames past the clip


def test_strided_log_probs_and_a_wide_label_block():
    """(T, B, C) memory read batch first through strides; 60 labels: a block of 128 states."""
    logits, targets, frames, labels = make_batch([150, 130, 140], [60, 44, 1], classes=30, seed=1)
    want_loss, want_grad = reference(logits, targets, frames, labels, True)
    loss, grad = ours(logits, targets, frames, labels, True, transposed=True)
    limit = tolerance(frames.double(), want_loss)
    assert torch.all((loss.double() - want_loss).abs() <= limit)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=3 * float(limit.max()))


def test_bad_inputs_are_refused_with_a_reason():
    logits, targets, frames, labels = make_batch([4], [2], classes=5)
    log_probs = F.log_softmax(logits, dim=-1)
    with pytest.raises(ValueError, match="float32"):
        ctc_loss(log_probs.double(), targets, frames, labels)
    with pytest.raises(ValueError, match="integer"):
        ctc_loss(log_probs, targets, frames.float(), labels)


@pytest.mark.parametrize("block", [16, 1024])
def test_kernels_compile_for_hopper(block):
    """The GPU path, which the interpreter does not take: both kernels go through Triton's
    compiler to an sm_90 (H100/H200) binary (ptxas ships with triton; no GPU needed), with the
    barrier that orders each frame's states still in the code."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from phonetune.train import ctc_triton

    pointers = {"states": "*i32", "skips": "*i1", "input_lengths": "*i64"}
    for kernel in (ctc_triton._alpha_kernel, ctc_triton._occupancy_kernel):
        jitted = triton.jit(kernel)
        names = jitted.arg_names
        signature = {n: pointers.get(n, "*fp32") for n in names if not n.startswith("stride")}
        signature |= {n: "i32" for n in names if n.startswith("stride")}
        signature["BLOCK"] = "constexpr"
        source = ASTSource(jitted, signature, constexprs={(names.index("BLOCK"),): block})
        options = {"num_warps": ctc_triton._warps(block), "enable_fp_fusion": True}
        binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert binary.asm["cubin"] and "bar.sync" in binary.asm["ptx"], kernel.__name__


def test_the_device_check_script_runs(tmp_path):
    """scripts/check_ctc.py, which the GPU session runs at the recipe's shapes, here at small ones:
    it checks the two implementations against each other and writes what it measured."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "check_ctc.py"
    sizes = ["--rows", "3", "--frames", "30", "--labels", "8", "--classes", "12", "--repeats", "1"]
    out = tmp_path / "ctc.json"
    subprocess.run([sys.executable, str(script), *sizes, "--out", str(out)], check=True)
    result = json.loads(out.read_text())
    assert result["same_result"] and result["shape"]["frames"] == 30
    assert set(result["seconds_per_call"]) == {"pytorch", "triton"}
    assert all(seconds > 0 for seconds in result["seconds_per_call"].values())


def test_the_run_says_what_the_triton_ctc_needs(monkeypatch):
    """Without the triton package: an error that names it, before anything is loaded. On a CPU: a
    warning that the interpreter runs the kernels."""
    import importlib.util
    from types import SimpleNamespace

    from helpers import TINY

    from phonetune.data.errors import PhonetuneError
    from phonetune.train.config import load_config
    from phonetune.train.loop import check_ctc_implementation

    required = ["data.prepared_dir=/unused", "run.output_dir=/unused"]
    cfg = load_config(TINY, [*required, "train.ctc_implementation=triton"])
    said = []
    cpu = SimpleNamespace(device=torch.device("cpu"), print=said.append)
    check_ctc_implementation(cfg, cpu)
    assert len(said) == 1 and "Triton's interpreter" in said[0]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "triton" else find_spec(name, *a),
    )
    with pytest.raises(PhonetuneError, match="needs the triton package"):
        check_ctc_implementation(cfg, cpu)
