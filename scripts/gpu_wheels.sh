#!/usr/bin/env bash
# The wheels a device call needs beside its image (torch, transformers, accelerate, pyarrow, numpy,
# triton... are there; the device tool's KINDS.md lists them), fetched here once, before the first
# device call of a session: the device machine cannot reach a registry.
#
#   bash scripts/gpu_wheels.sh [--deepspeed]     # -> .whl/ (ignored by git; carry it: ".whl")
#
# then begin each device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
# --deepspeed adds what gpu_issue15.sh's `sharded` part needs: DeepSpeed is a source archive,
# installed there with DS_BUILD_OPS=0 pip install --no-build-isolation --no-deps --target /tmp/site
# .whl/deepspeed-*.tar.gz. The image's Python is 3.12 on x86-64; the versions are the ones CI
# installed on 2026-12-08.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # the prepared dataset (Arrow)
    rapidfuzz==3.14.6                                  # phone error rate
    soundfile==0.14.0 cffi==2.1.1 pycparser==3.12      # audio I/O
    soxr==1.1.0                                        # resampling
    phonemizer==3.4.0 dlinfo==2.0.0 espeakng-loader==0.2.4  # espeak-ng (synth, prepare)
)
if [[ ${1:-} == --deepspeed ]]; then
    wheels+=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
             typing-inspection==0.4.5)
    python3 -m pip download --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
fi
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
du -sh .whl  # a device call carries at most 64 MiB with the working tree
