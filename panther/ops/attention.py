"""Custom ops for Performer (FAVOR+) attention: ``torch.ops.panther.performer_attention`` and its backward.

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


def _impl(name: str, q: Tensor, v: Tensor, omega: Tensor) -> Callable:
    """The Triton implementation of ``name`` for CUDA fp32/fp16/bf16 tensors of shapes its
    kernels support (``supports``), else the reference."""
    if q.device.type == "cuda" and q.dtype in _TRITON_DTYPES:
        fn = _triton_fn(name)
        supports = _triton_fn("supports")
        if fn is not None and supports is not None and supports(q, v, omega):
            return fn
    return getattr(ref, name)


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
    keys (key_mask False) contribute nothing. Shapes in the module docstring. Causal softmax
    features are representable only while ``causal_key_shift(omega)`` (kernels/performer/
    reference.py) stays under ``CAUSAL_SHIFT_LIMIT``: past it the output is 0. The op does not
    check (that needs a device sync per call); ``RandMultiHeadAttention`` does, once per ω.
    """
    return _impl("performer_attention", q, v, omega)(q, k, v, omega, key_mask, kernel_fn, causal, scale)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`performer_attention` given grad = ∂loss/∂out (shape of out)."""
    return _impl("performer_attention_backward", q, v, omega)(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale)


def _setup(ctx, inputs, output):
    q, k, v, omega, key_mask, kernel_fn, causal, scale = inputs
    ctx.save_for_backward(q, k, v, omega, key_mask)
    ctx.kernel_fn, ctx.causal, ctx.scale = kernel_fn, causal, scale


def _backward(ctx, grad):
    q, k, v, omega, key_mask = ctx.saved_tensors
    nq, nk, nv = ctx.needs_input_grad[:3]
    dq, dk, dv = torch.ops.panther.performer_attention_backward(
        grad, q, k, v, omega, key_mask, ctx.kernel_fn, ctx.causal, ctx.scale
    )
    return dq if nq else None, dk if nk else None, dv if nv else None, None, None, None, None, None


performer_attention.register_autograd(_backward, setup_context=_setup)
