#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md ("GPU"), in one run on a lent device machine:
#   run on the device:  bash bench/device_h200.sh      (carry .whl: loss-landscapes' wheel, see below)
# The machine has torch, transformers and safetensors but not loss-landscapes; its wheel travels in .whl/
# (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl loss-landscapes==3.0.6).
# Each part has its own time limit so that a slow one cannot take the rest with it; output goes to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc;
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
timeout ${GPU_BENCH_S:-290} python3 bench/bench_gpu.py --device cuda --repeats 2 2>&1 | tee "$OUT/bench_gpu.txt"
timeout ${MERGE_BENCH_S:-190} python3 bench/bench_merge.py --sizes 1B --tools ours-cpu,ours-cuda --repeats 2 2>&1 \
  | grep -v "Writing model" | tee "$OUT/bench_merge.txt"
