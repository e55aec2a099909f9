"""Custom ops for the low-rank linear: ``torch.ops.panther.sklinear`` and ``panther.lowrank_linear``.

Both are ``torch.library.triton_op``s: under ``torch.compile`` Inductor traces into their bodies,
so on CPU they lower to generated C++ (and Inductor's GEMM templates), and on CUDA it sees the
Triton kernels of ``panther.kernels.lowrank_linear.triton`` (launched through ``wrap_triton``).
Outside of compile they run eagerly. On CUDA, operands the kernels do not take (mixed dtypes,
float64) go through the reference. The layers' eager calls on CUDA (:func:`sklinear_apply`,
:func:`lowrank_linear_apply`) launch the same kernels without the custom-op layers
(``_EagerLowRank``): their Python dispatch took ~200 µs of host time per forward+backward.

The backward of each op is itself an op, so the GPU path can swap in backward kernels.

Training goes through ``panther::sklinear_train`` / ``panther::lowrank_linear_train``: the same
forward, also returning h = x·A (T × r, small), which the backward then reads instead of making
one more pass over x to recompute it (SKLinear and LowRankLinear pick these when autograd records,
under ``torch.compile`` and on CPU; eager CUDA calls keep h the same way through ``_EagerLowRank``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from panther.kernels.lowrank_linear import reference as ref

from ._transforms import creating_graph, under_transform

try:  # triton comes with torch's CUDA wheels; a CPU-only install may lack it
    from panther.kernels.lowrank_linear import triton as tk
except ImportError:  # pragma: no cover - depends on the install
    tk = None


def _flat(x: Tensor) -> Tensor:
    # (2-D input as is: a reshape is a dispatch of its own, which counts at small T.)
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _unflat(y: Tensor, x: Tensor) -> Tensor:
    """y (T, out) computed from _flat(x), back to x's leading dims."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _impl(x: Tensor, *weights: Tensor | None):
    """The kernels for these operands: Triton on CUDA where they take them, else the reference."""
    return tk if tk is not None and x.is_cuda and tk.supported(x, *weights) else ref


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records an op on these tensors (grad mode on, one of them requires grad):
    the layers then call the ``*_train`` op, whose saved h spares the backward a pass over x."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eager_cuda(x: Tensor) -> bool:
    # Outside of compile, on CUDA, the layers skip the custom-op dispatch (see _EagerLowRank).
    return x.is_cuda and not torch.compiler.is_compiling()


def _empty(like: Tensor) -> Tensor:
    # Stand-in for a gradient that was not asked for (custom-op returns cannot be None).
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------
# panther::sklinear
# ---------------------------------------------------------------------------------------------


@triton_op("panther::sklinear", mutates_args=())
def sklinear(x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Tensor | None) -> Tensor:
    """y = 1/(2L)·Σᵢ (x·S1ᵢ·U1ᵢ + x·U2ᵢ·S2ᵢ) + bias, over the last dim of x.

    Shapes: x (..., in); S1s, U2s (L, in, k); U1s, S2s (L, k, out); bias (out,) or None.
    Returns (..., out). U1s and U2s are fixed: no gradient flows to them.
    """
    y = _impl(x, S1s, S2s, U1s, U2s, bias).sklinear_forward(_flat(x), S1s, S2s, U1s, U2s, bias)
    return _unflat(y, x)


@triton_op("panther::sklinear_backward", mutates_args=())
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dS1s, dS2s, db) of :func:`sklinear`; a gradient not asked for comes back empty.

    ``h``: the (T, 2Lk) product :func:`sklinear_train` returned, or None to recompute it.
    """
    impl = _impl(x, grad, S1s, S2s, U1s, U2s, h)
    dx, dS1s, dS2s, db = impl.sklinear_backward(
        _flat(grad), _flat(x), S1s, S2s, U1s, U2s, need_dx, need_dS, need_db, None if h is None else _flat(h)
    )
    return (
        (dx if x.dim() == 2 else dx.reshape(x.shape)) if dx is not None else _empty(x),
        dS1s if dS1s is not None else _empty(S1s),
        dS2s if dS2s is not None else _empty(S2s),
        db if db is not None else _empty(grad),
    )


@triton_op("panther::sklinear_train", mutates_args=())
def sklinear_train(
    x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(y, h): y as :func:`sklinear`, and h = x·[S1_1 .. S1_L U2_1 .. U2_L] of shape (..., 2Lk),
    which the backward reads instead of recomputing (h itself takes no gradient)."""
    y, h = _impl(x, S1s, S2s, U1s, U2s, bias).sklinear_forward(_flat(x), S1s, S2s, U1s, U2s, bias, want_h=True)
    if x.dim() == 2:
        return y, h
    return y.reshape(*x.shape[:-1], U1s.shape[2]), h.reshape(*x.shape[:-1], h.shape[1])


def _double(grads: tuple, x: Tensor) -> tuple:
    """The reference backward's gradients, dx in x's shape. With ``create_graph=True`` the
    backward runs the reference math outside the ops (whose backward ops have no derivative of
    their own) and recomputes h from x (the saved h carries no gradient), so a second
    derivative (gradient penalties, Hessian-vector products) flows through it."""
    dx, *rest = grads
    return (dx.reshape(x.shape) if dx is not None else None, *rest)


def _sklinear_setup(ctx, inputs, output):
    x, S1s, S2s, U1s, U2s, bias = inputs
    h = output[1] if isinstance(output, tuple) else None
    ctx.save_for_backward(x, S1s, S2s, U1s, U2s, h)
    ctx.has_bias = bias is not None
    if h is not None:
        ctx.mark_non_differentiable(h)


def _sklinear_bwd(ctx, grad, *_):
    x, S1s, S2s, U1s, U2s, h = ctx.saved_tensors
    nx, nS1, nS2, _, _, nb = ctx.needs_input_grad
    if creating_graph():  # create_graph=True: a differentiable backward (see _double)
        dx, dS1s, dS2s, db = _double(ref.sklinear_backward(_flat(grad), _flat(x), S1s, S2s, U1s, U2s, nx, nS1 or nS2, bool(nb and ctx.has_bias), None), x)
    else:
        dx, dS1s, dS2s, db = torch.ops.panther.sklinear_backward(
            grad, x, S1s, S2s, U1s, U2s, nx, nS1 or nS2, bool(nb and ctx.has_bias), h
        )
    return (
        dx if nx else None,
        dS1s if nS1 else None,
        dS2s if nS2 else None,
        None,
        None,
        db if (nb and ctx.has_bias) else None,
    )


sklinear.register_autograd(_sklinear_bwd, setup_context=_sklinear_setup)
sklinear_train.register_autograd(_sklinear_bwd, setup_context=_sklinear_setup)


# ---------------------------------------------------------------------------------------------
# panther::lowrank_linear
# ---------------------------------------------------------------------------------------------


@triton_op("panther::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """y = scale·(x·A)·B + bias over the last dim of x.

    Shapes: x (..., in), A (in, r), B (r, out), bias (out,) or None. Returns (..., out).
    """
    y = _impl(x, A, B, bias).lowrank_forward(_flat(x), A, B, bias, scale)
    return _unflat(y, x)


@triton_op("panther::lowrank_linear_backward", mutates_args=())
def lowrank_linear_backward(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, db) of :func:`lowrank_linear`; a gradient not asked for comes back empty.

    ``h``: the x·A that :func:`lowrank_linear_train` returned, or None to recompute it.
    """
    impl = _impl(x, grad, A, B, h)
    dx, dA, dB, db = impl.lowrank_backward(
        _flat(grad), _flat(x), A, B, scale, need_dx, need_dA, need_dB, need_db, None if h is None else _flat(h)
    )
    return (
        (dx if x.dim() == 2 else dx.reshape(x.shape)) if dx is not None else _empty(x),
        dA if dA is not None else _empty(A),
        dB if dB is not None else _empty(B),
        db if db is not None else _empty(grad),
    )


@triton_op("panther::lowrank_linear_train", mutates_args=())
def lowrank_linear_train(x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(y, h): y as :func:`lowrank_linear`, and h = x·A of shape (..., r), which the backward reads
    instead of recomputing (h itself takes no gradient)."""
    y, h = _impl(x, A, B, bias).lowrank_forward(_flat(x), A, B, bias, scale, want_h=True)
    if x.dim() == 2:
        return y, h
    return y.reshape(*x.shape[:-1], B.shape[1]), h.reshape(*x.shape[:-1], h.shape[1])


def _lowrank_setup(ctx, inputs, output):
    x, A, B, bias, scale = inputs
    h = output[1] if isinstance(output, tuple) else None
    ctx.save_for_backward(x, A, B, h)
    ctx.scale = scale
    ctx.has_bias = bias is not None
    if h is not None:
        ctx.mark_non_differentiable(h)


def _lowrank_bwd(ctx, grad, *_):
    x, A, B, h = ctx.saved_tensors
    nx, nA, nB, nb, _ = ctx.needs_input_grad
    nb = bool(nb and ctx.has_bias)
    if creating_graph():  # create_graph=True: a differentiable backward (see _double)
        dx, dA, dB, db = _double(ref.lowrank_backward(_flat(grad), _flat(x), A, B, ctx.scale, nx, nA, nB, nb, None), x)
    else:
        dx, dA, dB, db = torch.ops.panther.lowrank_linear_backward(grad, x, A, B, ctx.scale, nx, nA, nB, nb, h)
    return (dx if nx else None, dA if nA else None, dB if nB else None, db if nb else None, None)


lowrank_linear.register_autograd(_lowrank_bwd, setup_context=_lowrank_setup)
lowrank_linear_train.register_autograd(_lowrank_bwd, setup_context=_lowrank_setup)


# ---------------------------------------------------------------------------------------------
# What the layers call
# ---------------------------------------------------------------------------------------------


class _EagerLowRank(torch.autograd.Function):
    """The training ops' forward and backward (the same kernels, the same saved h) for eager CUDA
    calls, without the custom-op layers in between.

    Each call of a ``torch.library`` op in eager mode passes through torch's Python custom-op
    machinery (dispatch into the Python kernel, the autograd wrapper, the backward op's own
    dispatch); on the H200 that was ~200 µs of host time per forward+backward, more than the GPU
    time of a 8192×8192 layer at 4096 tokens. Under ``torch.compile`` the ops stay (Inductor must
    see them), and on CPU too (the reference path has nothing to gain).
    """

    @staticmethod
    def forward(ctx, kind: str, x: Tensor, scale: float, bias: Tensor | None, *w: Tensor) -> Tensor:
        impl = _impl(x, *w, bias)
        if kind == "sk":
            y, h = impl.sklinear_forward(_flat(x), *w, bias, want_h=True)
        else:
            y, h = impl.lowrank_forward(_flat(x), *w, bias, scale, want_h=True)
        ctx.save_for_backward(x, h, *w)
        ctx.kind, ctx.scale, ctx.has_bias = kind, scale, bias is not None
        return _unflat(y, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, h, *w = ctx.saved_tensors
        nx, nb = ctx.needs_input_grad[1], bool(ctx.needs_input_grad[3] and ctx.has_bias)
        nw = ctx.needs_input_grad[4:]
        impl = _impl(x, grad, *w)
        if creating_graph():  # create_graph=True: a differentiable backward (see _double)
            impl, h = ref, None
        g2, x2 = _flat(grad), _flat(x)
        if ctx.kind == "sk":  # w = (S1s, S2s, U1s, U2s): gradients for S1s, S2s only
            dx, dS1, dS2, db = impl.sklinear_backward(g2, x2, *w, nx, nw[0] or nw[1], nb, h)
            dw = (dS1 if nw[0] else None, dS2 if nw[1] else None, None, None)
        else:  # w = (A, B)
            dx, dA, dB, db = impl.lowrank_backward(g2, x2, *w, ctx.scale, nx, nw[0], nw[1], nb, h)
            dw = (dA, dB)
        if dx is not None and x.dim() != 2:
            dx = dx.reshape(x.shape)
        return None, dx if nx else None, None, db if nb else None, *dw


def sklinear_apply(x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Tensor | None) -> Tensor:
    """SKLinear's function y = 1/(2L)·Σᵢ (x·S1ᵢ·U1ᵢ + x·U2ᵢ·S2ᵢ) + bias, as the layer calls it.

    Shapes as :func:`sklinear`. Under ``torch.compile`` (and on CPU) it is the op: ``sklinear``,
    or ``sklinear_train`` when autograd records (its saved h spares the backward a pass over x).
    In eager mode on CUDA the same kernels are called without the custom-op layers
    (:class:`_EagerLowRank`). Under torch.func transforms and forward-mode AD it is the reference
    math (:mod:`._transforms`).
    """
    if under_transform(x, S1s, S2s, bias):
        y = ref.sklinear_forward(_flat(x), S1s, S2s, U1s, U2s, bias)
        return _unflat(y, x)
    if _eager_cuda(x):
        if records_grad(x, S1s, S2s, bias):
            return _EagerLowRank.apply("sk", x, 0.0, bias, S1s, S2s, U1s, U2s)
        y = _impl(x, S1s, S2s, U1s, U2s, bias).sklinear_forward(_flat(x), S1s, S2s, U1s, U2s, bias)
        return _unflat(y, x)
    if records_grad(x, S1s, S2s, bias):
        return torch.ops.panther.sklinear_train(x, S1s, S2s, U1s, U2s, bias)[0]
    return torch.ops.panther.sklinear(x, S1s, S2s, U1s, U2s, bias)


def lowrank_linear_apply(x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, scale: float = 1.0) -> Tensor:
    """LowRankLinear's function y = scale·(x·A)·B + bias, as the layer calls it (dispatch as in
    :func:`sklinear_apply`). Shapes as :func:`lowrank_linear`."""
    if under_transform(x, A, B, bias):
        y = ref.lowrank_forward(_flat(x), A, B, bias, float(scale))
        return _unflat(y, x)
    if _eager_cuda(x):
        if records_grad(x, A, B, bias):
            return _EagerLowRank.apply("lr", x, float(scale), bias, A, B)
        y = _impl(x, A, B, bias).lowrank_forward(_flat(x), A, B, bias, scale)
        return _unflat(y, x)
    if records_grad(x, A, B, bias):
        return torch.ops.panther.lowrank_linear_train(x, A, B, bias, scale)[0]
    return torch.ops.panther.lowrank_linear(x, A, B, bias, scale)
