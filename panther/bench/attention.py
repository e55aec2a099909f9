"""``python -m panther bench attention``: Performer attention against SDPA, MHA and eager Performer.

For each shape (B, H, N, head dim d, random features m), causal and not, it times in one run, with
``triton.testing.do_bench`` (median, L2 flushed before each call):

* ``sdpa``     ``F.scaled_dot_product_attention`` on (B, H, N, d) (FlashAttention on the GPU);
* ``mha``      ``nn.MultiheadAttention(H·d, H, batch_first=True)`` with ``need_weights=False``
  (its in/out projections included: that is the layer a user swaps out);
* ``eager``    the plain-PyTorch Performer (``panther.kernels.performer.reference``);
* ``panther``  ``panther.ops.attention.performer_attention_apply``, what RandMultiHeadAttention
  calls: the Triton kernels on CUDA, in eager mode without the custom-op dispatch; its
  forward+backward trains as ``performer_attention_train`` (the backward reuses per-row numbers
  of the forward),

forward and forward+backward, with the roofline floor of the Performer: max(bytes / copy
bandwidth, FLOPs / matmul rate), both ceilings measured at the start of the run. Forward: 8·N·m·d
FLOPs per head (the two projections by ω, φ(K)ᵀV and φ(Q)·S), q, k, v read and out written once.
Forward+backward: 20·N·m·d FLOPs per head (12 more for dφ(q), Σφ(q)ᵀG', dφ(k), dv and the two
projections back through ω), and q, k, v, g read and dq, dk, dv written once more.

It also reports peak memory of each forward (``torch.cuda.max_memory_allocated`` over the call,
plus the inputs) against the size of q, k, v and out, and the approximation error of the
Performer against exact softmax attention for each m (``--error-m``), causal and not.

It prints tables (times in ms; ``×sdpa`` is panther's speedup over SDPA, ``/floor`` panther's time
over the floor) and writes every number to ``--json``.

``do_bench`` times from an event after its L2 flush (~60 µs of GPU time) to an event after the
call, so a call whose host time passes that is timed partly on the host: panther's eager
forward+backward takes ~0.6–1.2 ms of host time (autograd, a dozen launches, their workspaces),
as much as its GPU time at B = 4, H = 12, N = 4096. ``--graph`` adds the GPU time alone, the
median of CUDA-graph replays of many calls (``do_bench_cudagraph``; no L2 flush between calls),
as a second table.

Example::

    python -m panther bench attention --shapes issue --json attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from panther.bench import run_env

__all__ = ["main", "SHAPE_SETS"]

# (B, H, N, d, m)
SHAPE_SETS: dict[str, list[tuple[int, int, int, int, int]]] = {
    "issue": [(4, 12, n, 64, 256) for n in (1024, 2048, 4096, 16384)] + [(1, 12, 65536, 64, 256)],
    "small": [(4, 12, n, 64, 256) for n in (1024, 4096)],
    "long": [(1, 12, 65536, 64, 256)],
}
METHODS = ("sdpa", "mha", "eager", "panther")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m panther bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", help="fp32, bf16 or fp16 (default: bf16)")
    p.add_argument("--shapes", default="issue", help=f"comma list of shape sets ({', '.join(SHAPE_SETS)}) or B:H:N:d:m specs")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--kernel-fn", default="softmax", choices=("softmax", "relu"))
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--no-causal", action="store_true", help="skip the causal rows")
    p.add_argument("--error-m", default="64,128,256,512", help="m values for the approximation error ('' to skip)")
    p.add_argument("--error-n", type=int, default=2048, help="sequence length of the approximation-error check")
    p.add_argument("--eager-max-n", type=int, default=65536, help="skip the eager Performer above this N")
    p.add_argument("--json", metavar="PATH", help="write every measurement here")
    p.add_argument("--sweep", action="store_true", help="only time panther's kernel groups per (chunk, warps) setting (SWEEP)")
    p.add_argument("--compile-workers", type=int, default=8, help="processes compiling --sweep's settings (default 8)")
    p.add_argument("--tuned", metavar="PATH", help="use the best settings of a --sweep JSON instead of the built-in ones")
    p.add_argument("--error-sigma", default="0.5,1.0", help="std of q, k, v entries in the approximation-error check")
    p.add_argument(
        "--graph", action="store_true", help="also time every method as CUDA-graph replays (GPU time without host time)"
    )
    p.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up, ms (default 10)")
    p.add_argument("--rep", type=float, default=40.0, help="do_bench repetition time, ms (default 40)")
    return p.parse_args(argv)


def _shapes(spec):
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item in SHAPE_SETS:
            out += SHAPE_SETS[item]
        else:
            try:
                out.append(tuple(int(v) for v in item.split(":")))
                assert len(out[-1]) == 5
            except (ValueError, AssertionError):
                raise SystemExit(f"unknown shape set or spec {item!r}: use {', '.join(SHAPE_SETS)} or B:H:N:d:m")
    return out


def _bench(fn, args, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grad_to_none, return_mode="median"))


def _graph(rec, key, fn, grad_to_none=None) -> None:
    """rec[key]: GPU time of one call in ms, the median of CUDA-graph replays of many calls; a call
    that cannot be captured records its error under key + "_error" instead."""
    from triton.testing import do_bench_cudagraph

    try:
        rec[key] = float(do_bench_cudagraph(fn, rep=20, grad_to_none=grad_to_none, return_mode="median"))
    except RuntimeError as e:
        rec[key + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def _ceilings(dtype, args):
    """(copy bandwidth B/s counting read + write, matmul rate FLOP/s in dtype) on random data."""
    n = 1 << 28
    src = torch.randn(n, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / (_bench(lambda: dst.copy_(src), args) * 1e-3)
    del src, dst
    s = 8192
    a = torch.randn(s, s, device="cuda", dtype=dtype)
    b = torch.randn(s, s, device="cuda", dtype=dtype)
    rate = 2 * s**3 / (_bench(lambda: a @ b, args) * 1e-3)
    return bw, rate


def _omega(H, m, d, dtype):
    try:
        from panther.features import orthogonal_random_features

        return orthogonal_random_features(H, m, d, device="cuda", dtype=torch.float32).to(dtype)
    except ImportError:  # pragma: no cover
        return torch.randn(H, m, d, device="cuda").to(dtype)


def _performer_fns():
    """(panther, eager reference), each with the signature (q, k, v, omega, mask, kernel_fn,
    causal, scale): panther is ``performer_attention_apply``, what RandMultiHeadAttention calls."""
    from panther.kernels.performer import reference as ref
    from panther.ops.attention import performer_attention_apply

    return performer_attention_apply, ref.performer_attention


def _peak(fn) -> int:
    """Bytes allocated at the peak of fn() beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def _measure(shape, causal, dtype, bw, rate, args, methods) -> dict:
    B, H, N, d, m = shape
    es = torch.finfo(dtype).bits // 8
    scale = d**-0.5
    op, eager = _performer_fns()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    omega = _omega(H, m, d, dtype)
    go = torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=g)
    mha = torch.nn.MultiheadAttention(H * d, H, batch_first=True, device="cuda", dtype=dtype)
    x = torch.randn(B, N, H * d, device="cuda", dtype=dtype, generator=g)
    gx = torch.randn(B, N, H * d, device="cuda", dtype=dtype, generator=g)
    # MHA takes is_causal only with the mask itself (N×N): skip it where that would not fit.
    mask = torch.nn.Transformer.generate_square_subsequent_mask(N, device="cuda", dtype=dtype) if causal and N <= 16384 else None
    if causal and mask is None:
        methods = [n for n in methods if n != "mha"]

    fwd = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "mha": lambda q, k, v: mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0],
        "eager": lambda q, k, v: eager(q, k, v, omega, None, args.kernel_fn, causal, scale),
        "panther": lambda q, k, v: op(q, k, v, omega, None, args.kernel_fn, causal, scale),
    }
    rec = {"B": B, "H": H, "N": N, "d": d, "m": m, "causal": causal, "dtype": str(dtype).replace("torch.", "")}
    flops = 8 * B * H * N * m * d
    rec["floor_fwd_ms"] = 1e3 * max(4 * B * H * N * d * es / bw, flops / rate)
    rec["floor_fwdbwd_ms"] = 1e3 * max(11 * B * H * N * d * es / bw, 2.5 * flops / rate)
    qkvo = 4 * B * H * N * d * es
    rec["qkvo_MB"] = qkvo / 2**20
    for name in methods:
        if name == "eager" and N > args.eager_max_n:
            continue
        fn = fwd[name]
        try:
            t0 = time.perf_counter()
            fn(q, k, v)
            torch.cuda.synchronize()
            rec[f"{name}_first_call_s"] = time.perf_counter() - t0
            rec[f"{name}_fwd_ms"] = _bench(lambda: fn(q, k, v), args)
            if args.graph:
                _graph(rec, f"{name}_fwd_graph_ms", lambda: fn(q, k, v))
            inputs = (3 * B * H * N * d * es) if name != "mha" else B * N * H * d * es
            rec[f"{name}_peak_MB"] = (_peak(lambda: fn(q, k, v)) + inputs) / 2**20
            if not args.no_backward:
                if name == "mha":
                    xg = x.detach().requires_grad_()
                    leaves = [xg, *mha.parameters()]
                    run = lambda: mha(xg, xg, xg, need_weights=False, attn_mask=mask, is_causal=causal)[0].backward(gx)  # noqa: E731
                else:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                    leaves = [qg, kg, vg]
                    run = lambda: fn(qg, kg, vg).backward(go)  # noqa: E731
                run()
                rec[f"{name}_fwdbwd_ms"] = _bench(run, args, grad_to_none=leaves)
                if args.graph:
                    _graph(rec, f"{name}_fwdbwd_graph_ms", run, grad_to_none=leaves)
        except torch.OutOfMemoryError:
            rec[f"{name}_oom"] = True
        torch.cuda.empty_cache()
    return rec


def _approx_error(args, dtype) -> list[dict]:
    """Relative RMS error of Performer attention against exact softmax attention (fp64), per m.

    q, k, v are random with entries of standard deviation σ (``--error-sigma``): FAVOR+'s variance
    grows like exp(‖q‖·‖k‖·scale), so the error depends on σ as much as on m. The eager reference
    runs in fp32 for every m; panther (in the benchmark dtype) at the benchmark's m values.
    """
    out = []
    ms = [int(s) for s in args.error_m.split(",") if s.strip()]
    op, eager = _performer_fns()
    B, H, N, d = 1, 12, args.error_n, 64
    bench_m = {shape[4] for shape in _shapes(args.shapes)}
    for sigma in (float(x) for x in args.error_sigma.split(",")):
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (sigma * torch.randn(B, H, N, d, device="cuda", generator=g) for _ in range(3))
        for causal in (False, True):
            exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
            for m in ms:
                omega = _omega(H, m, d, torch.float32)
                rec = {"N": N, "d": d, "m": m, "sigma": sigma, "causal": causal}
                ref_out = eager(q, k, v, omega, None, args.kernel_fn, causal, d**-0.5)
                rec["eager_fp32_err"] = float((ref_out.double() - exact).norm() / exact.norm())
                if m in bench_m:
                    pan = op(q.to(dtype), k.to(dtype), v.to(dtype), omega.to(dtype), None, args.kernel_fn, causal, d**-0.5)
                    rec["panther_err"] = float((pan.double() - exact).norm() / exact.norm())
                out.append(rec)
    return out


def _sweep_one(job):
    """Worker of --sweep's precompilation: one call of one kernel group at one setting."""
    shape, causal, group, cfg, dtype, kernel_fn = job
    from panther.kernels.performer import triton as tk

    B, H, N, d, m = shape
    q, k, v, go = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(4))
    omega = torch.randn(H, m, d, device="cuda").to(dtype)
    tk.TUNED[("causal" if causal else "noncausal", group)] = cfg
    fa = (q, k, v, omega, None, kernel_fn, causal, d**-0.5)
    try:
        tk.performer_attention(*fa) if group == "fwd" else tk.performer_attention_backward(go, *fa)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported again by the timing loop
        return f"{type(e).__name__}: {str(e)[:200]}"


SWEEP = {  # (chunk, warps) tried per kernel group
    ("noncausal", "fwd"): [(64, 4), (64, 8), (128, 4), (128, 8), (32, 4), (32, 8)],
    ("noncausal", "bwd"): [(32, 8), (32, 4), (64, 8), (64, 4)],
    ("causal", "fwd"): [(16, 8), (32, 8), (16, 4), (32, 4)],
    ("causal", "bwd"): [(16, 8), (32, 8), (16, 4)],
}


def _sweep(args, dtype) -> tuple[list[dict], dict]:
    """Time each kernel group (forward; backward) of panther at each SWEEP setting, on the first
    shape; the other group keeps its best (or tuned) setting. Compiles first, in parallel."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from panther.kernels.performer import triton as tk

    shape = _shapes(args.shapes)[0]
    B, H, N, d, m = shape
    causals = (False,) if args.no_causal else (False, True)
    groups = ("fwd",) if args.no_backward else ("fwd", "bwd")
    jobs = [
        (shape, c, gname, cfg, dtype, args.kernel_fn)
        for c in causals
        for gname in groups
        for cfg in SWEEP[("causal" if c else "noncausal", gname)]
    ]
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=args.compile_workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_sweep_one, jobs))
    print(f"# sweep: compiled {len(jobs)} settings in {time.perf_counter() - t0:.0f} s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, go = (torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    omega = _omega(H, m, d, dtype)
    out, best = [], {}
    for c in causals:
        key = "causal" if c else "noncausal"
        fa = (q, k, v, omega, None, args.kernel_fn, c, d**-0.5)
        for gname in groups:
            fn = (lambda: tk.performer_attention(*fa)) if gname == "fwd" else (lambda: tk.performer_attention_backward(go, *fa))
            times = {}
            for cfg in SWEEP[(key, gname)]:
                tk.TUNED[(key, gname)] = cfg
                rec = {"B": B, "N": N, "m": m, "causal": c, "group": gname, "chunk": cfg[0], "warps": cfg[1]}
                try:
                    rec["ms"] = times[cfg] = _bench(fn, args)
                except Exception as e:  # a setting that does not compile or fit
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"sweep N{N} {key} {gname} chunk {cfg[0]} warps {cfg[1]}: {rec.get('ms', rec.get('error'))}", flush=True)
                out.append(rec)
            best[f"{key}/{gname}"] = list(min(times, key=times.get))
            tk.TUNED[(key, gname)] = tuple(best[f"{key}/{gname}"])
    print("# sweep best (chunk, warps):", best, flush=True)
    return out, best


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("bench attention: needs a CUDA device (the kernels it times are the GPU ones)", file=sys.stderr)
        return 2
    if args.dtype not in DTYPES:
        raise SystemExit(f"unknown dtype {args.dtype!r}: use {', '.join(DTYPES)}")
    dtype = DTYPES[args.dtype]
    methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    bad = set(methods) - set(METHODS)
    if bad:
        raise SystemExit(f"unknown methods {sorted(bad)}: use {', '.join(METHODS)}")
    import panther  # noqa: F401

    env = run_env("attention", argv)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}", flush=True)
    if args.sweep:
        res, best = _sweep(args, dtype)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"env": env, "sweep": res, "best": best}, fh, indent=1)
        return 0
    if args.tuned:
        from panther.kernels.performer import triton as tk

        with open(args.tuned) as fh:
            best = json.load(fh)["best"]
        for key, cfg in best.items():
            tk.TUNED[tuple(key.split("/"))] = tuple(cfg)
        env["tuned"] = {k: list(v) for k, v in best.items()}
        print(f"# kernel settings from {args.tuned}: {best}", flush=True)
    bw, rate = _ceilings(dtype, args)
    print(f"# {args.dtype}: copy {bw / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    records = []
    for shape in _shapes(args.shapes):
        for causal in (False,) if args.no_causal else (False, True):
            rec = _measure(shape, causal, dtype, bw, rate, args, methods)
            records.append(rec)
            print("# done", shape, "causal" if causal else "non-causal", flush=True)

    def f(x):
        return f"{x:9.3f}" if isinstance(x, float) else f"{'-':>9}"

    header = f"{'B':>2}{'N':>7} {'causal':<7}{'mode':<8}" + "".join(f"{n:>9}" for n in methods) + f"{'floor':>9}{'×sdpa':>8}{'/floor':>8}"
    tables = [("times (ms, median of do_bench, L2 flushed)", "")]
    if args.graph:
        tables.append(("GPU times (ms, median of CUDA-graph replays)", "_graph"))
    for title, tag in tables:
        print(f"\n{title}\n" + header + "\n" + "-" * len(header))
        for rec in records:
            for mode in ("fwd",) if args.no_backward else ("fwd", "fwdbwd"):
                row = f"{rec['B']:>2}{rec['N']:>7} {'yes' if rec['causal'] else 'no':<7}{mode:<8}"
                row += "".join(f(rec.get(f"{n}_{mode}{tag}_ms")) for n in methods)
                row += f(rec[f"floor_{mode}_ms"])
                p, s = rec.get(f"panther_{mode}{tag}_ms"), rec.get(f"sdpa_{mode}{tag}_ms")
                row += f"{s / p:7.2f}x" if p and s else f"{'-':>8}"
                row += f"{p / rec[f'floor_{mode}_ms']:7.2f}x" if p else f"{'-':>8}"
                print(row)
    print("\npeak memory of the forward (MiB, inputs included) against q+k+v+out")
    for rec in records:
        peaks = "  ".join(f"{n} {rec[f'{n}_peak_MB']:.0f}" for n in methods if f"{n}_peak_MB" in rec)
        ratio = rec.get("panther_peak_MB", float("nan")) / rec["qkvo_MB"]
        print(f"  B{rec['B']} N{rec['N']} {'causal' if rec['causal'] else 'non-causal'}: q+k+v+out {rec['qkvo_MB']:.0f};  {peaks};  panther/qkvo {ratio:.2f}")
    if args.json:  # times first: the error check below runs other shapes
        with open(args.json, "w") as fh:
            json.dump({"env": env, "ceilings": {"copy_GBps": bw / 1e9, "matmul_TFLOPs": rate / 1e12}, "results": records}, fh, indent=1)
    errors = _approx_error(args, dtype)
    if errors:
        print("\napproximation error against exact softmax attention (relative RMS; random q, k, v)")
        for e in errors:
            vals = "  ".join(f"{k} {v:.3e}" for k, v in e.items() if k.endswith("_err"))
            print(f"  N{e['N']} σ{e['sigma']} m{e['m']:<4} {'causal' if e['causal'] else 'non-causal':<11} {vals}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "ceilings": {"copy_GBps": bw / 1e9, "matmul_TFLOPs": rate / 1e12}, "results": records, "approx_error": errors}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
