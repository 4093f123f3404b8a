"""Several processes on the CPU (gloo), as CI can run them: equivalence, evaluation, resume.

Each launch is `accelerate launch --cpu --num_processes 2 -m train`, the form users type.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import FAST, MICRO, RANDOM, ROOT, TINY, config, read_metrics
from train import checkpoint as ckpt
from train.batching import plan_eval
from train.loop import train

pytestmark = pytest.mark.slow

LAUNCH = "-m accelerate.commands.launch --cpu --num_processes 2 --mixed_precision no"
LAUNCH += " --dynamo_backend no -m train"
# Without dropout, masking and LayerDrop (whose draws differ by process), N processes with a
# budget B must train like one process with N x B.
DETERMINISTIC = [*MICRO, "train.max_steps=4", "train.save_steps=2", "train.eval_steps=4"]


# FSDP version 2 over two CPU processes: see tests/fsdp_on_cpu.py for why not `accelerate launch`.
FSDP_LAUNCH = (
    f"-m torch.distributed.run --standalone --nproc_per_node 2 {ROOT / 'tests' / 'fsdp_on_cpu.py'}"
)


def launch_two(prepared_dir, run_dir, *overrides, launch=LAUNCH):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    settings = [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run_dir}", *FAST]
    done = subprocess.run(
        [sys.executable, *launch.split(), "--config", str(TINY), *settings, *overrides],
        capture_output=True, text=True, env=env, cwd=run_dir.parent, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def weights(checkpoint):
    return load_file(checkpoint / "model" / "model.safetensors")


def dev_phone_counts(prepared_dir):
    import datasets

    dev = datasets.load_from_disk(str(prepared_dir))["dev"]
    counts = {}
    for locale, phones in zip(dev["locale"], dev["phones"], strict=True):
        counts[locale] = counts.get(locale, 0) + len(phones.split())
    return counts


def close_weights(first, second):
    """Trained weights that agree as the same computation summed in another order does (see the
    tolerances of test_two_processes_with_budget_b_train_like_one_with_2b)."""
    assert first.keys() == second.keys()
    assert all(first[k].shape == second[k].shape for k in first)
    differences = torch.cat([(first[k] - second[k]).abs().flatten() for k in first])
    stats = f"max {differences.max():.2e}, 99.9% {differences.quantile(0.999):.2e}"
    assert differences.max() < 4e-3 and differences.quantile(0.999) < 1e-5, stats
    assert differences.median() < 1e-7, stats


def test_two_processes_with_budget_b_train_like_one_with_2b(prepared_dir, tmp_path):
    (tmp_path / "two").mkdir()
    two = launch_two(prepared_dir, tmp_path / "two" / "run", *DETERMINISTIC)
    assert "processes:       2" in two.stdout
    train(config(prepared_dir, tmp_path / "one", *DETERMINISTIC, "train.batch_seconds=24"))

    two_losses, two_evals = read_metrics(tmp_path / "two" / "run")
    one_losses, one_evals = read_metrics(tmp_path / "one")
    assert [r["step"] for r in two_losses] == [1, 2, 3, 4]
    # Same global batches, loss normalised by the global token count: the same numbers up to the
    # summation order of differently shaped batches.
    np.testing.assert_allclose(
        [r["loss"] for r in two_losses], [r["loss"] for r in one_losses], rtol=1e-5
    )
    np.testing.assert_allclose(
        [r["audio_seconds"] for r in two_losses], [r["audio_seconds"] for r in one_losses]
    )
    final_two = weights(ckpt.find_latest_checkpoint(tmp_path / "two" / "run"))
    final_one = weights(ckpt.find_latest_checkpoint(tmp_path / "one"))
    # Adam divides by the gradient's running RMS, so where a gradient is ~0 (output rows of phones
    # absent from the step) summation-order noise can flip an update's sign and move a weight by up
    # to two learning-rate steps (2 x 2e-3 here). 99.9% of the weights agree to 1e-5, half exactly
    # or to 1e-7 (measured: max 4e-4, 99.9% 3e-6).
    close_weights(final_two, final_one)

    # Evaluation: every dev clip decoded exactly once across the two processes, although the eval
    # batches do not divide evenly between them.
    import datasets

    dev = datasets.load_from_disk(str(prepared_dir))["dev"]
    durations = np.asarray(dev["duration"])
    shares = [len(plan_eval(durations, 60.0, 2, rank)) for rank in range(2)]
    assert shares[0] != shares[1]  # the uneven case is the one exercised
    assert two_evals[-1]["eval_utterances"] == len(dev) == one_evals[-1]["eval_utterances"]
    counted = {loc: c["ref_phones"] for loc, c in two_evals[-1]["eval_counts_per_locale"].items()}
    assert counted == dev_phone_counts(prepared_dir)


def test_two_process_run_resumes_exactly_and_with_one_process(prepared_dir, tmp_path):
    # Masking, dropout, LayerDrop and a frozen-transformer phase on: every process's RNG state must
    # come back, and parameters without gradients must not stall the gradient reduction.
    common = [*MICRO, *RANDOM, "train.freeze_finetune_updates=1", "train.max_steps=4"]
    common += ["train.save_steps=2", "train.eval_steps=2", "train.keep_last=5"]
    (tmp_path / "two").mkdir()
    straight = tmp_path / "two" / "straight"
    launch_two(prepared_dir, straight, *common)
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= {
        p.name for p in (ckpt.checkpoints_dir(straight) / "step_4").iterdir()
    }

    # As if killed after step 3: only the step-2 checkpoint survives.
    stopped = tmp_path / "two" / "stopped"
    shutil.copytree(straight, stopped)
    shutil.rmtree(ckpt.checkpoints_dir(stopped) / "step_4")
    (stopped / "best.json").unlink(missing_ok=True)
    resumed = launch_two(prepared_dir, stopped, *common, "resume=auto")
    assert "batching differs" not in resumed.stdout and "-process run with" not in resumed.stdout
    first, second = (
        weights(ckpt.checkpoints_dir(straight) / "step_4"),
        weights(ckpt.checkpoints_dir(stopped) / "step_4"),
    )
    assert all(torch.equal(first[k], second[k]) for k in first)  # bit for bit
    straight_losses, _ = read_metrics(straight)
    resumed_losses, _ = read_metrics(stopped)
    assert [r["loss"] for r in resumed_losses] == [r["loss"] for r in straight_losses]

    # The same run continued by one process with the same global budget (2 x 12 s): allowed, with a
    # warning, on the same global batches.
    alone = tmp_path / "alone"
    shutil.copytree(straight, alone)
    shutil.rmtree(ckpt.checkpoints_dir(alone) / "step_4")
    (alone / "best.json").unlink(missing_ok=True)
    say: list[str] = []
    import train.loop as loop

    original = loop.continue_sampler

    def recording(state, saved, sampler, accelerator, cfg, _say):
        original(state, saved, sampler, accelerator, cfg, say.append)
        say.append(f"position {state.position}")

    loop.continue_sampler = recording
    try:
        train(config(prepared_dir, alone, *common, "train.batch_seconds=24", "resume=auto"))
    finally:
        loop.continue_sampler = original
    assert any("resuming a 2-process run with 1" in line for line in say), say
    assert "position 2" in say  # the same global batch as the two processes would take next
    assert ckpt.find_latest_checkpoint(alone).name == "step_4"


def test_fsdp_trains_like_one_process_and_its_checkpoints_resume_under_any_launcher(
    prepared_dir, tmp_path
):
    # Each of the two processes holds half of every weight and of the optimizer state; a frozen
    # first step runs the encoder without gradients; two batches accumulate per step (gradient
    # reduction held back for the first); layers are recomputed in the backward pass; the dev set
    # fills one evaluation batch, so the second process decodes a filler batch to keep the sharded
    # forward passes in step.
    common = [*DETERMINISTIC, "train.freeze_finetune_updates=1", "train.eval_steps=2"]
    common += ["train.grad_accum=2", "model.gradient_checkpointing=true"]
    (tmp_path / "fsdp").mkdir()
    straight = tmp_path / "fsdp" / "straight"
    launched = launch_two(prepared_dir, straight, *common, launch=FSDP_LAUNCH)
    assert (
        "processes:       2 on cpu, FSDP (weights and optimizer state sharded)" in launched.stdout
    )
    train(config(prepared_dir, tmp_path / "one", *common, "train.batch_seconds=24"))

    fsdp_losses, fsdp_evals = read_metrics(straight)
    one_losses, _ = read_metrics(tmp_path / "one")
    np.testing.assert_allclose(
        [r["loss"] for r in fsdp_losses], [r["loss"] for r in one_losses], rtol=1e-5
    )
    # Checkpoints hold the whole weights, gathered from the shards, under the model's own names.
    final = weights(ckpt.checkpoints_dir(straight) / "step_4")
    optimizer_state = ckpt.load_tensors(ckpt.checkpoints_dir(straight) / "step_4", "optimizer.pt")
    assert "model.lm_head.weight" in optimizer_state["state"]  # keyed by name, not by position
    close_weights(final, weights(ckpt.checkpoints_dir(tmp_path / "one") / "step_4"))
    import datasets

    dev = datasets.load_from_disk(str(prepared_dir))["dev"]
    assert len(plan_eval(np.asarray(dev["duration"]), 60.0)) == 1  # the filler case is exercised
    assert [r["eval_utterances"] for r in fsdp_evals] == [len(dev)] * 2
    counted = {loc: c["ref_phones"] for loc, c in fsdp_evals[-1]["eval_counts_per_locale"].items()}
    assert counted == dev_phone_counts(prepared_dir)

    # Killed after step 3, continued under FSDP: bit for bit the same run.
    stopped = tmp_path / "fsdp" / "stopped"
    shutil.copytree(straight, stopped)
    shutil.rmtree(ckpt.checkpoints_dir(stopped) / "step_4")
    launch_two(prepared_dir, stopped, *common, "resume=auto", launch=FSDP_LAUNCH)
    resumed = weights(ckpt.checkpoints_dir(stopped) / "step_4")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert [r["loss"] for r in read_metrics(stopped)[0]] == [r["loss"] for r in fsdp_losses]

    # The same checkpoint continued by one process without sharding: the optimizer state was
    # gathered whole and is matched to the parameters by name.
    alone = tmp_path / "alone"
    shutil.copytree(straight, alone)
    shutil.rmtree(ckpt.checkpoints_dir(alone) / "step_4")
    train(config(prepared_dir, alone, *common, "train.batch_seconds=24", "resume=auto"))
    close_weights(final, weights(ckpt.checkpoints_dir(alone) / "step_4"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_parse_as_the_launcher_reads_them(path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    node = ["--machine_rank", "1", "--main_process_ip", "10.0.0.1"] if "nodes" in path.name else []
    argv = ["--config_file", str(path), *node, "-m", "train", "--config", "recipe.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert defaults.mixed_precision == "bf16" and not defaults.use_cpu
    expected = {  # file -> (processes, machines, launcher mode)
        "1gpu.yaml": (1, 1, "single"),
        "8gpu_ddp.yaml": (8, 1, "multi_gpu"),
        "2nodes_8gpu.yaml": (16, 2, "multi_gpu"),
        "fsdp_8gpu.yaml": (8, 1, "use_fsdp"),
        "deepspeed_zero2_8gpu.yaml": (8, 1, "use_deepspeed"),
    }[path.name]
    assert (args.num_processes, args.num_machines) == expected[:2]
    modes = [m for m in ("multi_gpu", "use_fsdp", "use_deepspeed") if getattr(args, m)]
    assert modes == ([] if expected[2] == "single" else [expected[2]])


@pytest.mark.parametrize(
    ("kind", "fsdp_version", "overrides", "message"),
    [
        ("DEEPSPEED", None, [], "DEEPSPEED.*configs/accelerate/8gpu_ddp.yaml"),
        ("MEGATRON_LM", None, [], "MEGATRON_LM.*configs/accelerate/fsdp_8gpu.yaml"),
        ("FSDP", 1, [], "fsdp_version: 2"),
        ("FSDP", 2, ["model.layerdrop=0.1"], "model.layerdrop=0.1 cannot run under FSDP"),
        ("FSDP", 2, ["train.mixed_precision=fp16"], "fp16 is not supported under FSDP.*bf16"),
    ],
)
def test_unsupported_launches_are_refused_with_the_fix_named(
    kind, fsdp_version, overrides, message, monkeypatch, tmp_path
):
    import enum

    import accelerate

    from data.errors import PhonetuneError
    from train.loop import make_accelerator

    class Launched:  # what Accelerate builds under such a launch config
        def __init__(self, **kwargs):
            self.distributed_type = enum.Enum("DistributedType", [kind])[kind]
            self.is_fsdp2 = fsdp_version == 2

    monkeypatch.setattr(accelerate, "Accelerator", Launched)
    monkeypatch.setattr(
        torch.cuda, "is_available", lambda: True
    )  # these launch configs are for GPUs
    with pytest.raises(PhonetuneError, match=message):
        make_accelerator(config(tmp_path, tmp_path / "run", *overrides))


@pytest.mark.parametrize("stable_layer_norm", [True, False])
def test_fsdp_layer_class_missing_from_the_model_is_named(stable_layer_norm, prepared_dir):
    from types import SimpleNamespace

    from data.errors import PhonetuneError
    from train.loop import check_fsdp_wrapping, load_data
    from train.model import CTCModel, build_model

    cfg = config(
        prepared_dir, "/unused", *MICRO, f"model.config.do_stable_layer_norm={stable_layer_norm}"
    )
    module = CTCModel(build_model(cfg.model, load_data(cfg).vocab)[0])
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["Wav2Vec2EncoderLayerStableLayerNorm"])
    launched = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))  # fsdp_8gpu.yaml's class
    if stable_layer_norm:  # XLSR-style layers: what the config names
        check_fsdp_wrapping(launched, module)
    else:  # wav2vec2-base-style layers
        with pytest.raises(
            PhonetuneError, match=r"this model's layer classes: Wav2Vec2EncoderLayer\)$"
        ):
            check_fsdp_wrapping(launched, module)
