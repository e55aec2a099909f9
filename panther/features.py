r"""Random features for kernel approximation (Performer / FAVOR+).

:func:`orthogonal_random_features` draws the projection ``ω`` that the softmax and relu kernels of
:class:`panther.nn.RandMultiHeadAttention` use. Rows come in blocks of ``d`` mutually orthogonal
directions whose rotation is Haar-distributed, each rescaled to the norm of an independent
``d``-dimensional Gaussian vector, so every row is marginally ``N(0, I_d)`` (which keeps
``E[φ(q)·φ(k)] = exp(q·k)`` unbiased) while rows within a block are exactly orthogonal (which
lowers the variance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from panther._validation import check_dtype, check_int

__all__ = ["orthogonal_random_features"]


def _haar_orthogonal(shape: tuple[int, ...], d: int, generator: torch.Generator | None, device, dtype) -> Tensor:
    """A batch of ``shape`` independent Haar-distributed d×d orthogonal matrices.

    ``Q`` from a Householder QR of a Gaussian matrix is *not* Haar-distributed: LAPACK fixes the
    signs of ``diag(R)`` by its own convention, which biases ``Q``. Multiplying column ``j`` of
    ``Q`` by ``sign(R_jj)`` makes the factorization unique with ``R_jj > 0``, and then ``Q`` is
    Haar (Mezzadri 2007, "How to generate random matrices from the classical compact groups").
    Without it the Performer estimate stops improving as the number of features grows.
    """
    a = torch.randn(*shape, d, d, generator=generator, device=device, dtype=dtype)
    q, r = torch.linalg.qr(a)
    signs = torch.sgn(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # R_jj = 0 has probability 0
    return q * signs.unsqueeze(-2)


def orthogonal_random_features(
    num_heads: int,
    m: int,
    d: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Orthogonal random features ``ω`` of shape ``(num_heads, m, d)``, independent per head.

    Per head, ``⌈m/d⌉`` blocks are stacked; each block is ``Qᵀ`` for a Haar-distributed
    orthogonal ``Q`` (Householder QR of a d×d standard Gaussian matrix, with each column of ``Q``
    multiplied by the sign of ``R``'s diagonal entry). The first ``m`` rows are kept, and each row
    is rescaled to the norm of an independent ``d``-dimensional standard Gaussian vector (a
    :math:`\chi_d` draw). So each row is marginally :math:`\mathcal{N}(0, I_d)` and rows of the
    same block are orthogonal.

    Args:
        num_heads: number of independent feature sets (> 0).
        m: number of features per head (> 0).
        d: dimension of each feature (> 0).
        generator: ``torch.Generator`` to draw from; the draws happen on its device. Default:
            torch's global RNG on ``device``, so ``torch.manual_seed`` reproduces the result.
            The global RNG is never reseeded, and not touched when a generator is given.
        device: where the result lives. Default: ``torch.get_default_device()``.
        dtype: floating dtype of the result. Default: ``torch.get_default_dtype()``. The draws
            and the QR run in float64 when ``dtype`` is float64 and in float32 otherwise.

    Returns:
        Tensor of shape ``(num_heads, m, d)``.

    Raises:
        TypeError: non-int sizes, a ``generator`` that is not a ``torch.Generator``, or a
            ``dtype`` that is not a floating-point dtype.
        ValueError: non-positive sizes.

    Example:
        >>> import torch
        >>> from panther.features import orthogonal_random_features
        >>> w = orthogonal_random_features(2, 8, 4, generator=torch.Generator().manual_seed(0))
        >>> w.shape
        torch.Size([2, 8, 4])
        >>> block = w[0, :4] / w[0, :4].norm(dim=1, keepdim=True)
        >>> torch.allclose(block @ block.T, torch.eye(4), atol=1e-5)
        True
    """
    num_heads = check_int("num_heads", num_heads)
    m = check_int("m", m)
    d = check_int("d", d)
    dtype = check_dtype(dtype) or torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.get_default_device()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    draw_device = generator.device if generator is not None else device
    work = torch.float64 if dtype == torch.float64 else torch.float32

    blocks = -(-m // d)
    q = _haar_orthogonal((num_heads, blocks), d, generator, draw_device, work)
    rows = q.transpose(-1, -2).reshape(num_heads, blocks * d, d)[:, :m]
    norms = torch.randn(num_heads, m, d, generator=generator, device=draw_device, dtype=work).norm(dim=-1)
    return (rows * norms.unsqueeze(-1)).to(device=device, dtype=dtype)

