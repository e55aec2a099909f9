#!/usr/bin/env bash
# GPU checks and benchmark of the Performer attention kernels, for the device tool:
#
#   bash scripts/gpu_attention.sh [tests] [sweep] [bench]     (default: tests sweep bench)
#
# tests: the kernel tests at full sizes (tests/test_gpu_attention.py) and the small-shape ones,
#        on CUDA; sweep: panther's kernel groups per (chunk, warps) setting; bench: `python -m
#        panther bench attention` on the issue's shapes, with the sweep's best settings.
# Logs and JSON go to $OUT (default /tmp/gpu_attention).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_attention}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
# panther is not installed there: an editable install, or (if that fails) links that give
# panther.kernels / panther.passes their installed names inside this copy of the tree.
python -c "import panther.kernels" 2>/dev/null || pip install -e . --no-deps --no-build-isolation -q --root-user-action=ignore >"$OUT/pip.log" 2>&1
python -c "import panther.kernels" 2>/dev/null || { ln -sfn ../kernels panther/kernels; ln -sfn ../passes panther/passes; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sweep bench)
for step in "${steps[@]}"; do
  case $step in
    tests)
      timeout 170 python -m pytest -q -n 8 -p no:cacheprovider tests/test_gpu_attention.py tests/test_kernels_performer.py 2>&1 | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error:|error [0-9]" | tail -30 ;;
    sweep)  # best (chunk, warps) per kernel group at B=4, H=12, N=16384, d=64, m=256 -> sweep.json
      timeout 200 python -m panther bench attention --sweep --shapes 4:12:16384:64:256 --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" ;;
    bench)  # with the sweep's settings when this run made one
      tuned=(); [ -f "$OUT/sweep.json" ] && tuned=(--tuned "$OUT/sweep.json")
      timeout 220 python -m panther bench attention --shapes issue "${tuned[@]}" --json "$OUT/attention.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^# done' ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
true
