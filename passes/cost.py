"""Cost model: FLOPs and bytes moved, as sympy expressions in the graph's symbolic sizes.

Sizes come from the fake values Dynamo recorded: a dimension is an int or a SymInt whose sympy
expression (``s0``, ``s1·s2`` ...) is kept, so the same formula holds for every batch size a
dynamic graph accepts. :func:`at_example` evaluates a formula at the sizes of the example inputs.

``bytes`` counts what a straightforward implementation reads and writes (inputs, weights,
intermediates, outputs), in the activation's element size. The policy compares FLOPs (and
parameters); bytes are reported.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch

__all__ = ["sym", "numel", "at_example", "linear_cost", "conv_cost", "attention_cost", "performer_cost"]


def sym(d: Any) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression."""
    if isinstance(d, torch.SymInt):
        return d.node.expr
    return sympy.Integer(int(d))


def numel(shape: Any) -> sympy.Expr:
    out = sympy.Integer(1)
    for d in shape:
        out *= sym(d)
    return out


def at_example(expr: sympy.Expr, shape_env: Any = None) -> int | None:
    """``expr`` at the example sizes (each symbol's hint), or None if a symbol has no hint."""
    expr = sympy.sympify(expr)
    if expr.free_symbols and shape_env is not None:
        hints = getattr(shape_env, "backed_var_to_val", None)  # torch >= 2.13; var_to_val before
        hints = shape_env.var_to_val if hints is None else hints
        expr = expr.xreplace({s: sympy.Integer(v) for s, v in hints.items() if s in expr.free_symbols})
    if expr.free_symbols:
        return None
    return int(expr)


def linear_cost(T: sympy.Expr, n_in: int, n_out: int, rank: int | None, elt: int) -> dict[str, sympy.Expr]:
    """y = x·Wᵀ (+b) over T rows; with ``rank``: y = (x·A)·B (+b), A in×r, B r×out."""
    if rank is None:
        flops = 2 * T * n_in * n_out
        bytes_ = elt * (T * n_in + n_in * n_out + T * n_out)
    else:
        flops = 2 * T * rank * (n_in + n_out)
        bytes_ = elt * (T * n_in + rank * (n_in + n_out) + 2 * T * rank + T * n_out)
    return {"flops": sympy.expand(flops), "bytes": sympy.expand(bytes_)}


def conv_cost(
    batch: sympy.Expr, c_in: int, c_out: int, kernel: int, in_pixels: sympy.Expr, out_pixels: sympy.Expr, rank: int | None, elt: int
) -> dict[str, sympy.Expr]:
    """conv2d with ``kernel`` = kh·kw; with ``rank``: an r-channel conv, then a 1×1 conv to c_out."""
    if rank is None:
        flops = 2 * batch * out_pixels * c_out * c_in * kernel
        bytes_ = elt * (batch * c_in * in_pixels + c_out * c_in * kernel + batch * c_out * out_pixels)
    else:
        flops = 2 * batch * out_pixels * rank * (c_in * kernel + c_out)
        bytes_ = elt * (batch * c_in * in_pixels + rank * (c_in * kernel + c_out) + 2 * batch * rank * out_pixels + batch * c_out * out_pixels)
    return {"flops": sympy.expand(flops), "bytes": sympy.expand(bytes_)}


def attention_cost(BH: sympy.Expr, N: sympy.Expr, Nk: sympy.Expr, D: int, Dv: int, elt: int, materialized: bool) -> dict[str, sympy.Expr]:
    """softmax(q·kᵀ)·v; ``materialized``: the N×Nk scores are written and read back (manual spelling)."""
    flops = 2 * BH * N * Nk * (D + Dv) + 5 * BH * N * Nk
    bytes_ = elt * BH * (N * D + Nk * D + Nk * Dv + N * Dv)
    if materialized:
        bytes_ += elt * 2 * BH * N * Nk
    return {"flops": sympy.expand(flops), "bytes": sympy.expand(bytes_)}


def performer_cost(BH: sympy.Expr, N: sympy.Expr, Nk: sympy.Expr, D: int, Dv: int, m: int, elt: int) -> dict[str, sympy.Expr]:
    """Performer: features φ(q), φ(k) (m each), kv = φ(k)ᵀ·v, out = φ(q)·kv / φ(q)·Σφ(k)."""
    flops = 2 * BH * m * ((N + Nk) * D + Nk * Dv + N * Dv + N + Nk) + 4 * BH * m * (N + Nk)
    bytes_ = elt * BH * (N * D + Nk * D + Nk * Dv + N * Dv + 2 * (N + Nk) * m + m * Dv)
    return {"flops": sympy.expand(flops), "bytes": sympy.expand(bytes_)}
