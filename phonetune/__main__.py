"""`python -m phonetune COMMAND ...`, the same as the `phonetune` command; in particular
`accelerate launch [options] -m phonetune train --config FILE [key=value ...]`, one training
process of several (Accelerate's launcher starts one per device and sets up their process group).

One launcher form needs help: `accelerate launch --cpu --num_processes N` starts a *single*
process unless MPI is configured (Accelerate's multi-CPU mode goes through `mpirun`). That process
finds the launcher's `--num_processes` and becomes N processes through torch's own launcher
(`torch.distributed.run`, as `--multi_gpu` would), which then join a gloo group on the CPU.
"""

from __future__ import annotations

import os
import sys

from phonetune.cli import main
from phonetune.data.errors import PhonetuneError


def launch() -> int:
    if sys.argv[1:2] == ["train"]:
        from phonetune.train.parallel import cpu_launch_processes

        try:
            processes = cpu_launch_processes()
        except PhonetuneError as error:
            print(f"phonetune train: error: {error}", file=sys.stderr)
            return 2
        if processes > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run"]
            launcher += [f"--nproc_per_node={processes}", "--nnodes=1"]
            launcher += ["--master_addr", os.environ["MASTER_ADDR"]]
            launcher += ["--master_port", os.environ.get("MASTER_PORT", "29500")]
            sys.stdout.flush()
            os.execv(sys.executable, [*launcher, "-m", "phonetune", *sys.argv[1:]])
    return main()


if __name__ == "__main__":
    sys.exit(launch())
