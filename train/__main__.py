"""`accelerate launch [options] -m train --config FILE [key=value ...]`: one training process.

The same training as `phonetune train`; Accelerate's launcher starts one of these per device and
sets up the process group they share.

One launcher form needs help: `accelerate launch --cpu --num_processes N` starts a *single*
process unless MPI is configured (Accelerate's multi-CPU mode goes through `mpirun`). That process
finds the launcher's `--num_processes` and becomes N processes through torch's own launcher
(`torch.distributed.run`, as `--multi_gpu` would), which then join a gloo group on the CPU.
"""

from __future__ import annotations

import os
import sys

from data.errors import PhonetuneError

# Set by an MPI or torchrun launcher: this process is already one of several.
_GROUP_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def find_cpu_launch_processes() -> int:
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
            "--rdzv_endpoint HOST:PORT -m train ...` on every machine."
        )
    return int(processes or 1)


def main() -> int:
    from train.loop import main as train_main

    try:
        processes = find_cpu_launch_processes()
    except PhonetuneError as error:
        print(f"phonetune train: error: {error}", file=sys.stderr)
        return 2
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run"]
        launcher += [f"--nproc_per_node={processes}", "--nnodes=1"]
        launcher += ["--master_addr", os.environ["MASTER_ADDR"]]
        launcher += ["--master_port", os.environ.get("MASTER_PORT", "29500")]
        sys.stdout.flush()
        os.execv(sys.executable, [*launcher, "-m", "train", *sys.argv[1:]])
    return train_main()


if __name__ == "__main__":
    sys.exit(main())
