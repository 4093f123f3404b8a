"""`python -m torch.distributed.run --nproc_per_node N tests/deepspeed_on_cpu.py --config ...`:
phonetune train under DeepSpeed ZeRO stage 2 on CPU processes (gloo), for tests.

Accelerate runs DeepSpeed only on accelerator devices (on CPUs `accelerate launch --use_deepspeed`
falls back to DDP), while DeepSpeed itself runs ZeRO-2 on its CPU accelerator over the gloo group.
So this launcher builds the accelerator as `phonetune train` does, then sets the distributed type
and the plugin that `accelerate launch --config_file configs/accelerate/deepspeed_zero2_8gpu.yaml`
sets on GPUs, in the run's train.mixed_precision (fp32 where the tests compare losses), through the
training loop's public `Hooks`. Everything after that (the engine, its optimizer, phonetune's
checks and checkpoints) is the code that runs on GPUs. PHONETUNE_TEST_NAN_STEP=N writes a NaN into
step N's audio on process 0 only.
"""

import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

from phonetune.cli import main
from phonetune.train import parallel
from phonetune.train.loop import Hooks


def make_deepspeed_parallel(config):
    accelerator = parallel.make_parallel(config).accelerator
    plugin = DeepSpeedPlugin(  # deepspeed_zero2_8gpu.yaml's settings
        zero_stage=2,
        gradient_accumulation_steps=1,
        offload_optimizer_device="none",
        offload_param_device="none",
        zero3_init_flag=False,
    )
    plugin.set_mixed_precision(config.train.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    accelerator.state.deepspeed_plugins = plugin
    accelerator.deepspeed_engine_wrapped = None  # what Accelerator() sets up for a DeepSpeed launch
    # Set on both: every AcceleratorState() copies the process state's value back over its own.
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    PartialState().distributed_type = DistributedType.DEEPSPEED
    return parallel.checked(accelerator, config)


def poison_on_first_process(step):
    """NaN into the audio of `step`'s first batch on process 0 only (PHONETUNE_TEST_NAN_STEP)."""

    def on_batches(run, number, batches):
        if number == step and os.environ.get("RANK") == "0":
            batches[0].input_values[0, 1000:1100] = float("nan")

    return on_batches


def use_gloo_only():
    """DeepSpeed's CPU backend would compile a C++ shared-memory all-reduce on first use (a compiler
    needed, ~30 s) and route CPU collectives through it; on GPUs it is never built. Collectives
    then go through torch.distributed's gloo group, as every other CPU test's."""
    import importlib

    # By module name: the attribute `deepspeed.comm.torch` is PyTorch itself (imported there).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


if __name__ == "__main__":
    use_gloo_only()
    hooks = Hooks(make_parallel=make_deepspeed_parallel)
    if "PHONETUNE_TEST_NAN_STEP" in os.environ:
        hooks.on_batches = poison_on_first_process(int(os.environ["PHONETUNE_TEST_NAN_STEP"]))
    sys.exit(main(["train", *sys.argv[1:]], hooks))
