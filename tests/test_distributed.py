"""Several processes on the CPU (gloo), as CI can run them: equivalence, evaluation, resume.

Each launch is `accelerate launch --cpu --num_processes 2 -m phonetune train`, the form users type.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import FAST, MICRO, RANDOM, ROOT, TINY, config, on_a_free_port, read_metrics
from safetensors.torch import load_file

from phonetune.train import checkpoint as ckpt
from phonetune.train.batching import plan_eval
from phonetune.train.loop import Hooks, train

pytestmark = pytest.mark.slow

LAUNCH = "-m accelerate.commands.launch --cpu --num_processes 2 --mixed_precision no"
LAUNCH += " --dynamo_backend no -m phonetune train"
# Without dropout, masking and LayerDrop (whose draws differ by process), N processes with a
# budget B must train like one process with N x B.
DETERMINISTIC = [*MICRO, "train.max_steps=4", "train.save_steps=2", "train.eval_steps=4"]


# FSDP version 2 over two CPU processes: see tests/fsdp_on_cpu.py for why not `accelerate launch`.
FSDP_LAUNCH = (
    f"-m torch.distributed.run --standalone --nproc_per_node 2 {ROOT / 'tests' / 'fsdp_on_cpu.py'}"
)


def launch_two(prepared_dir, run_dir, *overrides, launch=LAUNCH):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = [f"data.prepared_dir={prepared_dir}", f"run.output_dir={run_dir}", *FAST]
    done = subprocess.run(
        [sys.executable, *on_a_free_port(launch).split(), "--config", str(TINY), *settings, *overrides],
        capture_output=True, text=True, env=env, cwd=run_dir.parent, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, describe_failed_launch(done)
    return done


def describe_failed_launch(done):
    """The ends of both streams and, from the launcher's report, which process failed first and
    its own traceback (torchrun puts the root cause last, after the ranks it stopped)."""
    text = done.stdout[-2000:] + done.stderr[-3000:]
    cause = done.stderr.rfind("Root Cause")
    first_traceback = done.stderr.find("Traceback (most recent call last)")
    if cause >= 0:
        text += "\n--- root cause ---\n" + done.stderr[cause : cause + 1500]
    if first_traceback >= 0:
        text += (
            "\n--- first traceback ---\n" + done.stderr[first_traceback : first_traceback + 4000]
        )
    return text


def weights(checkpoint):
    return load_file(checkpoint / "model" / "model.safetensors")


def dev_phone_counts(prepared_dir):
    import datasets

    dev = datasets.load_from_disk(str(prepared_dir))["dev"]
    counts = {}
    for locale, phones in zip(dev["locale"], dev["phones"], strict=True):
        counts[locale] = counts.get(locale, 0) + len(phones.split())
    return counts


# How far Adam can move a weight in the 4 steps of these runs: about one learning rate per step.
UPDATE_SCALE = 4 * yaml.safe_load(TINY.read_text())["train"]["lr"]


def close_weights(first, second):
    """Trained weights that agree as the same computation summed in another order does.

    The bounds are in units of what the steps can move a weight (UPDATE_SCALE), not numbers one
    machine produced. Summation order changes a gradient by float32 rounding (~1e-7 of its terms),
    and Adam, which divides by the gradient's running RMS, passes that on as a relative 1e-7 of an
    update, except where a gradient is itself at the rounding floor (output rows of phones absent
    from the step): there the noise can flip an update's sign, moving the weight by up to one
    update per step. A wrong batch, token count or reduction instead moves nearly every weight by
    a sizeable fraction of an update. So: the median weight agrees to 1e-4 of the update scale,
    99.9% to 1e-2, and none by more than twice it.
    """
    assert first.keys() == second.keys()
    assert all(first[k].shape == second[k].shape for k in first)
    differences = torch.cat([(first[k] - second[k]).abs().flatten() for k in first])
    differences /= UPDATE_SCALE
    stats = (
        f"in units of {UPDATE_SCALE:g}: max {differences.max():.2e}, "
        f"99.9% {differences.quantile(0.999):.2e}, median {differences.median():.2e}"
    )
    assert differences.max() < 2 and differences.quantile(0.999) < 1e-2, stats
    assert differences.median() < 1e-4, stats


def without_last_checkpoint(run_dir, copy):
    """A copy of a 4-step run as if it had been killed before saving step 4."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(ckpt.checkpoints_dir(copy) / "step_4")
    (copy / "best.json").unlink(missing_ok=True)
    return copy


def assert_resume_is_exact(prepared_dir, straight, overrides, launch):
    """The run continued from its step-2 checkpoint under `launch`: bit for bit the same run.
    Returns the continued launch."""
    stopped = without_last_checkpoint(straight, straight.parent / "stopped")
    launched = launch_two(prepared_dir, stopped, *overrides, "resume=auto", launch=launch)
    final, resumed = (weights(ckpt.checkpoints_dir(run) / "step_4") for run in (straight, stopped))
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert [r["loss"] for r in read_metrics(stopped)[0]] == [
        r["loss"] for r in read_metrics(straight)[0]
    ]
    return launched


def assert_every_dev_clip_counted_once(evals, prepared_dir):
    import datasets

    dev = datasets.load_from_disk(str(prepared_dir))["dev"]
    assert [r["eval_utterances"] for r in evals] == [len(dev)] * len(evals)
    counted = {loc: c["ref_phones"] for loc, c in evals[-1]["eval_counts_per_locale"].items()}
    assert counted == dev_phone_counts(prepared_dir)


def test_two_processes_with_budget_b_train_like_one_with_2b(prepared_dir, tmp_path):
    (tmp_path / "two").mkdir()
    two = launch_two(prepared_dir, tmp_path / "two" / "run", *DETERMINISTIC)
    assert "processes:       2" in two.stdout
    train(config(prepared_dir, tmp_path / "one", *DETERMINISTIC, "train.batch_seconds=24"))

    two_losses, two_evals = read_metrics(tmp_path / "two" / "run")
    one_losses, one_evals = read_metrics(tmp_path / "one")
    assert [r["step"] for r in two_losses] == [1, 2, 3, 4]
    # Same global batches, loss normalised by the global token count: the same numbers up to the
    # summation order of differently shaped batches, float32 rounding of ~1e-6 relative (a sum of
    # positive CTC terms does not cancel); 1e-5 is some 80 units in the last place.
    np.testing.assert_allclose(
        [r["loss"] for r in two_losses], [r["loss"] for r in one_losses], rtol=1e-5
    )
    np.testing.assert_allclose(
        [r["audio_seconds"] for r in two_losses], [r["audio_seconds"] for r in one_losses]
    )
    final_two = weights(ckpt.find_latest_checkpoint(tmp_path / "two" / "run"))
    final_one = weights(ckpt.find_latest_checkpoint(tmp_path / "one"))
    close_weights(final_two, final_one)  # (measured: max 0.05, 99.9% 4e-4, in UPDATE_SCALE units)

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


def test_two_process_run_resumes_exactly_and_with_one_process(prepared_dir, tmp_path, capsys):
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
    resumed = assert_resume_is_exact(prepared_dir, straight, common, LAUNCH)
    assert "batching differs" not in resumed.stdout and "-process run with" not in resumed.stdout

    # The same run continued by one process with the same global budget (2 x 12 s): allowed, with a
    # warning, on the same global batches.
    alone = without_last_checkpoint(straight, tmp_path / "alone")
    rows = {"resumed": {}, "one": {}}

    def recorder(name):
        def record(run, step, batches):
            rows[name][step] = sorted(row for batch in batches for row in batch.rows)

        return Hooks(on_batches=record)

    capsys.readouterr()
    alone_config = config(prepared_dir, alone, *common, "train.batch_seconds=24", "resume=auto")
    train(alone_config, recorder("resumed"))
    assert "resuming a 2-process run with 1" in capsys.readouterr().out
    # the global batch the two processes would have taken next: one process's step 3 with 2 x 12 s
    train(
        config(prepared_dir, tmp_path / "one", *common, "train.batch_seconds=24"), recorder("one")
    )
    assert rows["resumed"][3] == rows["one"][3] and rows["resumed"][4] == rows["one"][4]
    assert ckpt.find_latest_checkpoint(alone).name == "step_4"


def test_two_process_run_with_bf16_weights_resumes_exactly(prepared_dir, tmp_path):
    """bf16 weights with fp32 masters under DDP: gradients reduced in bf16 over gloo, LayerDrop and
    a frozen phase leaving zero gradients in the flat buffer; the checkpoints hold fp32 masters
    and the run continues bit for bit."""
    common = [*MICRO, *RANDOM, "train.freeze_finetune_updates=1", "train.max_steps=4"]
    common += ["train.save_steps=2", "train.eval_steps=4", "train.mixed_precision=bf16-weights"]
    (tmp_path / "two").mkdir()
    straight = tmp_path / "two" / "straight"
    launch_two(prepared_dir, straight, *common)
    assert {t.dtype for t in weights(ckpt.checkpoints_dir(straight) / "step_4").values()} == {
        torch.float32
    }
    assert_resume_is_exact(prepared_dir, straight, common, LAUNCH)


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
    assert_every_dev_clip_counted_once(fsdp_evals, prepared_dir)

    # Killed after step 3, continued under FSDP: bit for bit the same run.
    assert_resume_is_exact(prepared_dir, straight, common, FSDP_LAUNCH)

    # The same checkpoint continued by one process without sharding: the optimizer state was
    # gathered whole and is matched to the parameters by name.
    alone = without_last_checkpoint(straight, tmp_path / "alone")
    train(config(prepared_dir, alone, *common, "train.batch_seconds=24", "resume=auto"))
    close_weights(final, weights(ckpt.checkpoints_dir(alone) / "step_4"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_parse_as_the_launcher_reads_them(path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    node = ["--machine_rank", "1", "--main_process_ip", "10.0.0.1"] if "nodes" in path.name else []
    argv = [
        "--config_file",
        str(path),
        *node,
        "-m",
        "phonetune",
        "train",
        "--config",
        "recipe.yaml",
    ]
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


def zero2_plugin_config(change=None):
    """The DeepSpeed config Accelerate builds from deepspeed_zero2_8gpu.yaml, with `change` applied."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=2, offload_optimizer_device="none", offload_param_device="none"
    )
    plugin.set_mixed_precision("bf16")
    if change:
        change(plugin.deepspeed_config)
    return plugin.deepspeed_config


@pytest.mark.parametrize(
    ("kind", "fsdp_version", "deepspeed", "overrides", "message"),
    [
        ("MEGATRON_LM", None, None, [], "Megatron-LM.*deepspeed_zero2_8gpu.yaml"),
        ("FSDP", 1, None, [], "fsdp_version: 2"),
        ("FSDP", 2, None, ["model.layerdrop=0.1"], "model.layerdrop=0.1 cannot run under FSDP"),
        ("FSDP", 2, None, ["train.mixed_precision=fp16"], "fp16 is not supported under FSDP.*bf16"),
        ("FSDP", 2, None, ["model.layerdrop=0", "train.mixed_precision=bf16-weights"], "bf16-weights runs with one process or DDP; under FSDP"),
        ("DEEPSPEED", None, None, ["model.layerdrop=0", "train.mixed_precision=bf16-weights"], "under DEEPSPEED use train.mixed_precision=bf16"),
        (
            "DEEPSPEED", None, lambda c: c["zero_optimization"].update(stage=3), [],
            r"stage is 3: phonetune train runs ZeRO stage 2",
        ),
        (
            "DEEPSPEED", None,
            lambda c: c["zero_optimization"]["offload_optimizer"].update(device="cpu"), [],
            r"offload_optimizer.device is cpu: offload is not supported",
        ),
        (
            "DEEPSPEED", None, lambda c: c.update(optimizer={"type": "AdamW"}), [],
            r"has a 'optimizer' section: phonetune builds its own",
        ),
        (
            "DEEPSPEED", None, lambda c: c.update(gradient_accumulation_steps=4), [],
            r"gradient_accumulation_steps is 4: .* train.grad_accum=4",
        ),
        (
            "DEEPSPEED", None, lambda c: c.update(gradient_clipping=0.5), [],
            r"gradient_clipping is 0.5 but train.max_grad_norm is 1",
        ),
        (
            "DEEPSPEED", None, lambda c: c["bf16"].update(check_grad_overflow=False), [],
            r"check_grad_overflow is false",
        ),
        ("DEEPSPEED", None, None, ["train.mixed_precision=fp16"], "fp16 is not supported under DeepSpeed"),
        ("DEEPSPEED", None, None, ["model.layerdrop=0.1"], r"model.layerdrop=0.1: .*model.layerdrop=0"),
        (
            "DEEPSPEED", None, None,
            ["train.weight_decay=0.01", "train.freeze_finetune_updates=10"],
            r"weight decay would shrink it",
        ),
    ],
)  # fmt: skip
def test_unsupported_launches_are_refused_with_the_fix_named(
    kind, fsdp_version, deepspeed, overrides, message, monkeypatch, tmp_path
):
    import enum
    from types import SimpleNamespace

    import accelerate

    from phonetune.data.errors import PhonetuneError
    from phonetune.train.parallel import make_parallel

    class Launched:  # what Accelerate builds under such a launch config
        def __init__(self, **kwargs):
            self.distributed_type = enum.Enum("DistributedType", [kind])[kind]
            self.is_fsdp2 = fsdp_version == 2
            self.num_processes = 8
            plugin = SimpleNamespace(deepspeed_config=zero2_plugin_config(deepspeed))
            self.state = SimpleNamespace(deepspeed_plugin=plugin)

    monkeypatch.setattr(accelerate, "Accelerator", Launched)
    monkeypatch.setattr(
        torch.cuda, "is_available", lambda: True
    )  # these launch configs are for GPUs
    with pytest.raises(PhonetuneError, match=message):
        make_parallel(config(tmp_path, tmp_path / "run", *overrides))


def test_a_gpu_launcher_config_for_deepspeed_on_cpus_says_what_runs_instead(prepared_dir, tmp_path):
    config_file = ROOT / "configs" / "accelerate" / "deepspeed_zero2_8gpu.yaml"
    launch = f"-m accelerate.commands.launch --config_file {config_file} --num_processes 2 -m phonetune train"
    launched = launch_two(
        prepared_dir, tmp_path / "run", *MICRO, "train.max_steps=1", launch=launch
    )
    assert "processes:       2 on cpu, mixed precision no" in launched.stdout
    assert (
        "warning: the launcher config asks for DeepSpeed, which Accelerate runs only on GPUs; "
        "these 2 process(es) train without it (DDP on the cpu, nothing sharded)"
    ) in launched.stdout


def test_a_launch_needing_a_missing_package_names_it(monkeypatch, tmp_path):
    import accelerate

    from phonetune.data.errors import PhonetuneError
    from phonetune.train.parallel import make_parallel

    def without_deepspeed(**kwargs):  # what Accelerator() raises under a DeepSpeed config then
        raise ImportError("DeepSpeed is not installed => run `pip install deepspeed`")

    monkeypatch.setattr(accelerate, "Accelerator", without_deepspeed)
    with pytest.raises(PhonetuneError, match=r"not installed: DeepSpeed .*\.\[deepspeed\]"):
        make_parallel(config(tmp_path, tmp_path / "run"))


def test_deepspeed_config_takes_accumulation_clipping_and_batch_from_phonetune():
    from types import SimpleNamespace

    from phonetune.train.parallel import check_deepspeed_launch

    ds = zero2_plugin_config()
    assert ds["gradient_clipping"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"
    launched = SimpleNamespace(
        num_processes=8,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)),
    )
    cfg = config("/unused", "/unused", "train.max_grad_norm=5", "train.freeze_finetune_updates=10")
    check_deepspeed_launch(launched, cfg)  # the recipe's frozen phase, without weight decay
    assert ds["gradient_clipping"] == 5.0 and ds["gradient_accumulation_steps"] == 1
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (1, 8)


@pytest.mark.parametrize("stable_layer_norm", [True, False])
def test_fsdp_layer_class_missing_from_the_model_is_named(stable_layer_norm, prepared_dir):
    from types import SimpleNamespace

    from phonetune.data.errors import PhonetuneError
    from phonetune.train.batching import load_training_data
    from phonetune.train.model import CTCModel, build_model
    from phonetune.train.parallel import check_fsdp_wrapping

    cfg = config(
        prepared_dir, "/unused", *MICRO, f"model.config.do_stable_layer_norm={stable_layer_norm}"
    )
    module = CTCModel(build_model(cfg.model, load_training_data(cfg).vocab)[0])
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["Wav2Vec2EncoderLayerStableLayerNorm"])
    launched = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))  # fsdp_8gpu.yaml's class
    if stable_layer_norm:  # XLSR-style layers: what the config names
        check_fsdp_wrapping(launched, module)
    else:  # wav2vec2-base-style layers
        with pytest.raises(
            PhonetuneError, match=r"this model's layer classes: Wav2Vec2EncoderLayer\)$"
        ):
            check_fsdp_wrapping(launched, module)


# DeepSpeed ZeRO-2 over two CPU processes: see tests/deepspeed_on_cpu.py for why not `accelerate launch`.
ZERO2_LAUNCH = f"-m torch.distributed.run --standalone --nproc_per_node 2 {ROOT / 'tests' / 'deepspeed_on_cpu.py'}"


def test_deepspeed_zero2_trains_like_one_process_and_its_checkpoints_resume_under_any_launcher(
    prepared_dir, tmp_path
):
    # Each process holds whole weights but half of the Adam state and of the reduced gradients;
    # two batches accumulate per step (phonetune tells the engine which backward closes the step);
    # layers are recomputed in the backward pass.
    common = [*DETERMINISTIC, "train.eval_steps=2", "train.grad_accum=2"]
    common += ["model.gradient_checkpointing=true"]
    (tmp_path / "zero").mkdir()
    straight = tmp_path / "zero" / "straight"
    launched = launch_two(prepared_dir, straight, *common, launch=ZERO2_LAUNCH)
    assert "2 on cpu, DeepSpeed ZeRO-2 (optimizer state and gradients sharded)" in launched.stdout
    one = tmp_path / "one"
    train(config(prepared_dir, one, *common, "train.batch_seconds=24"))

    zero_losses, zero_evals = read_metrics(straight)
    one_losses, _ = read_metrics(one)
    for key, rtol in (("loss", 1e-5), ("grad_norm", 1e-4)):  # the norm is the engine's own
        np.testing.assert_allclose(
            [r[key] for r in zero_losses], [r[key] for r in one_losses], rtol=rtol
        )
    # Checkpoints hold the whole fp32 weights and a name-keyed Adam state gathered from the shards,
    # laid out as the one-process run's.
    final = weights(ckpt.checkpoints_dir(straight) / "step_4")
    close_weights(final, weights(ckpt.checkpoints_dir(one) / "step_4"))
    zero_adam, one_adam = (
        ckpt.load_tensors(ckpt.checkpoints_dir(run) / "step_4", "optimizer.pt")
        for run in (straight, one)
    )
    assert zero_adam["state"].keys() == one_adam["state"].keys()
    assert "model.lm_head.weight" in zero_adam["state"]
    for name, state in one_adam["state"].items():
        assert float(zero_adam["state"][name]["step"]) == float(state["step"]) == 4
        for moment in ("exp_avg", "exp_avg_sq"):  # summed in another order; a misplaced shard
            torch.testing.assert_close(  # would be off by far more
                zero_adam["state"][name][moment], state[moment], rtol=1e-2, atol=1e-6
            )
    groups = [[g["params"], g["weight_decay"], g["lr"]] for g in zero_adam["param_groups"]]
    assert groups == [[g["params"], g["weight_decay"], g["lr"]] for g in one_adam["param_groups"]]
    assert_every_dev_clip_counted_once(zero_evals, prepared_dir)

    # Killed after step 3, continued under ZeRO-2: bit for bit the same run.
    assert_resume_is_exact(prepared_dir, straight, common, ZERO2_LAUNCH)

    # The ZeRO-2 checkpoint continued by one process, and the one-process checkpoint by ZeRO-2.
    alone = without_last_checkpoint(straight, tmp_path / "alone")
    train(config(prepared_dir, alone, *common, "train.batch_seconds=24", "resume=auto"))
    close_weights(final, weights(ckpt.checkpoints_dir(alone) / "step_4"))
    adopted = without_last_checkpoint(one, tmp_path / "zero" / "adopted")
    launch_two(prepared_dir, adopted, *common, "resume=auto", launch=ZERO2_LAUNCH)
    close_weights(weights(ckpt.checkpoints_dir(one) / "step_4"), final)
    close_weights(weights(ckpt.checkpoints_dir(adopted) / "step_4"), final)


def test_deepspeed_zero2_frozen_transformer_phase_trains_only_the_head(prepared_dir, tmp_path):
    # Step 1 runs the encoder without gradients: ZeRO updates its parameters with a zero gradient
    # (weight decay 0), which must leave them as they were, so step 2 starts where one process
    # without ZeRO starts it. (From step 3 the Adam step counts differ: see train/parallel.py.)
    common = [*DETERMINISTIC, "train.freeze_finetune_updates=1", "train.max_steps=2"]
    (tmp_path / "zero").mkdir()
    launch_two(prepared_dir, tmp_path / "zero" / "run", *common, launch=ZERO2_LAUNCH)
    train(config(prepared_dir, tmp_path / "one", *common, "train.batch_seconds=24"))
    zero_losses, one_losses = (
        read_metrics(run)[0] for run in (tmp_path / "zero" / "run", tmp_path / "one")
    )
    assert [r["frozen_transformer"] for r in zero_losses] == [True, False]
    np.testing.assert_allclose(
        [r["loss"] for r in zero_losses], [r["loss"] for r in one_losses], rtol=1e-5
    )


def test_deepspeed_zero2_skips_a_step_whose_gradient_is_nan_on_one_process(
    prepared_dir, tmp_path, monkeypatch
):
    # NaN in one clip on process 0 only: the engine's overflow check is reduced over the
    # processes, so both skip step 3 (no update) and go on.
    monkeypatch.setenv("PHONETUNE_TEST_NAN_STEP", "3")
    run = tmp_path / "zero" / "run"
    run.parent.mkdir()
    steps = ["train.save_steps=1", "train.keep_last=10"]
    launch_two(prepared_dir, run, *DETERMINISTIC, *steps, launch=ZERO2_LAUNCH)
    records = read_metrics(run)[0]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    assert [r["loss"] is None for r in records] == [False, False, True, False]
    assert records[2]["grad_norm"] is None  # non-finite, written as null
    saved = {step: weights(path) for step, path in ckpt.list_checkpoints(run)}
    assert all(torch.equal(saved[2][k], saved[3][k]) for k in saved[2])  # no update at step 3
    assert not all(torch.equal(saved[3][k], saved[4][k]) for k in saved[3])
    assert all(torch.isfinite(t).all() for t in saved[4].values())


def test_deepspeed_zero2_bf16_keeps_exact_fp32_masters_and_checkpoints_them(prepared_dir, tmp_path):
    # Under bf16 DeepSpeed casts the model to bf16 and would build its fp32 masters from that
    # rounding. With a learning rate too small to move an fp32 weight, the checkpoint's trainable
    # weights must be the initial fp32 ones (one process without DeepSpeed saves those); the frozen feature encoder is saved as the forward pass used it, in bf16 values.
    common = [*DETERMINISTIC, "train.max_steps=2", "train.lr=1e-30"]
    (tmp_path / "zero").mkdir()
    run = tmp_path / "zero" / "run"
    launched = launch_two(
        prepared_dir, run, *common, "train.mixed_precision=bf16", launch=ZERO2_LAUNCH
    )
    assert "mixed precision bf16" in launched.stdout
    train(config(prepared_dir, tmp_path / "one", *common, "train.batch_seconds=24"))
    assert all(r["loss"] is not None for r in read_metrics(run)[0])
    bf16, fp32 = (weights(ckpt.checkpoints_dir(r) / "step_2") for r in (run, tmp_path / "one"))
    encoder = [k for k in fp32 if k.startswith("wav2vec2.feature_extractor.")]
    assert encoder and all(torch.equal(bf16[k], fp32[k].bfloat16().float()) for k in encoder)
    for k in fp32:  # zero-initialised biases move by ~1e-31: nothing like a bf16 rounding
        if k not in encoder:
            torch.testing.assert_close(bf16[k], fp32[k], rtol=0, atol=1e-20)
    assert not torch.equal(fp32["lm_head.weight"], fp32["lm_head.weight"].bfloat16().float())
    # The checkpoint's model folder says fp32, so plain transformers loads the masters as saved.
    from transformers import Wav2Vec2ForCTC

    loaded = Wav2Vec2ForCTC.from_pretrained(ckpt.checkpoints_dir(run) / "step_2" / "model")
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight.detach(), bf16["lm_head.weight"])
