"""First-call cost of the kernels' plans, with and without compiling their kernels ahead in parallel
(kernels._launch.compile_ahead): low-rank linear plans that time their candidates (T ≥ 1024), and
Performer attention plans (no timing; their few kernels compile at the first call).

Each measurement is a fresh process with an empty triton cache: the first forward (linear:
``sklinear_forward(..., want_h=True)``; attention: ``performer_attention_train``) and then the
backward that reads what it kept, wall time with a synchronize after each.
``PANTHER_COMPILE_THREADS=0`` is the serial baseline. Needs a CUDA GPU; run from a directory
where ``import panther`` finds the assembled package (as scripts/gpu_linear.sh lays it out):

    python scripts/first_call.py [--threads 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Linear (in, out, L, k, T, dtype): the rank-128/256 layers, which time the most candidates.
# Attention (B, H, N, d, m, causal, dtype): the shape.
CASES = [
    ("linear", (4096, 4096, 1, 64, 4096, "bf16")),
    ("linear", (8192, 8192, 2, 64, 4096, "bf16")),
    ("linear", (4096, 4096, 1, 64, 4096, "fp32")),
    ("attention", (4, 12, 4096, 64, 256, 0, "bf16")),
    ("attention", (4, 12, 4096, 64, 256, 1, "bf16")),
]


def _attention(B: int, H: int, N: int, d: int, m: int, causal: int, dt: str) -> None:
    import torch

    from panther.kernels.performer import reference as ref
    from panther.kernels.performer import triton as tk

    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    q, k, v, g = (torch.randn(B, H, N, d, device="cuda").to(dtype) for _ in range(4))
    omega = torch.randn(H, m, d, device="cuda")
    args = (omega, None, "softmax", bool(causal), d**-0.5)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, stats = tk.performer_attention_train(q, k, v, *args)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    tk.performer_attention_backward(g, q, k, v, *args, out=out, stats=stats)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    want = ref.performer_attention(q[:1].double(), k[:1].double(), v[:1].double(), omega.double(), *args[1:])
    err = ((out[:1].double() - want).norm() / want.norm()).item()
    print(json.dumps({"forward_s": t1 - t0, "backward_s": t2 - t1, "rel_err": err}))


def _linear(n_in: int, n_out: int, L: int, k: int, T: int, dt: str) -> None:
    import torch

    from panther.kernels.lowrank_linear import triton as tk

    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    S1s, U2s = ((torch.randn(L, n_in, k, device="cuda") * n_in**-0.5).to(dtype) for _ in range(2))
    S2s, U1s = ((torch.randn(L, k, n_out, device="cuda") * k**-0.5).to(dtype) for _ in range(2))
    b = torch.randn(n_out, device="cuda").to(dtype)
    x = torch.randn(T, n_in, device="cuda").to(dtype)
    g = torch.randn(T, n_out, device="cuda").to(dtype)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    y, h = tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b, want_h=True)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True, h)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    A = torch.cat([*S1s, *U2s], 1).double()
    B = torch.cat([*U1s, *S2s], 0).double()
    want = (x.double() @ A).to(dtype).double() @ B / (2 * L) + b.double()
    err = ((y.double() - want).norm() / want.norm()).item()
    print(json.dumps({"forward_s": t1 - t0, "backward_s": t2 - t1, "rel_err": err}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=16, help="PANTHER_COMPILE_THREADS of the compiled-ahead runs")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    rows = []
    print("case                                  threads  forward s  backward s  rel err")
    for op, shape in CASES:
        for threads in (0, args.threads):
            env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(), PANTHER_COMPILE_THREADS=str(threads))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", op, *map(str, shape)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{op} {shape}, {threads} threads:\n{r.stderr[-3000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            if op == "linear":
                n_in, n_out, L, k, T, dt = shape
                name = f"linear {n_in}x{n_out} L{L} k{k} T{T} {dt}"
            else:
                B, H, N, d, m, causal, dt = shape
                name = f"attention B{B} H{H} N{N} d{d} m{m} {'causal' if causal else 'full'} {dt}"
            print(f"{name:<37} {threads:7d}  {res['forward_s']:9.1f}  {res['backward_s']:10.1f}  {res['rel_err']:.1e}",
                  flush=True)  # fmt: skip
            rows.append({"op": op, "shape": shape, "threads": threads, **res})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        if sys.argv[2] == "linear":
            _linear(*map(int, sys.argv[3:8]), sys.argv[8])
        else:
            _attention(*map(int, sys.argv[3:9]), sys.argv[9])
    else:
        main()
