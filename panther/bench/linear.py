"""``python -m panther bench linear``: panther's low-rank linear against nn.Linear and eager low-rank.

For each shape (in, out, num_terms L, low_rank k, tokens T) and dtype it times, in one run, with
``triton.testing.do_bench`` (median, L2 flushed before each call):

* ``dense``   ``F.linear(x, W, b)``, the nn.Linear the layer replaces;
* ``eager``   the two-GEMM low-rank ``addmm(b, x@A, B)`` with A (in×2Lk) and B (2Lk×out) prebuilt
  (forward+backward trains all of A and B: the plain low-rank layer);
* ``panther`` what ``SKLinear`` calls, ``panther.ops.linear.sklinear_apply``: the Triton kernels
  of ``torch.ops.panther.sklinear`` (inference) / ``sklinear_train`` (under autograd: it also keeps
  h = x·A for the backward), launched in eager mode without the custom-op dispatch layers,

forward and forward+backward, and the roofline floor: max(bytes / copy bandwidth, FLOPs / matmul
rate), both ceilings measured at the start of the run (an fp32 matmul follows torch's TF32
setting, as the kernels do). Bytes: x read once and y written once, plus the weights; backward
adds g and x read once and dx written once. FLOPs: 2·T·r·(in+out) forward with r = 2Lk, and
2·T·r·(in+out) + 2·T·Lk·(in+out) more for the backward (gh, dx, dS1, dS2).

It prints a table (times in µs; ``×dense`` and ``×eager`` are speedups of panther, ``/floor`` is
panther's time over the floor), the host time of one call, panther's forward error against float64
(and the eager low-rank's), and writes every number to ``--json``, with every candidate config the
kernels' first calls timed. ``do_bench`` counts host time beyond its L2 flush (~60 µs): ``--graph``
adds CUDA-graph replay times, the GPU time alone.

Example::

    python -m panther bench linear --dtype bf16,fp32 --shapes issue --json bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from panther.bench import run_env

# (in, out, num_terms, low_rank)
_ISSUE_LAYERS = [(8192, 8192, 1, 16), (4096, 4096, 1, 64), (768, 3072, 1, 64), (8192, 8192, 2, 64)]
_ISSUE_TOKENS = [1, 16, 256, 4096, 16384]

SHAPE_SETS: dict[str, list[tuple[int, int, int, int, int]]] = {
    # The issue's targets: every layer at every T.
    "issue": [(i, o, L, k, T) for (i, o, L, k) in _ISSUE_LAYERS for T in _ISSUE_TOKENS],
    # The headline: in=out=8192, L=1, k=16, T=4096.
    "headline": [(8192, 8192, 1, 16, 4096)],
    # Memory-bound regime only (T >= 4096).
    "large": [(i, o, L, k, T) for (i, o, L, k) in _ISSUE_LAYERS for T in (4096, 16384)],
    # Decode-like T.
    "decode": [(i, o, L, k, T) for (i, o, L, k) in _ISSUE_LAYERS for T in (1, 16, 256)],
}

__all__ = ["SHAPE_SETS", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m panther bench linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16,fp32", help="comma list of fp32, bf16, fp16 (default: bf16,fp32)")
    p.add_argument(
        "--shapes",
        default="issue",
        help=f"comma list of shape sets ({', '.join(SHAPE_SETS)}) or IN:OUT:L:K:T specs (default: issue)",
    )
    p.add_argument("--json", metavar="PATH", help="write every measurement here")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--paths", action="store_true", help="also time each forward kernel path (fused, split)")
    p.add_argument(
        "--graph",
        action="store_true",
        help="also time forward and forward+backward as CUDA-graph replays (GPU time without host overhead)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (torch's setting, for all)")
    p.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up, ms (default 10)")
    p.add_argument("--rep", type=float, default=50.0, help="do_bench repetition time, ms (default 50)")
    return p.parse_args(argv)


def _shapes(spec: str) -> list[tuple[int, int, int, int, int]]:
    out: list[tuple[int, int, int, int, int]] = []
    for item in spec.split(","):
        item = item.strip()
        if item in SHAPE_SETS:
            out += SHAPE_SETS[item]
        else:
            try:
                n_in, n_out, L, k, T = (int(v) for v in item.split(":"))
            except ValueError:
                raise SystemExit(f"unknown shape set or spec {item!r}: use {', '.join(SHAPE_SETS)} or IN:OUT:L:K:T")
            out.append((n_in, n_out, L, k, T))
    return out


def _bench(fn, args, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grad_to_none, return_mode="median"))


def _ceilings(dtype: torch.dtype, args) -> tuple[float, float]:
    """(copy bandwidth B/s, counting read + write; matmul rate FLOP/s in dtype) on random data."""
    n = 1 << 28  # 512 MiB of bf16 / 1 GiB of fp32 per buffer: far past the L2
    src = torch.randn(n, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / (_bench(lambda: dst.copy_(src), args) * 1e-3)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=dtype)
    b = torch.randn(m, m, device="cuda", dtype=dtype)
    rate = 2 * m**3 / (_bench(lambda: a @ b, args) * 1e-3)
    return bw, rate


def _floors(n_in, n_out, L, k, T, es, bw, rate) -> tuple[float, float]:
    """Roofline floors (seconds) of the forward and of forward+backward."""
    r = 2 * L * k
    w = r * (n_in + n_out)  # weight elements, all four factors
    fwd_bytes = es * (T * n_in + T * n_out + w + n_out)
    fwd_flops = 2 * T * r * (n_in + n_out)
    bwd_bytes = es * (T * n_out + T * n_in + T * n_in + w + L * k * (n_in + n_out) + n_out)
    bwd_flops = 2 * T * r * (n_in + n_out) + 2 * T * L * k * (n_in + n_out)
    fwd = max(fwd_bytes / bw, fwd_flops / rate)
    both = max((fwd_bytes + bwd_bytes) / bw, (fwd_flops + bwd_flops) / rate)
    return fwd, both


def _layer(n_in, n_out, L, k, dtype):
    """Random SKLinear factors at the layer's scale, the dense weight, and the eager (A, B)."""
    dev = "cuda"
    S1s = torch.randn(L, n_in, k, device=dev, dtype=dtype) * n_in**-0.5
    S2s = torch.randn(L, k, n_out, device=dev, dtype=dtype) * n_in**-0.5
    U1s = torch.randint(0, 2, (L, k, n_out), device=dev).to(dtype).mul_(2).sub_(1).mul_(k**-0.5)
    U2s = torch.randint(0, 2, (L, n_in, k), device=dev).to(dtype).mul_(2).sub_(1).mul_(k**-0.5)
    bias = torch.randn(n_out, device=dev, dtype=dtype) * n_in**-0.5
    W = torch.randn(n_out, n_in, device=dev, dtype=dtype) * n_in**-0.5
    A = torch.cat([S1s.permute(1, 0, 2).reshape(n_in, L * k), U2s.permute(1, 0, 2).reshape(n_in, L * k)], 1)
    B = torch.cat([U1s.reshape(L * k, n_out), S2s.reshape(L * k, n_out)], 0) / (2 * L)
    return S1s, S2s, U1s, U2s, bias, W, A.contiguous(), B.contiguous()


_PATH_OPS: dict = {}


def _path_op(path: str):
    """The sklinear forward forced onto one kernel path, as a triton_op like the real one (outside
    a triton_op, wrap_triton takes the slow higher-order-op dispatch: ~0.35 ms a launch, measured
    on the H200 machine)."""
    if path not in _PATH_OPS:
        from torch.library import triton_op

        from panther.kernels.lowrank_linear import triton as tk

        def body(x: torch.Tensor, S1s: torch.Tensor, S2s: torch.Tensor, U1s: torch.Tensor, U2s: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:  # fmt: skip
            return tk.sklinear_forward(x, S1s, S2s, U1s, U2s, bias, path=path)

        _PATH_OPS[path] = triton_op(f"panther_bench::sklinear_{path}", body, mutates_args=())
    return _PATH_OPS[path]


def _graph_us(fn, grad_to_none=None) -> float:
    """GPU time of one call in µs, from CUDA-graph replays of many calls (no host time, no L2
    flush between calls: inputs smaller than the L2 stay in it)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=20, grad_to_none=grad_to_none, return_mode="median")) * 1e3


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _host_us(fn, n: int = 20) -> float:
    """Host (CPU) time of one call in µs: how long ``fn`` takes to return, the GPU left running."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return t * 1e6


def _first_call(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _measure(shape, dtype, bw, rate, args) -> dict:
    import panther  # noqa: F401  (registers torch.ops.panther)

    n_in, n_out, L, k, T = shape
    S1s, S2s, U1s, U2s, bias, W, A, B = _layer(n_in, n_out, L, k, dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    g = torch.randn(T, n_out, device="cuda", dtype=dtype)
    from panther.ops.linear import sklinear_apply as op
    rec: dict = {"in": n_in, "out": n_out, "L": L, "k": k, "T": T, "dtype": str(dtype).replace("torch.", "")}
    fwd_floor, both_floor = _floors(n_in, n_out, L, k, T, torch.finfo(dtype).bits // 8, bw, rate)
    rec["floor_fwd_us"] = fwd_floor * 1e6
    rec["floor_fwdbwd_us"] = both_floor * 1e6

    fwd = {
        "dense": lambda: F.linear(x, W, bias),
        "eager": lambda: torch.addmm(bias, x @ A, B),
        "panther": lambda: op(x, S1s, S2s, U1s, U2s, bias),
    }
    rec["first_call_fwd_s"] = _first_call(fwd["panther"])
    # Accuracy against float64 (the eager low-rank for comparison): the timed code is checked.
    from panther.kernels.lowrank_linear import reference as ref

    y64 = ref.sklinear_forward(*(t.double() for t in (x, S1s, S2s, U1s, U2s, bias)))
    rec["err_fwd_panther"] = _rel_err(fwd["panther"](), y64)
    rec["err_fwd_eager"] = _rel_err(fwd["eager"](), y64)
    del y64
    for name, fn in fwd.items():
        rec[f"{name}_fwd_us"] = _bench(fn, args) * 1e3
    for name in ("eager", "panther"):
        rec[f"{name}_fwd_host_us"] = _host_us(fwd[name])
    if args.graph:
        for name, fn in fwd.items():
            rec[f"{name}_fwd_graph_us"] = _graph_us(fn)
    try:  # which forward the plan chose (fused or split) and what the first call timed
        from panther.kernels.lowrank_linear import triton as tk

        plans = [p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan) and p.M == T and p.N == n_out]
        if plans:
            rec["panther_fwd_path"] = plans[-1].path
    except ImportError:  # pragma: no cover
        pass
    if args.paths:
        from panther.kernels.lowrank_linear import triton as tk

        for path in ("fused", "split"):
            fn = lambda p=path: tk.sklinear_forward(x, S1s, S2s, U1s, U2s, bias, path=p)
            fn()
            rec[f"panther_{path}_fwd_us"] = _bench(fn, args) * 1e3

    if not args.no_backward:
        xg = x.detach().requires_grad_()
        leaves = {
            "dense": [W.detach().requires_grad_(), bias.detach().requires_grad_()],
            "eager": [A.detach().requires_grad_(), B.detach().requires_grad_(), bias.detach().requires_grad_()],
            "panther": [S1s.detach().requires_grad_(), S2s.detach().requires_grad_(), bias.detach().requires_grad_()],
        }
        (Wg, bd), (Ag, Bg, be), (S1g, S2g, bp) = leaves["dense"], leaves["eager"], leaves["panther"]
        both = {
            "dense": lambda: F.linear(xg, Wg, bd).backward(g),
            "eager": lambda: torch.addmm(be, xg @ Ag, Bg).backward(g),
            "panther": lambda: op(xg, S1g, S2g, U1s, U2s, bp).backward(g),
        }
        rec["first_call_fwdbwd_s"] = _first_call(both["panther"])
        for name, fn in both.items():
            rec[f"{name}_fwdbwd_us"] = _bench(fn, args, grad_to_none=[xg, *leaves[name]]) * 1e3
        for name in ("eager", "panther"):
            rec[f"{name}_fwdbwd_host_us"] = _host_us(both[name])
        if args.graph:
            for name, fn in both.items():
                try:
                    rec[f"{name}_fwdbwd_graph_us"] = _graph_us(fn, grad_to_none=[xg, *leaves[name]])
                except Exception as e:  # noqa: BLE001  (record why, keep the rest)
                    rec[f"{name}_fwdbwd_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


def _tuning() -> dict:
    """Every candidate the plans' first calls timed: {key: {config: ms}}."""
    try:
        from panther.kernels.lowrank_linear import triton as tk
    except ImportError:  # pragma: no cover - no triton
        return {}
    return {str(k): {str(c): ms for c, ms in v.items()} for k, v in tk.TUNE_LOG.items()}


def _fmt_row(rec: dict, mode: str) -> str:
    key = "fwd" if mode == "fwd" else "fwdbwd"
    p = rec[f"panther_{key}_us"]
    shape = f"{rec['in']}x{rec['out']} L{rec['L']} k{rec['k']}"
    return (
        f"{shape:<22}{rec['T']:>6}  {rec['dtype']:<9}{mode:<8}"
        f"{rec[f'dense_{key}_us']:>10.1f}{rec[f'eager_{key}_us']:>9.1f}{p:>9.1f}{rec[f'floor_{key}_us']:>9.1f}"
        f"{rec[f'dense_{key}_us'] / p:>8.1f}x{rec[f'eager_{key}_us'] / p:>7.2f}x{p / rec[f'floor_{key}_us']:>7.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("bench linear: needs a CUDA device (the kernels it times are the GPU ones)", file=sys.stderr)
        return 2
    try:
        dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",")]
    except KeyError as e:
        raise SystemExit(f"unknown dtype {e}: use {', '.join(DTYPES)}")
    shapes = _shapes(args.shapes)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    env = {**run_env("linear", argv), "fp32_tf32": bool(args.tf32)}
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}")
    header = (
        f"{'layer':<22}{'T':>6}  {'dtype':<9}{'mode':<8}{'dense':>10}{'eager':>9}{'panther':>9}{'floor':>9}"
        f"{'×dense':>9}{'×eager':>8}{'/floor':>7}"
    )
    records: list[dict] = []
    ceilings: dict = {}
    failed = False

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "ceilings": ceilings, "results": records, "tuning": _tuning()}, f, indent=1)

    for dtype in dtypes:
        torch.manual_seed(0)
        bw, rate = _ceilings(dtype, args)
        name = str(dtype).replace("torch.", "")
        ceilings[name] = {"copy_GBps": bw / 1e9, "matmul_TFLOPs": rate / 1e12}
        print(f"# {name}: copy {bw / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s")
        print(header + "\n" + "-" * len(header))
        try:  # warm the host side (first calls in a process run slower) on the first shape, untimed
            _measure(shapes[0], dtype, bw, rate, args)
        except Exception as e:  # noqa: BLE001  (the timed pass below reports it in full)
            print(f"# warm-up on {shapes[0]} failed: {type(e).__name__}")
        for shape in shapes:
            try:
                rec = _measure(shape, dtype, bw, rate, args)
            except torch.OutOfMemoryError:
                print(f"# skipped {shape} {name}: out of memory")
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # noqa: BLE001  (report and go on: one broken shape must not hide the rest)
                print(f"# FAILED {shape} {name}: {type(e).__name__}: {str(e)[:500]}")
                failed = True
                continue
            records.append(rec)
            torch.cuda.empty_cache()
            print(_fmt_row(rec, "fwd"))
            if "panther_fwdbwd_us" in rec:
                print(_fmt_row(rec, "fwd+bwd"))
            print(
                f"{'':<37}host µs/call: eager fwd {rec['eager_fwd_host_us']:.0f}  panther fwd {rec['panther_fwd_host_us']:.0f}"
                + (
                    f"  eager fwd+bwd {rec['eager_fwdbwd_host_us']:.0f}  panther fwd+bwd {rec['panther_fwdbwd_host_us']:.0f}"
                    if "panther_fwdbwd_host_us" in rec
                    else ""
                )
            )
            print(
                f"{'':<37}rel err fwd: panther {rec['err_fwd_panther']:.1e}  eager {rec['err_fwd_eager']:.1e}"
                f"  path {rec.get('panther_fwd_path', '?')}  first call {rec['first_call_fwd_s']:.2f} s"
            )
            if args.graph:
                line = (
                    f"{'':<37}graph fwd: dense {rec['dense_fwd_graph_us']:.1f}  eager {rec['eager_fwd_graph_us']:.1f}"
                    f"  panther {rec['panther_fwd_graph_us']:.1f}"
                )
                if "panther_fwdbwd_graph_us" in rec:
                    line += (
                        f"   fwd+bwd: dense {rec.get('dense_fwdbwd_graph_us', float('nan')):.1f}"
                        f"  eager {rec.get('eager_fwdbwd_graph_us', float('nan')):.1f}"
                        f"  panther {rec['panther_fwdbwd_graph_us']:.1f}"
                    )
                print(line)
            if args.paths:
                print(f"{'':<37}paths: fused {rec['panther_fused_fwd_us']:.1f}  split {rec['panther_split_fwd_us']:.1f}")
            save()
    firsts = [r["first_call_fwd_s"] for r in records]
    if firsts:
        print(f"\nfirst call (compile + autotune) of a new shape: {min(firsts):.2f} .. {max(firsts):.2f} s forward")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

