"""Custom ops for the sketched 2-D convolution: ``torch.ops.panther.skconv2d`` and its backward.

The function is SKLinear's applied to every image patch (see ``kernels/lowrank_linear/README.md``),
with in = C·kh·kw. Without ever building the patch matrix it is two convolutions:

    h = conv2d(x, A, stride, padding)        A = [S1₁ … S1_L  U2₁ … U2_L]   (2Lk, C, kh, kw)
    y = conv1x1(h, Bᵀ / (2L)) + b            B = [U1₁; … ; U1_L; S2₁; … ; S2_L]  (2Lk, out)

Stacked layout (the layer's state_dict uses the same):

* ``S1s``, ``U2s``: (L, k, C, kh, kw). Term i holds S1ᵢᵀ = U1ᵢ·W (resp. U2ᵢᵀ) with its
  C·kh·kw axis unflattened into conv-kernel form, so ``A`` is the concatenation of the two along
  dim 0 viewed as (2Lk, C, kh, kw): the first conv's weight with no transpose, and kh, kw are
  read off the shape.
* ``U1s``, ``S2s``: (L, k, out), exactly as in SKLinear.

Both ops are ``torch.library.triton_op``s with aten bodies (cuDNN / oneDNN do the convolutions):
under ``torch.compile`` Inductor traces into them. U1s and U2s are fixed: no gradient flows to
them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from .linear import _empty
from ._transforms import creating_graph, under_transform


def _stage1_weight(S1s: Tensor, U2s: Tensor) -> Tensor:
    """A = [S1₁ … S1_L  U2₁ … U2_L] as the (2Lk, C, kh, kw) weight of the first conv."""
    L, k, c, kh, kw = S1s.shape
    return torch.cat([S1s, U2s]).reshape(2 * L * k, c, kh, kw)


def _stage2_matrix(U1s: Tensor, S2s: Tensor) -> Tensor:
    """B/(2L) = [U1₁; … ; U1_L; S2₁; … ; S2_L]/(2L) as one (2Lk, out) matrix."""
    L, k, n_out = U1s.shape
    return torch.cat([U1s, S2s]).reshape(2 * L * k, n_out) * (1.0 / (2 * L))


@triton_op("panther::skconv2d", mutates_args=())
def skconv2d(
    x: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
) -> Tensor:
    """y = 1/(2L)·Σᵢ (patches·S1ᵢ·U1ᵢ + patches·U2ᵢ·S2ᵢ) + bias, as a conv2d of x.

    Shapes: x (N, C, H, W); S1s, U2s (L, k, C, kh, kw); U1s, S2s (L, k, out); bias (out,) or None;
    stride and padding are [sh, sw] and [ph, pw] (symmetric zero padding).
    Returns (N, out, Ho, Wo) with Ho, Wo as for ``nn.Conv2d``.
    """
    return skconv2d_math(x, S1s, S2s, U1s, U2s, bias, stride, padding)


def skconv2d_apply(x, S1s, S2s, U1s, U2s, bias, stride: list[int], padding: list[int]) -> Tensor:
    """SKConv2d's function as the layer calls it (arguments as :func:`skconv2d`): the op, or,
    under torch.func transforms and forward-mode AD, its body as plain aten ops (the op's
    reverse-only autograd would give zero tangents there; :mod:`._transforms`)."""
    args = (x, S1s, S2s, U1s, U2s, bias, stride, padding)
    return skconv2d_math(*args) if under_transform(x, S1s, S2s, bias) else torch.ops.panther.skconv2d(*args)


def skconv2d_math(x, S1s, S2s, U1s, U2s, bias, stride, padding) -> Tensor:
    """The body of :func:`skconv2d` as plain aten ops (same arguments)."""
    h = F.conv2d(x, _stage1_weight(S1s, U2s), None, stride, padding)  # (N, 2Lk, Ho, Wo)
    proj = _stage2_matrix(U1s, S2s).t().contiguous()  # (out, 2Lk)
    return F.conv2d(h, proj[:, :, None, None], bias)


@triton_op("panther::skconv2d_backward", mutates_args=())
def skconv2d_backward(
    grad: Tensor,
    x: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    stride: list[int],
    padding: list[int],
    need_dx: bool,
    need_dS: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dS1s, dS2s, db) of :func:`skconv2d`; a gradient not asked for comes back empty.

    With g = ∂loss/∂y, gh = conv1x1(g, B/(2L)) is the gradient at h; dx and dS1s are the input
    and weight gradients of the first conv (dS1s from the S1 channels of gh only), and
    dS2s = Σ_{n,p} h_U2ᵀ·g/(2L) needs the U2 channels of h, recomputed from x.
    """
    return _skconv2d_backward_impl(grad, x, S1s, S2s, U1s, U2s, stride, padding, need_dx, need_dS, need_db)


def _skconv2d_backward_impl(grad, x, S1s, S2s, U1s, U2s, stride, padding, need_dx, need_dS, need_db):
    # Plain aten ops (convolution_backward has its own derivative): differentiable again when
    # called outside the op, which a create_graph backward does.
    L, k, c, kh, kw = S1s.shape
    Lk, n_out = L * k, S2s.shape[2]
    dx = dS1s = dS2s = db = None
    if need_dx or need_dS:
        B = _stage2_matrix(U1s, S2s)  # (2Lk, out)
        rows = 2 * Lk if need_dx else Lk  # dS1s needs only the S1 channels of gh
        gh = F.conv2d(grad, B[:rows, :, None, None])  # (N, rows, Ho, Wo)
        conv_args = (None, stride, padding, [1, 1], False, [0, 0], 1)
        if need_dx:
            dx = torch.ops.aten.convolution_backward(
                gh, x, _stage1_weight(S1s, U2s), *conv_args, [True, False, False]
            )[0]
        if need_dS:
            dA = torch.ops.aten.convolution_backward(
                gh[:, :Lk], x, S1s.reshape(Lk, c, kh, kw), *conv_args, [False, True, False]
            )[1]
            dS1s = dA.reshape(S1s.shape)
            h_u2 = F.conv2d(x, U2s.reshape(Lk, c, kh, kw), None, stride, padding)  # (N, Lk, Ho, Wo)
            # Σ_{n,p} g·h_U2ᵀ: the weight gradient of a 1×1 conv from h_U2 to y, (out, Lk, 1, 1).
            dP = torch.ops.aten.convolution_backward(
                grad, h_u2, S2s.reshape(Lk, n_out).t()[:, :, None, None], None, [1, 1], [0, 0], [1, 1],
                False, [0, 0], 1, [False, True, False],
            )[1]
            dS2s = (dP.reshape(n_out, Lk).t() * (1.0 / (2 * L))).reshape(S2s.shape)
    if need_db:
        db = grad.sum((0, 2, 3))
    return (
        dx if dx is not None else _empty(x),
        dS1s if dS1s is not None else _empty(S1s),
        dS2s if dS2s is not None else _empty(S2s),
        db if db is not None else _empty(grad),
    )


def _skconv2d_setup(ctx, inputs, output):
    x, S1s, S2s, U1s, U2s, bias, stride, padding = inputs
    ctx.save_for_backward(x, S1s, S2s, U1s, U2s)
    ctx.stride = stride
    ctx.padding = padding
    ctx.has_bias = bias is not None


def _skconv2d_bwd(ctx, grad):
    x, S1s, S2s, U1s, U2s = ctx.saved_tensors
    nx, nS1, nS2, _, _, nb = ctx.needs_input_grad[:6]
    nb = bool(nb and ctx.has_bias)
    # create_graph=True: the backward must be differentiable itself, so not behind the op.
    bwd = _skconv2d_backward_impl if creating_graph() else torch.ops.panther.skconv2d_backward
    dx, dS1s, dS2s, db = bwd(grad, x, S1s, S2s, U1s, U2s, ctx.stride, ctx.padding, nx, nS1 or nS2, nb)
    return (
        dx if nx else None,
        dS1s if nS1 else None,
        dS2s if nS2 else None,
        None,
        None,
        db if nb else None,
        None,
        None,
    )


skconv2d.register_autograd(_skconv2d_bwd, setup_context=_skconv2d_setup)
