#!/usr/bin/env bash
# GPU checks and benchmark of the low-rank linear kernels, in one call of the device tool:
#
#   scripts/gpu_linear.sh [tests] [bench] [explore]      (default: tests bench)
#
# tests:   the kernel tests (tests/test_kernels_lowrank_linear.py, now on CUDA) and the GPU-only
#          tests (full sizes, SKLinear training step, torch.compile): tests/test_gpu_linear.py.
# bench:   python -m panther bench linear (BENCH_ARGS, default: bf16 and fp32, the issue's shapes,
#          both forward paths), table and JSON under $OUT.
# explore: fp32 "ieee" against "tf32x3" at the headline shape.
#
# The package is not installed on the device machine: it is assembled under /tmp/pkg the way
# pyproject's package-dir lays it out (kernels/ and passes/ inside panther/).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_linear_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-tests bench}
root=$(pwd)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r panther /tmp/pkg/ && cp -r kernels /tmp/pkg/panther/kernels \
  && cp -r passes /tmp/pkg/panther/passes
export PYTHONPATH=/tmp/pkg:$root/tests
# Run from an empty directory: from the repo root, python would import ./panther (without kernels/).
mkdir -p /tmp/run && cd /tmp/run
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
rc=0
for stage in $stages; do
  case $stage in
    tests)
      python3 -m pytest -q -n 8 -p no:cacheprovider --durations=10 -rf \
        "$root/tests/test_kernels_lowrank_linear.py" "$root/tests/test_gpu_linear.py" 2>&1 | tee "$OUT/tests.txt" || rc=1 ;;
    bench)
      python3 -m panther bench linear ${BENCH_ARGS:---dtype bf16,fp32 --shapes issue --paths --graph} \
        --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || rc=1 ;;
    explore)
      python3 - <<'PY' 2>&1 | tee "$OUT/explore.txt" || rc=1
import torch, triton.testing as tt
import panther
from panther.kernels.lowrank_linear import triton as tk, reference as ref
T, n = 4096, 8192
x = torch.randn(T, n, device="cuda")
S1s = torch.randn(1, n, 16, device="cuda") / n**0.5; S2s = torch.randn(1, 16, n, device="cuda") / n**0.5
U1s = torch.randn(1, 16, n, device="cuda").sign() / 4; U2s = torch.randn(1, n, 16, device="cuda").sign() / 4
b = torch.randn(n, device="cuda")
want = ref.sklinear_forward(*(t.double() for t in (x, S1s, S2s, U1s, U2s, b)))
for prec in (0, 2):
    tk._FP32_HIGHEST = prec
    for path in ("fused", "split"):
        f = lambda: tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b, path=path)
        y = f()
        err = ((y.double() - want).norm() / want.norm()).item()
        print(f"fp32 prec={prec} {path}: {tt.do_bench(f, return_mode='median') * 1e3:.1f} us  rel err {err:.2e}")
PY
      ;;
  esac
done
exit $rc
