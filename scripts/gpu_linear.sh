#!/usr/bin/env bash
# GPU checks and benchmark of the low-rank linear kernels, in one call of the device tool:
#
#   scripts/gpu_linear.sh [bench] [tests] [firstcall] [explore]      (default: bench tests)
#
# bench:   python -m panther bench linear (BENCH_ARGS, default: bf16 and fp32, the issue's shapes,
#          CUDA-graph times too), table and JSON (with every candidate the plans timed) under $OUT.
# tests:   the kernel tests (tests/test_kernels_lowrank_linear.py, now on CUDA) and the GPU-only
#          tests (full sizes, direct launches, CUDA graphs, tuning, SKLinear training step,
#          torch.compile): tests/test_gpu_linear.py; EXTRA_TESTS adds more test paths.
# firstcall: scripts/first_call.py, the first call of tuning plans with and without compiling their
#          candidates ahead, each in a fresh process with an empty triton cache.
# hostprof: cProfile of the host side of forward+backward at T = 1.
# explore: at the headline shape, fp32 "ieee" against "tf32x3" (time and error), and the previous
#          kernel revision when .scratch/triton_prev.py is carried along.
#
# Each stage has its own time limit (BENCH_LIMIT_S, TESTS_LIMIT_S, EXPLORE_LIMIT_S; default 240 s)
# so one slow stage cannot eat the others. The package is not installed on the device machine: it is assembled under /tmp/pkg
# the way pyproject's package-dir lays it out (kernels/ and passes/ inside panther/).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_linear_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
stages=${*:-bench tests}
root=$(pwd)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r panther /tmp/pkg/ && cp -r kernels /tmp/pkg/panther/kernels \
  && cp -r passes /tmp/pkg/panther/passes
[ -f .scratch/triton_prev.py ] && cp .scratch/triton_prev.py /tmp/pkg/panther/kernels/lowrank_linear/triton_prev.py
export PYTHONPATH=/tmp/pkg:$root/tests
# Run from an empty directory: from the repo root, python would import ./panther (without kernels/).
mkdir -p /tmp/run && cd /tmp/run
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
rc=0
for stage in $stages; do
  t0=$(date +%s)
  case $stage in
    tests)
      timeout "${TESTS_LIMIT_S:-240}" python3 -m pytest -q -n 8 -p no:cacheprovider --durations=8 -rf \
        "$root/tests/test_kernels_lowrank_linear.py" "$root/tests/test_gpu_linear.py" ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/tests.txt" || rc=1 ;;
    bench)
      timeout "${BENCH_LIMIT_S:-240}" python3 -m panther bench linear ${BENCH_ARGS:---dtype bf16,fp32 --shapes issue --graph} \
        --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || rc=1 ;;
    firstcall)
      timeout "${FIRSTCALL_LIMIT_S:-240}" python3 "$root/scripts/first_call.py" --json "$OUT/first_call.json" 2>&1 \
        | tee "$OUT/first_call.txt" || rc=1 ;;
    explore)
      timeout "${EXPLORE_LIMIT_S:-240}" python3 - <<'PY' 2>&1 | tee "$OUT/explore.txt" || rc=1
import importlib, time
import torch, triton.testing as tt
import panther  # noqa: F401
from panther.kernels.lowrank_linear import triton as tk, reference as ref

T, n = 4096, 8192
op = torch.ops.panther.sklinear


def layer(dtype):
    torch.manual_seed(0)
    S1s = torch.randn(1, n, 16, device="cuda") / n**0.5
    S2s = torch.randn(1, 16, n, device="cuda") / n**0.5
    U1s = torch.randn(1, 16, n, device="cuda").sign() / 4
    U2s = torch.randn(1, n, 16, device="cuda").sign() / 4
    b = torch.randn(n, device="cuda") / n**0.5
    x = torch.randn(T, n, device="cuda")
    g = torch.randn(T, n, device="cuda")
    return [t.to(dtype) for t in (x, S1s, S2s, U1s, U2s, b, g)]


def bench(f, **kw):
    return tt.do_bench(f, warmup=5, rep=20, return_mode="median", **kw) * 1e3


def run(fwd, fwdbwd, leaves, want, label):
    t0 = time.perf_counter(); y = fwd(); torch.cuda.synchronize(); first = time.perf_counter() - t0
    err = ((y.double() - want).norm() / want.norm()).item()
    t_f = bench(fwd)
    fwdbwd(); t_b = bench(fwdbwd, grad_to_none=leaves)
    print(f"{label:<34} fwd {t_f:7.1f} us  fwd+bwd {t_b:7.1f} us  rel err {err:.2e}  first call {first:.2f} s")


x, S1s, S2s, U1s, U2s, b, g = layer(torch.float32)
want = ref.sklinear_forward(*(t.double() for t in (x, S1s, S2s, U1s, U2s, b)))
default = tk._FP32_HIGHEST
for prec in (0, 2):
    tk._FP32_HIGHEST = prec
    tk._PLANS.clear()
    xg, S1g, S2g = (t.detach().requires_grad_() for t in (x, S1s, S2s))
    run(lambda: op(x, S1s, S2s, U1s, U2s, b), lambda: op(xg, S1g, S2g, U1s, U2s, b).backward(g), [xg, S1g, S2g],
        want, f"fp32 {['ieee', 'tf32', 'tf32x3'][prec]} (this revision)")
tk._FP32_HIGHEST = default
try:
    prev = importlib.import_module("panther.kernels.lowrank_linear.triton_prev")
except ImportError:
    prev = None
if prev is not None:
    from torch._library.triton import set_wrap_triton_enabled

    for dtype in (torch.bfloat16, torch.float32):
        x, S1s, S2s, U1s, U2s, b, g = layer(dtype)
        want = ref.sklinear_forward(*(t.double() for t in (x, S1s, S2s, U1s, U2s, b)))
        with set_wrap_triton_enabled(False):  # direct launches, as inside the op
            run(lambda: prev.sklinear_forward(x, S1s, S2s, U1s, U2s, b),
                lambda: (prev.sklinear_forward(x, S1s, S2s, U1s, U2s, b),
                         prev.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True)),
                None, want, f"previous revision {str(dtype)[6:]}")
PY
      ;;
    hostprof)
      timeout "${EXPLORE_LIMIT_S:-240}" python3 - <<'PY' 2>&1 | tee "$OUT/hostprof.txt" || rc=1
# Where the host time of one forward+backward goes at T = 1 (headline layer, bf16): cProfile.
import cProfile, pstats, torch
import panther  # noqa: F401
L, n, k = 1, 8192, 16
dt = torch.bfloat16
S1s = (torch.randn(L, n, k, device="cuda") / n**0.5).to(dt).requires_grad_()
S2s = (torch.randn(L, k, n, device="cuda") / n**0.5).to(dt).requires_grad_()
U1s = torch.randn(L, k, n, device="cuda").sign().to(dt) / 4
U2s = torch.randn(L, n, k, device="cuda").sign().to(dt) / 4
b = torch.zeros(n, device="cuda", dtype=dt, requires_grad=True)
x = torch.randn(1, n, device="cuda", dtype=dt, requires_grad=True)
g = torch.randn(1, n, device="cuda", dtype=dt)
op = torch.ops.panther.sklinear
def step():
    op(x, S1s, S2s, U1s, U2s, b).backward(g)
for _ in range(20):
    step()
torch.cuda.synchronize()
pr = cProfile.Profile(); pr.enable()
for _ in range(200):
    step()
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
PY
      ;;
  esac
  echo "## stage $stage: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/stages.txt"
done
# A compact summary last (the device tool returns the end of the output).
echo "==================== summary"
cat "$OUT/stages.txt" 2>/dev/null
[ -f "$OUT/tests.txt" ] && grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3
[ -f "$OUT/explore.txt" ] && cat "$OUT/explore.txt" | tail -8
[ -f "$OUT/bench.json" ] && python3 - "$OUT/bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("ceilings", {k: {a: round(b, 1) for a, b in v.items()} for k, v in d["ceilings"].items()})
print(f"{'layer':<17}{'T':>6} {'dt':<5}| {'dense':>8} {'eager':>7} {'pan':>7} {'floor':>6} {'x/den':>6} {'x/eag':>6} {'/fl':>5}"
      f" | {'g.eag':>6} {'g.pan':>6} | {'bw.eag':>7} {'bw.pan':>7} {'bw.fl':>6} {'/fl':>5} {'g.bw.e':>7} {'g.bw.p':>7}"
      f" | {'h.e':>4} {'h.p':>4} {'hb.e':>5} {'hb.p':>5} {'err':>7} {'eerr':>7} path")
for r in d["results"]:
    g = lambda k: r.get(k, float("nan"))
    p = g("panther_fwd_us"); pb = g("panther_fwdbwd_us")
    print(f"{r['in']}x{r['out']}L{r['L']}k{r['k']:<4}{r['T']:>6} {r['dtype'][:5]:<5}| {g('dense_fwd_us'):8.1f} {g('eager_fwd_us'):7.1f}"
          f" {p:7.1f} {g('floor_fwd_us'):6.1f} {g('dense_fwd_us')/p:6.1f} {g('eager_fwd_us')/p:6.2f} {p/g('floor_fwd_us'):5.2f}"
          f" | {g('eager_fwd_graph_us'):6.1f} {g('panther_fwd_graph_us'):6.1f} | {g('eager_fwdbwd_us'):7.1f} {pb:7.1f}"
          f" {g('floor_fwdbwd_us'):6.1f} {pb/g('floor_fwdbwd_us'):5.2f} {g('eager_fwdbwd_graph_us'):7.1f} {g('panther_fwdbwd_graph_us'):7.1f}"
          f" | {g('eager_fwd_host_us'):4.0f} {g('panther_fwd_host_us'):4.0f} {g('eager_fwdbwd_host_us'):5.0f} {g('panther_fwdbwd_host_us'):5.0f}"
          f" {g('err_fwd_panther'):7.1e} {g('err_fwd_eager'):7.1e} {r.get('panther_fwd_path', '?')}")
PY
exit $rc
