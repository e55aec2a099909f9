r"""Low-rank factorizations of a weight matrix, for the compiler backend and ``panther.convert``.

All of them return the factors of one *low-rank linear*: for a weight ``W`` of shape
(out, in) as in ``nn.Linear``, :func:`lowrank` returns ``A`` (in × r) and ``B`` (r × out) with
``x·A·B ≈ x·Wᵀ``, which ``torch.ops.panther.lowrank_linear`` (and its Triton kernels) run.

Methods:

* ``"sketch"``: the two-sided random sketch that :class:`panther.nn.SKLinear` builds (one term,
  ``k = r/2``): unbiased, cheap, noisy — its error is set by ``‖W‖_F``, not by the spectrum.
* ``"svd"``: the exact truncated SVD, the best rank-r approximation of ``W`` (Eckart–Young).
* ``"rsvd"``: :func:`randomized_svd` (Halko–Martinsson–Tropp): near-optimal, far cheaper for
  large matrices.
* ``"data-aware"``: minimizes the *output* error ``‖X·Wᵀ − X·A·B‖_F`` over recorded activations
  ``X`` instead of ``‖W − Ŵ‖``: whiten by the activations' second moment, truncate, un-whiten
  (the idea behind ASVD / SVD-LLM).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from panther._validation import check_choice, check_float, check_int, check_tensor
from panther.sketch import GaussianSketch, sign_matrix

METHODS = ("sketch", "svd", "rsvd", "data-aware")

__all__ = ["METHODS", "lowrank", "randomized_svd"]


def _check_matrix(name: str, M) -> Tensor:
    check_tensor(name, M)
    if M.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(M.shape)}")
    if not M.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {M.dtype}")
    return M


def _work_dtype(M: Tensor) -> torch.dtype:
    return torch.float64 if M.dtype == torch.float64 else torch.float32


def randomized_svd(
    M: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Randomized truncated SVD ``M ≈ U·diag(S)·Vh`` (Halko, Martinsson & Tropp, 2011).

    Range finder: ``Y = M·Ω`` with a Gaussian sketch Ω (``panther.sketch.GaussianSketch``) of
    ``rank + oversample`` columns, refined by ``n_iter`` power iterations (re-orthonormalized by
    QR after every product, so small singular values are not lost to rounding); then the exact
    SVD of the small matrix ``Qᵀ·M``.

    Args:
        M: (m, n) floating-point matrix.
        rank: number of singular triplets to return, ``1 <= rank <= min(m, n)``.
        oversample: extra sketch columns (>= 0). Default 10.
        n_iter: power iterations (>= 0). Default 2; use more for slowly decaying spectra.
        generator: optional ``torch.Generator``; default: the global RNG.

    Returns:
        ``U`` (m, rank), ``S`` (rank,), ``Vh`` (rank, n), in ``M``'s dtype (computed in at least
        fp32).

    Raises:
        TypeError / ValueError: ``M`` not a 2-D floating tensor; ``rank`` outside
        ``[1, min(m, n)]``; negative ``oversample`` or ``n_iter``.

    Example:
        >>> import torch
        >>> from panther.linalg import randomized_svd
        >>> M = torch.randn(100, 20) @ torch.randn(20, 80)
        >>> U, S, Vh = randomized_svd(M, 20)
        >>> bool(torch.allclose(U @ torch.diag(S) @ Vh, M, atol=1e-3))
        True
    """
    _check_matrix("M", M)
    m, n = M.shape
    rank = check_int("rank", rank)
    if rank > min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}")
    oversample = check_int("oversample", oversample, minimum=0)
    n_iter = check_int("n_iter", n_iter, minimum=0)
    A = M.to(_work_dtype(M))
    width = min(rank + oversample, min(m, n))
    omega = GaussianSketch(width, n, generator=generator, device=A.device, dtype=A.dtype).matrix()  # (width, n)
    Q = torch.linalg.qr(A @ omega.t()).Q  # (m, width)
    for _ in range(n_iter):
        Q = torch.linalg.qr(A.t() @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.t() @ A, full_matrices=False)
    U = Q @ Ub
    return U[:, :rank].to(M.dtype), S[:rank].to(M.dtype), Vh[:rank].to(M.dtype)


def _split(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced factors of U·diag(S)·Vh: (U·√S, √S·Vh)."""
    r = S.sqrt()
    return U * r, r[:, None] * Vh


def lowrank(
    W: Tensor,
    rank: int,
    method: str = "rsvd",
    activations: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    damping: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``(A, B)`` of a linear layer's weight: ``x·A·B ≈ x·Wᵀ``.

    Args:
        W: (out, in) weight, ``nn.Linear`` layout.
        rank: ``r``, 1 <= r <= min(out, in) (for ``"sketch"``, any even r >= 2 is allowed; the
            sketch uses one term with ``low_rank = r/2``).
        method: one of ``"sketch"``, ``"svd"``, ``"rsvd"``, ``"data-aware"`` (module docstring).
        activations: (T, in) inputs the layer sees (any leading dims are flattened); required for
            ``"data-aware"``, ignored otherwise.
        generator: optional ``torch.Generator`` for the random methods.
        damping: relative ridge added to the activations' second moment (``"data-aware"``) so
            directions the data never visits are kept by the plain SVD instead of blowing up.

    Returns:
        ``A`` (in, r) and ``B`` (r, out), in ``W``'s dtype and device.

    Raises:
        TypeError / ValueError: bad ``W`` (a non-empty 2-D floating tensor), ``rank``, ``method``
        or ``damping`` (a float >= 0); missing, mis-shaped or empty ``activations`` for
        ``"data-aware"``.

    Example:
        >>> import torch
        >>> from panther.linalg import lowrank
        >>> W = torch.randn(64, 32) @ torch.randn(32, 128)
        >>> A, B = lowrank(W, 32, "svd")
        >>> x = torch.randn(5, 128)
        >>> bool(torch.allclose(x @ A @ B, x @ W.t(), rtol=1e-3, atol=1e-2))
        True
    """
    _check_matrix("W", W)
    method = check_choice("method", method, METHODS)
    rank = check_int("rank", rank)
    damping = check_float("damping", damping, low=0.0, high=float("inf"))
    n_out, n_in = W.shape
    if W.numel() == 0:
        raise ValueError(f"W must have at least one row and one column, got shape {tuple(W.shape)}")
    if method == "sketch":
        if rank < 2 or rank % 2:
            raise ValueError(f"rank must be an even integer >= 2 for method='sketch' (k = rank/2), got {rank}")
    elif rank > min(n_out, n_in):
        raise ValueError(f"rank must be in [1, min(out, in)] = [1, {min(n_out, n_in)}] for a {n_out}x{n_in} weight, got {rank}")
    work = _work_dtype(W)
    Wt = W.detach().to(work).t()  # (in, out)

    if method == "sketch":
        k = rank // 2
        U1 = sign_matrix(k, n_out, generator=generator, device=W.device, dtype=work)  # (k, out)
        U2 = sign_matrix(k, n_in, generator=generator, device=W.device, dtype=work).t()  # (in, k)
        A = torch.cat([Wt @ U1.t(), U2], dim=1)
        B = torch.cat([U1, U2.t() @ Wt], dim=0) / 2
    elif method == "svd":
        U, S, Vh = torch.linalg.svd(Wt, full_matrices=False)
        A, B = _split(U[:, :rank], S[:rank], Vh[:rank])
    elif method == "rsvd":
        A, B = _split(*randomized_svd(Wt, rank, generator=generator))
    else:
        if activations is None:
            raise ValueError("method='data-aware' needs activations: a (T, in) tensor of the layer's inputs")
        check_tensor("activations", activations)
        if activations.shape[-1] != n_in:
            raise ValueError(f"activations must have last dim in = {n_in}, got shape {tuple(activations.shape)}")
        if activations.numel() == 0:
            raise ValueError(f"activations must hold at least one row, got shape {tuple(activations.shape)}")
        X = activations.detach().reshape(-1, n_in).to(device=W.device, dtype=work)
        # ‖X·v‖ = ‖R·v‖ with R = Λ^½·Eᵀ from the eigendecomposition XᵀX = E·Λ·Eᵀ.
        evals, E = torch.linalg.eigh(X.t() @ X / X.shape[0])
        evals = evals.clamp_min(0) + damping * evals.clamp_min(0).mean().clamp_min(torch.finfo(work).tiny)
        root = evals.sqrt()
        U, S, Vh = torch.linalg.svd(root[:, None] * (E.t() @ Wt), full_matrices=False)
        A, B = _split(U[:, :rank], S[:rank], Vh[:rank])
        A = E @ (A / root[:, None])
    return A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous()
