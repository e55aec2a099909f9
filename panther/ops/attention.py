"""Custom ops for Performer (FAVOR+) attention: ``torch.ops.panther.performer_attention``, its
training variant ``performer_attention_train`` (which also returns what the backward reuses) and
the backward.

The math (feature maps, stabilizers, chunked causal prefix sums, backward) is in
``kernels/performer/README.md``. Both ops are ``torch.library.triton_op``s: on CUDA fp32/fp16/bf16
tensors their body calls the Triton kernels of ``panther.kernels.performer.triton`` when that module
imports and provides the function, and the plain-PyTorch reference otherwise (CPU, float64, or no
kernel). Under ``torch.compile`` Inductor traces into the body, so on CPU the reference lowers to
generated C++.

Shapes: q (B, H, N, D); k (B, H, Nk, D); v (B, H, Nk, E); omega (H, m, D) random features;
key_mask (B, Nk) bool, True = attend, or None. Output (B, H, N, E) in v's dtype. Causal needs
N == Nk. The ops check nothing: :class:`panther.nn.RandMultiHeadAttention` validates its inputs.
No gradient flows to omega or key_mask.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.library import triton_op

from panther.kernels.performer import reference as ref

from ._transforms import creating_graph, under_transform

_TRITON_MODULE = "panther.kernels.performer.triton"


@functools.cache
def _triton_fn(name: str) -> Callable | None:
    """``panther.kernels.performer.triton.<name>``, or None if that module or function is absent.

    A module that exists but fails to import is reported once (and the reference is used), so a
    broken kernel never passes silently for a missing one.
    """
    import importlib

    try:
        module = importlib.import_module(_TRITON_MODULE)
    except ModuleNotFoundError as e:
        if e.name not in (_TRITON_MODULE, "triton"):
            warnings.warn(f"{_TRITON_MODULE} failed to import ({e}); using the reference", RuntimeWarning, stacklevel=3)
        return None
    except ImportError as e:
        warnings.warn(f"{_TRITON_MODULE} failed to import ({e}); using the reference", RuntimeWarning, stacklevel=3)
        return None
    return getattr(module, name, None)


# The Triton kernels compute in fp32 at most: float64 (gradcheck, accuracy references) runs the
# reference on every device.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_impl(name: str, q: Tensor, v: Tensor, omega: Tensor) -> Callable | None:
    """The Triton implementation of ``name`` for CUDA fp32/fp16/bf16 tensors of shapes its
    kernels support (``supports``), else None. Empty q or v (a batch, head count or sequence of
    0) take the reference, which has nothing to launch either."""
    if q.device.type == "cuda" and q.dtype in _TRITON_DTYPES and q.numel() and v.numel():
        fn = _triton_fn(name)
        supports = _triton_fn("supports")
        if fn is not None and supports is not None and supports(q, v, omega):
            return fn
    return None


def _impl(name: str, q: Tensor, v: Tensor, omega: Tensor) -> Callable:
    """The Triton implementation of ``name`` (see _triton_impl), else the reference."""
    return _triton_impl(name, q, v, omega) or getattr(ref, name)


@triton_op("panther::performer_attention", mutates_args=())
def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
) -> Tensor:
    """Performer attention: outᵢ = Σⱼ φ(qᵢ)·φ(kⱼ) vⱼ / Σⱼ φ(qᵢ)·φ(kⱼ), over all j or j ≤ i (causal).

    φ approximates the kernel exp(scale·q·k) ("softmax") or is relu features ("relu"); masked
    keys (key_mask False) contribute nothing. Shapes in the module docstring. Causal softmax keys
    are stabilized by their running max over earlier positions (kernels/performer/README.md), so
    no output depends on a later key and no feature overflows.
    """
    return _impl("performer_attention", q, v, omega)(q, k, v, omega, key_mask, kernel_fn, causal, scale)


@triton_op("panther::performer_attention_train", mutates_args=())
def performer_attention_train(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(out, stats): :func:`performer_attention`'s output, and what its backward may reuse.

    stats is float32 and opaque: (B, H, R, N) where the kernels that ran keep per-row numbers of
    the forward for the backward (the causal chunked Triton kernels: R = 3 + 32 for bf16 at the
    default chunk of 64 positions, 3 + 64 otherwise), empty elsewhere. Its
    autograd backward passes (out, stats) to :func:`performer_attention_backward`; stats gets no
    gradient. Use this op for training (``RandMultiHeadAttention`` does whenever a gradient is
    needed) and :func:`performer_attention` for inference, which keeps nothing.
    """
    return _train_impl(q, k, v, omega, key_mask, kernel_fn, causal, scale)


def _train_impl(q, k, v, omega, key_mask, kernel_fn, causal, scale) -> tuple[Tensor, Tensor]:
    fn = _triton_impl("performer_attention_train", q, v, omega)
    if fn is not None:
        return fn(q, k, v, omega, key_mask, kernel_fn, causal, scale)
    return ref.performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale), q.new_empty(0, dtype=torch.float32)


@triton_op("panther::performer_attention_backward", mutates_args=())
def performer_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
    out: Tensor | None = None,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`performer_attention` given grad = ∂loss/∂out (shape of out).

    ``out`` and ``stats``: what :func:`performer_attention_train` returned for these inputs, or
    None; the Triton kernels may use them instead of recomputing the forward, the reference
    ignores them (the gradient is the same function either way)."""
    return _backward_impl(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, out, stats)


def _backward_impl(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, out, stats) -> tuple[Tensor, Tensor, Tensor]:
    fn = _triton_impl("performer_attention_backward", q, v, omega)
    if fn is not None:
        return fn(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, out=out, stats=stats)
    return ref.performer_attention_backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale)


def _setup(ctx, inputs, output):
    q, k, v, omega, key_mask, kernel_fn, causal, scale = inputs
    ctx.save_for_backward(q, k, v, omega, key_mask)
    ctx.kernel_fn, ctx.causal, ctx.scale = kernel_fn, causal, scale


def _grads(ctx, dq, dk, dv) -> tuple:
    nq, nk, nv = ctx.needs_input_grad[:3]
    return dq if nq else None, dk if nk else None, dv if nv else None, None, None, None, None, None


def _backward_of(ctx, grad, backward, q, k, v, omega, key_mask, out=None, stats=None) -> tuple:
    """The autograd return of all three entry points: ``backward`` (the op, or the kernels
    directly) given the forward's ``out``/``stats``, or with ``create_graph=True`` the reference
    math, which is differentiable again (the backward op has no derivative of its own)."""
    if creating_graph():
        dq, dk, dv = ref.performer_attention_backward(grad, q, k, v, omega, key_mask, ctx.kernel_fn, ctx.causal, ctx.scale)
    else:
        dq, dk, dv = backward(grad, q, k, v, omega, key_mask, ctx.kernel_fn, ctx.causal, ctx.scale, out, stats)
    return _grads(ctx, dq, dk, dv)


def _backward(ctx, grad):
    return _backward_of(ctx, grad, torch.ops.panther.performer_attention_backward, *ctx.saved_tensors)


def _setup_train(ctx, inputs, output):
    q, k, v, omega, key_mask, kernel_fn, causal, scale = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, omega, key_mask, out, stats)
    ctx.kernel_fn, ctx.causal, ctx.scale = kernel_fn, causal, scale


def _backward_train(ctx, grad, _grad_stats):
    return _backward_of(ctx, grad, torch.ops.panther.performer_attention_backward, *ctx.saved_tensors)


performer_attention.register_autograd(_backward, setup_context=_setup)
performer_attention_train.register_autograd(_backward_train, setup_context=_setup_train)


# ---------------------------------------------------------------------------------------------
# What the layer calls
# ---------------------------------------------------------------------------------------------


class _EagerPerformer(torch.autograd.Function):
    """The training op's forward and backward (the same kernels, the same saved out and stats)
    for eager CUDA calls, without the custom-op layers in between: in eager mode every call of a
    ``torch.library`` op passes through torch's Python custom-op machinery (its dispatch, the
    autograd wrapper, the backward op's own dispatch), host time that the linear layers measured
    at ~200 µs per forward+backward on the H200 (panther/ops/linear.py, ``_EagerLowRank``).
    Under ``torch.compile`` and on CPU the ops stay."""

    @staticmethod
    def forward(ctx, q, k, v, omega, key_mask, kernel_fn, causal, scale):
        out, stats = _train_impl(q, k, v, omega, key_mask, kernel_fn, causal, scale)
        ctx.save_for_backward(q, k, v, omega, key_mask, out, stats)
        ctx.kernel_fn, ctx.causal, ctx.scale = kernel_fn, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        return _backward_of(ctx, grad, _backward_impl, *ctx.saved_tensors)


def performer_attention_apply(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
) -> Tensor:
    """Performer attention as ``RandMultiHeadAttention`` calls it: :func:`performer_attention`'s
    function and contract (shapes in the module docstring), differentiable in q, k and v.

    When autograd records (grad mode on, q, k or v requiring grad) it trains through
    :func:`performer_attention_train`, whose saved stats the backward reuses; otherwise it runs
    :func:`performer_attention`, which keeps nothing. Under ``torch.compile`` and on CPU these
    are the ops; in eager mode on CUDA the same functions are called without the custom-op
    dispatch (:class:`_EagerPerformer`). Under torch.func transforms and forward-mode AD it is
    the reference math (:mod:`._transforms`).
    """
    if under_transform(q, k, v):
        return ref.performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale)
    args = (q, k, v, omega, key_mask, kernel_fn, causal, scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.is_cuda and not torch.compiler.is_compiling():
        if grad:
            return _EagerPerformer.apply(*args)
        return _impl("performer_attention", q, v, omega)(*args)
    if grad:
        return torch.ops.panther.performer_attention_train(*args)[0]
    return torch.ops.panther.performer_attention(*args)
