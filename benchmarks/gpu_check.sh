#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA GPU and no network (issue 12):
#   1. the `cuda` test set (pytest -m cuda's files),
#   2. bench_stitch.py --device cuda (stitch add: from memory, prepared, one-launch vs per-tensor),
#   3. bench_real.py --device cuda, stages in order of need, for whatever time is left.
# Usage: OUT=<folder for results> SKILLBANK_CACHE=<pulled wheels' files> bash benchmarks/gpu_check.sh [seconds]
# Here, first: python benchmarks/gpu_carry.py pack benchmarks/_carry; then run this there with
# SKILLBANK_CACHE=benchmarks/_carry and carry=["benchmarks/_carry"] (gpu_carry.py's docstring says why).
set -u
OUT=${OUT:-/tmp/gpu-check}
BUDGET=${1:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="python3 -P"  # -P: the installed package, not the source folder, even for -m
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, triton, lightning, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/sb . > "$OUT/install.log" 2>&1 || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/sb

# A cache packed by benchmarks/gpu_carry.py (weights in float16, large text files xz'd, to fit the
# 64 MiB transfer) is restored first: the real benchmark's figures then come from float16-rounded weights.
if [ -n "${SKILLBANK_CACHE:-}" ]; then
  $PY benchmarks/gpu_carry.py unpack "$SKILLBANK_CACHE" > "$OUT/unpack.log" 2>&1 || { echo "unpack failed"; cat "$OUT/unpack.log"; exit 1; }
  export SKILLBANK_CACHE=$(cd "$SKILLBANK_CACHE" && pwd)
fi

echo "== cuda tests ($SECONDS s)"
timeout 240 $PY -m pytest -p no:cacheprovider -q -m cuda -o addopts="" tests/test_cuda.py tests/stitching/test_stitcher_cuda.py \
  tests/stitching/test_multi_tensor.py tests/callbacks/test_callbacks_cuda.py tests/test_default_device.py -W ignore::DeprecationWarning > "$OUT/tests.log" 2>&1
echo "tests exit $?" >> "$OUT/tests.log"; tail -3 "$OUT/tests.log"

echo "== bench_stitch ($SECONDS s)"
timeout 200 $PY benchmarks/bench_stitch.py --device cuda --skills 100 --out "$OUT/stitch.json" > "$OUT/stitch.log" 2>&1
echo "bench_stitch exit $?" >> "$OUT/stitch.log"; tail -30 "$OUT/stitch.log"

echo "== bench_real ($SECONDS s)"
WORK=/tmp/real-gpu
# REAL_STAGES: space-separated groups, run in order while time is left (e.g. "pull,finetune,localize switch lora,pooler")
for stages in ${REAL_STAGES:-pull,finetune,localize evaluate curve,report switch auto context,arrivals lora,pooler report}; do
  left=$((BUDGET - SECONDS))
  [ $left -lt 20 ] && { echo "no time left for $stages" >> "$OUT/real.log"; continue; }
  timeout $left $PY benchmarks/bench_real.py --work $WORK --device cuda --stages $stages --switch-bank learned \
    >> "$OUT/real.log" 2>&1
  echo "stages $stages exit $? at $SECONDS s" >> "$OUT/real.log"
done
tar -czf "$OUT/real-work.tgz" -C $WORK --exclude=finetuned --exclude=banks . 2>/dev/null
tail -5 "$OUT/real.log"
echo "done at $SECONDS s"
