"""``python -m panther demo``: each spec'd layer next to its dense counterpart.

Prints one table (output error against the dense layer, parameters, forward time), the
``backend="panther"`` tour on a small transformer model, and the accuracy tour: two models
trained on the spot on scikit-learn's handwritten digits, dense vs panther (compiled at the
default tolerance, and converted + fine-tuned), test accuracy next to parameters and time.
Runs on CUDA when present, else CPU.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Row:
    name: str
    dense_params: int
    panther_params: int
    rel_err: float
    predicted: str
    dense_ms: float
    panther_ms: float


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median forward time in ms (torch.utils.benchmark handles warm-up and CUDA sync)."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=0.3).median * 1e3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _rows(device: torch.device, quick: bool) -> list[Row]:
    import panther as pr

    torch.manual_seed(0)
    rows = []
    n, T, k = (512, 64, 32) if quick else (2048, 512, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)

        dense = nn.Linear(n, n, device=device)
        sk = pr.nn.SKLinear.from_linear(dense, num_terms=1, low_rank=k)
        x = torch.randn(T, n, device=device)
        ref = dense(x)
        # The sketch is unbiased with relative error ≈ √((in+out)/(4·L·k)) on a dense random W
        # (see docs/guide.rst); trained-from-scratch or fine-tuned layers do not pay this.
        rows.append(Row(f"SKLinear {n}->{n} L=1 k={k}", _params(dense), _params(sk), _rel(sk(x) - sk.bias, ref - dense.bias),
                        f"~{math.sqrt(2 * n / (4 * k)):.2f}", _time_ms(lambda: dense(x), device), _time_ms(lambda: sk(x), device)))

        c_in, c_out, hw, b = (32, 64, 16, 4) if quick else (64, 128, 56, 8)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, device=device)
        skc = pr.nn.SKConv2d.from_conv2d(conv, num_terms=1, low_rank=16)
        xi = torch.randn(b, c_in, hw, hw, device=device)
        refc = conv(xi) - conv.bias.view(1, -1, 1, 1)
        rows.append(Row(f"SKConv2d {c_in}->{c_out} 3x3 L=1 k=16", _params(conv), _params(skc),
                        _rel(skc(xi) - skc.bias.view(1, -1, 1, 1), refc), f"~{math.sqrt((c_in * 9 + c_out) / 64):.2f}",
                        _time_ms(lambda: conv(xi), device), _time_ms(lambda: skc(xi), device)))

        e, h, N, m = (128, 4, 512, 128) if quick else (512, 8, 4096, 256)
        mha = nn.MultiheadAttention(e, h, batch_first=True, device=device)
        rma = pr.nn.RandMultiHeadAttention.from_mha(mha, num_random_features=m)
        # Performer approximates softmax attention best on moderately scaled inputs.
        xs = torch.randn(2, N, e, device=device) * 0.5
        refa = mha(xs, xs, xs, need_weights=False)[0]
        rows.append(Row(f"RandMultiHeadAttention N={N} m={m}", _params(mha), _params(rma), _rel(rma(xs, xs, xs)[0], refa),
                        "O(1/sqrt(m))", _time_ms(lambda: mha(xs, xs, xs, need_weights=False), device),
                        _time_ms(lambda: rma(xs, xs, xs), device)))
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'layer':<40} {'dense params':>12} {'panther':>10} {'ratio':>6} {'rel err':>8} {'expected':>9} {'dense ms':>9} {'panther ms':>10} {'speedup':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name:<40} {r.dense_params:>12,} {r.panther_params:>10,} {r.panther_params / r.dense_params:>6.2f} "
            f"{r.rel_err:>8.3f} {r.predicted:>9} {r.dense_ms:>9.3f} {r.panther_ms:>10.3f} {r.dense_ms / r.panther_ms:>6.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m panther demo", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (seconds on a laptop CPU)")
    parser.add_argument("--dump-dir", default="panther_dump", help="where the backend tour writes its dump")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile backend tour")
    parser.add_argument("--no-digits", action="store_true", help="skip the accuracy tour on the digits task")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device must be a torch device such as cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")

    import panther as pr

    t0 = time.perf_counter()
    print(f"panther {pr.__version__} | torch {torch.__version__} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print("\nExplicit layers, converted from their dense counterparts (fresh random weights,")
    print("no fine-tuning: 'rel err' is the sketch's own error, 'expected' its predicted size).\n")
    print(format_table(_rows(device, args.quick)))
    if not args.no_compile:
        import importlib.util

        if importlib.util.find_spec("panther.demo_compile") is not None:
            from panther.demo_compile import run_compile_demo

            print("\ntorch.compile(model, backend='panther')\n")
            print(run_compile_demo(device, args.dump_dir))
    if not args.no_digits:
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            print("\n(accuracy tour skipped: scikit-learn, which ships the digits data, is not installed)")
        else:
            from panther.demo_digits import run_digits_demo

            print("\nAccuracy you choose: a trained model, dense vs panther\n")
            print(run_digits_demo(device))
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
