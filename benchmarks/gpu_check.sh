#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA GPU and no network (issue 12):
#   1. the `cuda` test set (pytest -m cuda's files),
#   2. bench_stitch.py --device cuda (stitch add: from memory, prepared, one-launch vs per-tensor),
#   3. bench_real.py --device cuda, stages in order of need, for whatever time is left.
# Usage: OUT=<folder for results> SKILLBANK_CACHE=<pulled wheels' files> bash benchmarks/gpu_check.sh [seconds]
# The pulled cache may carry the MiniLM weights as float16 (model.fp16.safetensors, to fit a 64 MiB transfer):
# they are restored to float32 first, and the real benchmark's figures then come from those weights.
set -u
OUT=${OUT:-/tmp/gpu-check}
BUDGET=${1:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="python3 -P"  # -P: the installed package, not the source folder, even for -m
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, triton, lightning, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/sb . > "$OUT/install.log" 2>&1 || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/sb

fp16=$(find "${SKILLBANK_CACHE:-/nonexistent}" -name model.fp16.safetensors 2>/dev/null | head -1)
if [ -n "$fp16" ]; then
  $PY - "$fp16" <<'EOF'
import os, sys
from safetensors.torch import load_file, save_file
half = sys.argv[1]
state = load_file(half)
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()},
          os.path.join(os.path.dirname(half), "model.safetensors"), metadata={"format": "pt"})
os.remove(half)
EOF
fi

echo "== cuda tests ($SECONDS s)"
timeout 240 $PY -m pytest -p no:cacheprovider -q -m cuda -o addopts="" tests/test_cuda.py tests/stitching/test_stitcher_cuda.py \
  tests/stitching/test_multi_tensor.py tests/callbacks/test_callbacks_cuda.py -W ignore::DeprecationWarning > "$OUT/tests.log" 2>&1
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
