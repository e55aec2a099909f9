"""Low-rank factors of a trained weight, computed once at compile time.

A dense weight W (out × in, as ``nn.Linear`` stores it; a conv kernel is flattened to
out × in·kh·kw) is replaced by A (in × r) and B (r × out) with x·Wᵀ ≈ (x·A)·B:

* ``"svd"``: the truncated SVD Wᵀ ≈ U_r·S_r·V_rᵀ split as A = U_r·√S_r, B = √S_r·V_rᵀ (the best
  rank-r approximation in Frobenius and spectral norm). ``torch.svd_lowrank`` stands in for
  the full SVD on large matrices.
* ``"sketch"``: the unbiased two-sided sign sketch of ``pr.nn.SKLinear`` with L terms of rank k,
  A = [Wᵀ·U1ᵢᵀ …, U2ᵢ …], B = [U1ᵢ; …; U2ᵢᵀ·Wᵀ; …]/(2L), the sign matrices drawn from a seed.

The relative weight error ‖Wᵀ − A·B‖_F / ‖W‖_F is returned with the factors: it is the
report's predicted relative output error for inputs that are not aligned with W's spectrum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["singular_values", "tail_error", "rank_for_error", "lowrank_factors"]

# Full SVD up to this smaller dimension; above it, a randomized SVD of the needed rank.
FULL_SVD_MAX_DIM = 1024


def singular_values(W: Tensor) -> Tensor:
    """Singular values of the 2-D weight, descending, in float32 or wider."""
    return torch.linalg.svdvals(W.detach().to(_work_dtype(W)))


def tail_error(sv: Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation: ‖σ_{>r}‖ / ‖σ‖."""
    total = float(sv.double().square().sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(float(sv[rank:].double().square().sum()), 0.0) / total)


def rank_for_error(sv: Tensor, max_error: float) -> int:
    """The smallest rank whose :func:`tail_error` is at most ``max_error``."""
    sq = sv.double().square()
    total = float(sq.sum())
    if total == 0.0:
        return 1
    # tail[r] = Σ_{i>=r} σ_i², for r = 0..n
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
    ok = (tail / total).sqrt() <= max_error
    return max(int(torch.nonzero(ok)[0]), 1)


def lowrank_factors(
    W: Tensor, rank: int, *, method: str = "svd", num_terms: int = 1, seed: int = 0
) -> tuple[Tensor, Tensor, float]:
    """Factors (A: in×r, B: r×out) with x·Wᵀ ≈ (x·A)·B, and the relative weight error.

    Args:
        W: (out, in) weight; any float dtype; factors come back in W's dtype and device.
        rank: r (for ``"sketch"``, rounded down to a multiple of 2·num_terms, at least 2·num_terms).
        method: ``"svd"`` or ``"sketch"``.
        num_terms: L of the sketch.
        seed: seed of the sketch's sign matrices (a private generator; global RNG untouched).
    """
    W = W.detach()
    Wt = W.to(_work_dtype(W)).t()  # (in, out)
    n_in, n_out = Wt.shape
    if method == "svd":
        r = min(rank, n_in, n_out)
        if min(n_in, n_out) <= FULL_SVD_MAX_DIM or 4 * r > min(n_in, n_out):
            U, S, Vh = torch.linalg.svd(Wt, full_matrices=False)
        else:
            gen_state = torch.random.fork_rng(devices=[Wt.device] if Wt.device.type == "cuda" else [])
            with gen_state:
                torch.manual_seed(seed)
                U, S, V = torch.svd_lowrank(Wt, q=min(r + 16, min(n_in, n_out)), niter=4)
            Vh = V.t()
        root = S[:r].sqrt()
        A = U[:, :r] * root
        B = root[:, None] * Vh[:r]
    elif method == "sketch":
        from panther.sketch import sign_matrix

        k = max(rank // (2 * num_terms), 1)
        U1 = sign_matrix(k, n_out, num=num_terms, seed=seed, device=Wt.device, dtype=Wt.dtype)  # (L, k, out)
        U2 = sign_matrix(k, n_in, num=num_terms, seed=seed + 1, device=Wt.device, dtype=Wt.dtype).transpose(1, 2)  # (L, in, k)
        S1 = torch.einsum("io,lko->lik", Wt, U1)  # Wᵀ·U1ᵢᵀ: (L, in, k)
        S2 = torch.einsum("lik,io->lko", U2, Wt)  # U2ᵢᵀ·Wᵀ: (L, k, out)
        A = torch.cat([S1.permute(1, 0, 2).reshape(n_in, -1), U2.permute(1, 0, 2).reshape(n_in, -1)], dim=1)
        B = torch.cat([U1.reshape(-1, n_out), S2.reshape(-1, n_out)], dim=0) / (2 * num_terms)
    else:
        raise ValueError(f"method must be one of ['svd', 'sketch'], got {method!r}")
    norm = float(Wt.norm())
    err = float((Wt - A @ B).norm()) / norm if norm > 0 else 0.0
    return A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous(), err


def _work_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32
