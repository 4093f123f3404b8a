#!/bin/bash
# Multi-node phonetune training under SLURM, requeued on preemption or at the time limit.
#
#   PREPARED=/data/cv61_prepared RUN_DIR=/runs/xlsr53_cv61 sbatch scripts/slurm_train.sh [KEY=VALUE ...]
#
# One task per GPU, started by srun itself (no `accelerate launch`/torchrun agent in between):
# SLURM's SIGTERM reaches every training process directly, and torch.distributed reads the rank
# from the variables set below. On SIGTERM (sent by SLURM 300 s before the time limit through
# --signal, or on preemption) every process finishes its step, the run saves a checkpoint and
# exits; this script then requeues the job, and the next start continues with resume=auto.
# Extra arguments are training overrides (e.g. train.grad_accum=2).
#
#SBATCH --job-name=phonetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --open-mode=append
#SBATCH --output=phonetune-%j.out

set -uo pipefail

CONFIG=${CONFIG:-configs/xlsr53_espeak_cv.yaml}
: "${PREPARED:?set PREPARED to the prepared dataset directory}"
: "${RUN_DIR:?set RUN_DIR to the run directory (the same on every restart)}"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}

echo "phonetune: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS processes"

# RANK / WORLD_SIZE / LOCAL_RANK as torchrun would set them, per task.
srun --kill-on-bad-exit=1 bash -c '
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  exec python -m phonetune train --config "$0" data.prepared_dir="$1" run.output_dir="$2" resume=auto "${@:3}"
' "$CONFIG" "$PREPARED" "$RUN_DIR" "$@" &
training=$!

preempted=0
on_term() {
  preempted=1
  echo "phonetune: SIGTERM received, asking every process to checkpoint and stop"
  kill -TERM "$training" 2>/dev/null  # srun passes it on to every task
}
trap on_term TERM

# `wait` returns early when the trap fires; wait again until training has saved and exited.
wait "$training"
status=$?
while kill -0 "$training" 2>/dev/null; do
  wait "$training"
  status=$?
done

if [ "$preempted" = 1 ]; then
  echo "phonetune: training stopped with status $status; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
