"""`python -m torch.distributed.run --nproc_per_node N tests/fsdp_on_cpu.py --config ...`: phonetune
train under FSDP version 2 on CPU processes (gloo), for tests.

Accelerate turns FSDP on only for accelerator devices (on CPUs `accelerate launch --use_fsdp` runs
DDP), while torch's `fully_shard` itself shards over a CPU process group. So this launcher builds
the accelerator as `phonetune train` does, then sets the distributed type and FSDP plugin that
`accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml` sets on GPUs (through the
training loop's public `Hooks.make_parallel`). Everything after that (preparing the model,
gathering weights for checkpoints, evaluation) is phonetune's and Accelerate's code for FSDP,
unchanged.
"""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from phonetune.cli import main
from phonetune.train import parallel
from phonetune.train.loop import Hooks


def make_fsdp_parallel(config):
    accelerator = parallel.make_parallel(config).accelerator
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(  # fsdp_8gpu.yaml's settings
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Wav2Vec2EncoderLayerStableLayerNorm"],
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    # Set on both: every AcceleratorState() copies the process state's value back over its own.
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    return parallel.checked(accelerator, config)


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], Hooks(make_parallel=make_fsdp_parallel)))
