"""train.mixed_precision=bf16-weights: a bf16 model whose optimizer steps fp32 master weights."""

from pathlib import Path

import pytest
import torch
from helpers import MICRO, config

from phonetune.data.errors import PhonetuneError
from phonetune.train.config import load_config
from phonetune.train.parallel import make_parallel
from phonetune.train.schedule import make_optimizer


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4)
    )
    model[3].requires_grad_(False)  # a frozen part, as the feature encoder
    return model


def prepare(prepared_dir, *overrides):
    cfg = config(prepared_dir, "/unused", *MICRO, "train.mixed_precision=bf16-weights", *overrides)
    model = make_model()
    optimizer = make_optimizer(model, cfg)
    parallel = make_parallel(cfg)
    model, optimizer = parallel.prepare(model, optimizer)
    return cfg, model, optimizer, parallel


def backward(model, seed):
    inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed))
    model(inputs.to(torch.bfloat16)).float().square().mean().backward()


def test_the_optimizer_steps_fp32_masters_and_the_model_gets_them_rounded(prepared_dir):
    """Each update is torch's clip_grad_norm_ and AdamW on fp32 weights given the model's bf16
    gradients (an fp32 twin, stepped by hand, is the reference); the model then holds the masters
    rounded to bf16, exactly; a NaN gradient moves nothing; a layer without gradients (as
    LayerDrop leaves one) is skipped as AdamW skips it in fp32; frozen weights stay.

    Tolerance, per update: the two clip the gradient by different float32 operations (a divisor in
    the fused kernel, a product in clip_grad_norm_), a few 2^-24 of relative difference, which
    Adam's update passes on at most in full: lr x 1e-6; and the new weight, rounded to float32,
    may then land one unit in the last place apart: 2^-23 of the weight."""
    cfg, model, optimizer, parallel = prepare(prepared_dir, "train.max_grad_norm=0.05")
    masters = parallel.masters
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in masters.holder.named_parameters() if p.requires_grad] == names
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    twin = make_model()
    twin_optimizer = make_optimizer(twin, cfg)
    frozen = model[3].weight.detach().clone()
    updates = 0
    for step in range(5):
        backward(model, step)
        if step == 2:
            model[0].weight.grad[0, 0] = float("nan")
        if step == 3:  # the first layer without gradients
            model[0].weight.grad = model[0].bias.grad = None
        grads = [model.get_parameter(n).grad for n in names]
        grads = [None if g is None else g.float() for g in grads]
        before = [p.detach().clone() for p in masters.masters]
        norm, skipped = parallel.update(model, optimizer, cfg.train.max_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        assert bool(skipped) == (step == 2)
        assert all(model.get_parameter(n).grad is None for n in names)
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, masters.masters, strict=True))
        else:
            if step == 3:  # no gradient, no update: neither its weights nor its step count move
                assert torch.equal(before[0], masters.masters[0])
                assert float(optimizer.state[masters.masters[0]]["step"]) == 2
            for name, grad in zip(names, grads, strict=True):
                twin.get_parameter(name).grad = grad
            total = torch.nn.utils.clip_grad_norm_(list(twin.parameters()), cfg.train.max_grad_norm)
            twin_optimizer.step()
            twin_optimizer.zero_grad(set_to_none=True)
            updates += 1
            torch.testing.assert_close(norm, total, rtol=2e-7, atol=0)  # float32 sums, reordered
        for name, master in zip(names, masters.masters, strict=True):
            torch.testing.assert_close(
                master,
                twin.get_parameter(name),
                rtol=updates * 2**-23,
                atol=updates * cfg.train.lr * 1e-6,
            )
            assert torch.equal(model.get_parameter(name), master.detach().to(torch.bfloat16))
    assert torch.equal(model[3].weight, frozen)


def test_updates_below_bf16_resolution_add_up_in_the_masters(prepared_dir):
    """What the masters are for: an update of lr = 2^-12 moves a weight of 1.0 by less than half
    of bf16's spacing there (2^-7), which a bf16 AdamW would round away at every step; the master
    keeps it, and after enough steps the bf16 weight moves too."""
    _, model, optimizer, parallel = prepare(
        prepared_dir, f"train.lr={2**-12}", "train.max_grad_norm=0"
    )
    with torch.no_grad():
        parallel.masters.flat.fill_(1.0)
        parallel.masters.publish()
    moved_at = None
    for step in range(1, 12):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)  # Adam's update: lr per step, against the gradient
        parallel.update(model, optimizer, 0.0)
        optimizer.zero_grad(set_to_none=True)
        master = float(parallel.masters.masters[0][0, 0].detach())
        assert master == pytest.approx(1.0 - step * 2**-12, rel=1e-5)
        if moved_at is None and float(model[0].weight[0, 0].detach()) != 1.0:
            moved_at = step
    # bf16 below 1.0 is spaced 2^-8: the master rounds away from 1.0 once 1 - x > 2^-9 (step 9)
    assert moved_at == 9


def test_bf16_weights_are_refused_where_they_cannot_work(prepared_dir, tmp_path):
    with pytest.raises(PhonetuneError, match="bf16-weights does not train adapters"):
        config(
            prepared_dir,
            "/unused",
            "train.mixed_precision=bf16-weights",
            "model.adapter=lora",
            f"model.name_or_path={tmp_path}",
            "model.config=null",
        )
    with pytest.raises(PhonetuneError, match="mixed_precision must be one of"):
        load_config("tiny_cpu", ["train.mixed_precision=bf16-true"])


def test_weights_moved_to_new_storage_are_bound_to_the_masters_again(prepared_dir):
    """Accelerate moves the model to "cpu:0" under several CPU processes, which copies every
    tensor: the weights must be views of the flat buffer again, or the updates of the masters
    never reach them (DDP then trained a frozen copy)."""
    cfg, model, optimizer, parallel = prepare(prepared_dir)
    model.to(torch.device("cpu", 0))
    parallel.masters.rebind()
    backward(model, 0)
    before = model[0].weight.detach().clone()
    parallel.update(model, optimizer, cfg.train.max_grad_norm)
    assert not torch.equal(model[0].weight, before)
    for weight, master in zip(parallel.masters.weights, parallel.masters.masters, strict=True):
        assert torch.equal(weight, master.detach().to(torch.bfloat16))


@pytest.mark.slow  # three processes, each building the tiny model
def test_bf16_weights_dispatch_fewer_operations_than_autocast():
    """scripts/count_step_ops.py on the tiny recipe: autocast casts each weight to bf16 in the
    forward pass and each gradient back (at least one cast per trainable linear weight); with
    bf16 weights only the audio and the logits are cast, and the step dispatches fewer
    operations that run kernels, update included."""
    import json
    import subprocess
    import sys

    from helpers import TINY

    script = Path(__file__).resolve().parents[1] / "scripts" / "count_step_ops.py"
    done = subprocess.run(
        [sys.executable, str(script), "--architecture", "", "--config", str(TINY)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    autocast, weights, fp32 = counts["bf16"], counts["bf16-weights"], counts["no"]
    linear_weights = 3 * 6 + 2  # 3 layers of q, k, v, out, 2 feed-forward; projection, head
    assert autocast["casts"] >= linear_weights
    # fp32's (the tally's float64 sums) and three: the audio to bf16, the logits to fp32 for the
    # CTC loss and their gradient back
    assert weights["casts"] <= fp32["casts"] + 3
    assert weights["not_views"] < autocast["not_views"] - linear_weights
    assert weights["not_views"] < fp32["not_views"]
