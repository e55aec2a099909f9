"""Plain-PyTorch reference of the low-rank linear kernels (see README.md for the math).

All functions take 2-D activations ``x`` of shape (T, in); callers flatten leading dims.
Matmuls run in the input dtype; torch accumulates low-precision matmuls in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _stack_a(S1s: Tensor, U2s: Tensor) -> Tensor:
    """A = [S1_1 .. S1_L  U2_1 .. U2_L] as one (in, 2Lk) matrix."""
    L, n_in, k = S1s.shape
    return torch.cat([S1s.permute(1, 0, 2).reshape(n_in, L * k), U2s.permute(1, 0, 2).reshape(n_in, L * k)], dim=1)


def _stack_b(U1s: Tensor, S2s: Tensor) -> Tensor:
    """B = [U1_1; ..; U1_L; S2_1; ..; S2_L] as one (2Lk, out) matrix."""
    L, k, n_out = U1s.shape
    return torch.cat([U1s.reshape(L * k, n_out), S2s.reshape(L * k, n_out)], dim=0)


def sklinear_forward(
    x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Tensor | None, *, want_h: bool = False
):
    """y = 1/(2L) Σᵢ (x·S1ᵢ·U1ᵢ + x·U2ᵢ·S2ᵢ) + bias.

    Shapes: x (T, in); S1s, U2s (L, in, k); U1s, S2s (L, k, out); bias (out,) or None.
    Returns y (T, out) in x's dtype; with ``want_h``, (y, h) where h = x·[S1_1 .. S1_L U2_1 .. U2_L]
    (T, 2Lk) is the product the backward needs again (:func:`sklinear_backward` takes it as ``h``).
    """
    scale = 1.0 / (2 * S1s.shape[0])
    return lowrank_forward(x, _stack_a(S1s, U2s), _stack_b(U1s, S2s), bias, scale, want_h=want_h)


def sklinear_backward(
    grad: Tensor,
    x: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    need_dx: bool,
    need_dS: bool,
    need_db: bool,
    h: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (dx, dS1s, dS2s, db) of :func:`sklinear_forward`; ``None`` where not needed.

    Shapes: grad (T, out), x (T, in); results match x, S1s, S2s and (out,). ``h``: the forward's
    (T, 2Lk) product (``want_h``), or None to recompute the part of it needed.
    """
    L, n_in, k = S1s.shape
    n_out = U1s.shape[2]
    scale = 1.0 / (2 * L)
    A = _stack_a(S1s, U2s)
    B = _stack_b(U1s, S2s)
    dx = dS1s = dS2s = db = None
    if need_dx or need_dS:
        gh = (grad @ B.t()) * scale  # (T, 2Lk)
        if need_dx:
            dx = gh @ A.t()
        if need_dS:
            # Only the S1 columns of gh and the U2 columns of h are needed.
            dS1 = x.t() @ gh[:, : L * k]  # (in, Lk)
            dS1s = dS1.reshape(n_in, L, k).permute(1, 0, 2).contiguous()
            h_u2 = h[:, L * k :] if h is not None else x @ U2s.permute(1, 0, 2).reshape(n_in, L * k)  # (T, Lk)
            dS2s = ((h_u2.t() @ grad) * scale).reshape(L, k, n_out)
    if need_db:
        db = grad.sum(0)
    return dx, dS1s, dS2s, db


def lowrank_forward(x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, scale: float, *, want_h: bool = False):
    """y = scale·(x·A)·B + bias, or (y, h = x·A) with ``want_h``.

    Shapes: x (T, in), A (in, r), B (r, out), bias (out,) or None; h (T, r).
    """
    h = x @ A
    if bias is None:
        y = (h @ B) * scale if scale != 1.0 else h @ B
    else:
        y = torch.addmm(bias, h, B, alpha=scale)
    return (y, h) if want_h else y


def lowrank_backward(
    grad: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_db: bool,
    h: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (dx, dA, dB, db) of :func:`lowrank_forward`; ``None`` where not needed.
    ``h``: the forward's x·A (``want_h``), or None to recompute it."""
    dx = dA = dB = db = None
    if need_dx or need_dA:
        gh = (grad @ B.t()) * scale
        if need_dx:
            dx = gh @ A.t()
        if need_dA:
            dA = x.t() @ gh
    if need_dB:
        dB = ((h if h is not None else x @ A).t() @ grad) * scale
    if need_db:
        db = grad.sum(0)
    return dx, dA, dB, db
