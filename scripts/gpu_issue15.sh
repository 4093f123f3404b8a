#!/usr/bin/env bash
# The GPU measurements issue 15 still needs, prepared so that a session lent a GPU runs each part in
# one device call (each part is sized to end inside 600 s on an H200, by estimate: none has run yet).
#
#   bash scripts/gpu_issue15.sh PART OUT_DIR
#
#   quick   the first call to make (about 5 min by estimate, leaving time to rerun within a
#           session's 15 min of device time): scripts/check_ctc.py, then the recipe's step today
#           (bf16 autocast, eager, PyTorch's CTC) against everything built since (bf16-weights,
#           train.compile=true, the Triton CTC) at 160 and 80 s, each with a profile at 80 s
#   steps   the recipe's step (bf16 autocast) against train.mixed_precision=bf16-weights, eager and
#           compiled, at 160 then 80 s per batch; profiles of the autocast and bf16-weights steps
#           at 80 s (kernel launches and host synchronisations per step)
#   graphs  CUDA graphs (train.compile=reduce-overhead, LayerDrop by torch.where) against eager on
#           a 0.25 s shape grid (24 batch shapes at 80 s, 2.5% padding: scripts/shape_grid.py),
#           both with bf16 weights and the Triton CTC (PyTorch's would wait on the host inside the
#           step that the graphs replay)
#   ctc     train.ctc_implementation=triton: the kernels against PyTorch's CTC at the recipe's
#           shapes (scripts/check_ctc.py: same results, host synchronisations, time per call),
#           then bf16-weights steps at 80 s with each CTC, with profiles
#   width   the memory table train.batch_seconds_by_width for this card (bench_gpu --width-table)
#   sharded DeepSpeed ZeRO-2 on the GPU (scripts/check_sharded_gpu.py, one process), and fp16
#           with its loss scaler (the tiny recipe, one GPU: the skipped steps are in
#           metrics.jsonl), both on a small espeak-ng corpus. DeepSpeed is a source archive
#           (scripts/gpu_wheels.sh --deepspeed fetches it with its dependencies), installed there
#           with `DS_BUILD_OPS=0 python3 -m pip install -q --no-build-isolation --no-deps
#           --target /tmp/site .whl/deepspeed-*.tar.gz`
#
# Each run writes OUT_DIR/<name>/bench_gpu.json; put them into BENCHMARKS.md with
#   python scripts/bench_gpu.py --write-section name=OUT_DIR/name/bench_gpu.json ...
#
# The device image has torch, transformers, accelerate, triton and pyarrow but not everything
# phonetune imports: fetch the rest here with `bash scripts/gpu_wheels.sh` (`--deepspeed` for the
# sharded part), carry ".whl", and start the call with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
# This script then makes `phonetune` importable from the working tree itself.
#
# Rehearsed on a CPU with the tiny model (tests/test_bench_gpu.py runs the graphs part so):
#   GPU_ISSUE15_OPTIONS="--config configs/tiny_cpu.yaml --architecture= --clips 40 --budgets 12
#   --warmup 2 --steps 2 --profile-budget 12" bash scripts/gpu_issue15.sh steps /tmp/rehearsal
# (a small profile: the Triton CTC runs in Triton's interpreter there, about a minute per step
# at 80 s)
set -euo pipefail
part=${1:?PART: quick, steps, graphs, ctc, width or sharded}
out=${2:?OUT_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# phonetune's import name over the tree's folders (pyproject's package-dir), without installing
if ! python3 -c "import phonetune.train" 2>/dev/null; then
    pkg=/tmp/phonetune_pkg/phonetune
    mkdir -p "$pkg"
    cp phonetune/*.py "$pkg"/
    for folder in data train infer configs; do ln -sfn "$repo/$folder" "$pkg/$folder"; done
    export PYTHONPATH=/tmp/phonetune_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

# The eager FLOP count of XLSR-53 per audio second (BENCHMARKS.md, GPU table): compiled blocks
# hide their operations from the counter, so every row uses the same number.
common=(--clips 1500 --search-start 0 --harness-rounds 0 --flop-steps 0
        --model-flop-per-audio-s 110978881159.81554)
# GPU_ISSUE15_OPTIONS: bench_gpu.py options that override every run's (a rehearsal on a CPU:
# "--config configs/tiny_cpu.yaml --architecture= --clips 40 --budgets 12 --warmup 2 --steps 2
# --profile-budget 12").
read -r -a rehearsal <<< "${GPU_ISSUE15_OPTIONS:-}"
# CHECK_CTC_OPTIONS: the same for scripts/check_ctc.py ("--rows 3 --frames 30 --labels 8 --repeats 1")
read -r -a ctc_rehearsal <<< "${CHECK_CTC_OPTIONS:-}"
bench() {  # bench NAME LABEL OPTIONS...
    local name=$1 label=$2
    shift 2
    python3 scripts/bench_gpu.py --out "$out/$name" --label "$label" "${common[@]}" "$@" \
        "${rehearsal[@]}" 2>&1 | tee "$out/$name.log" | grep -v "^  step" || true
}
check_ctc() {  # a mismatch is reported, and the timings after it still run
    python3 scripts/check_ctc.py --out "$out/ctc.json" "${ctc_rehearsal[@]}" 2>&1 | tail -n 30 ||
        echo "check_ctc.py FAILED: the Triton CTC's timings below are not of a correct loss"
}
mkdir -p "$out"
case $part in
    quick)
        check_ctc
        bench recipe "recipe: autocast, eager, PyTorch CTC" --budgets 160,80 --warmup 40 \
            --steps 30 --profile-budget 80
        bench built "bf16-weights, compiled, Triton CTC" --budgets 160,80 --warmup 40 --steps 30 \
            --profile-budget 80 train.mixed_precision=bf16-weights train.compile=true \
            train.ctc_implementation=triton
        ;;
    steps)
        bench autocast "autocast, eager" --budgets 160,80 --warmup 60 --steps 40 --profile-budget 80
        bench masters "bf16-weights, eager" --budgets 160,80 --warmup 60 --steps 40 \
            --profile-budget 80 train.mixed_precision=bf16-weights
        bench masters_compiled "bf16-weights, compiled" --budgets 160,80 --warmup 60 --steps 40 \
            train.mixed_precision=bf16-weights train.compile=true
        ;;
    graphs)
        grid=(train.pad_to_multiple_of=4000 train.bucket_width=0.25 train.pad_clips_to_budget=true
              train.mixed_precision=bf16-weights train.ctc_implementation=triton)
        bench grid_eager "grid, bf16-weights, Triton CTC, eager" --budgets 80 --warmup 100 --steps 40 "${grid[@]}"
        bench grid_graphs "grid, bf16-weights, Triton CTC, CUDA graphs" --budgets 80 --warmup 100 --steps 40 \
            --profile-budget 80 "${grid[@]}" train.compile=reduce-overhead
        ;;
    ctc)
        check_ctc
        bench masters_80 "bf16-weights, eager, PyTorch CTC" --budgets 80 --warmup 60 --steps 40 \
            --profile-budget 80 train.mixed_precision=bf16-weights
        bench masters_80_triton "bf16-weights, eager, Triton CTC" --budgets 80 --warmup 60 \
            --steps 40 --profile-budget 80 train.mixed_precision=bf16-weights \
            train.ctc_implementation=triton
        ;;
    width)
        bench width "width table" --budgets '' --width-table 2,4,8,16,20
        ;;
    sharded)
        python3 -m phonetune synth --out "$out/cv" --locales en,fr,de --clips-per-locale 200
        python3 -m phonetune prepare --cv-root "$out/cv" --locales en,fr,de --out "$out/prep"
        python3 scripts/check_sharded_gpu.py --prepared-dir "$out/prep" --out "$out/zero2" \
            --accelerate-config configs/accelerate/deepspeed_zero2_8gpu.yaml 2>&1 | tail -n 40
        python3 -m phonetune train --config tiny_cpu data.prepared_dir="$out/prep" \
            run.output_dir="$out/fp16" train.mixed_precision=fp16 train.max_steps=300 \
            train.eval_steps=300 train.save_steps=300 log.progress_bar=false 2>&1 | tail -n 20
        grep '"skipped_steps"' "$out/fp16/metrics.jsonl" | tail -n 1
        ;;
    *)
        echo "unknown part $part: quick, steps, graphs, ctc, width or sharded" >&2
        exit 2
        ;;
esac
