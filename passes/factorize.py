"""Low-rank factors of a trained weight, computed once at compile time.

A dense weight W (out × in, as ``nn.Linear`` stores it; a conv kernel is flattened to
out × in·kh·kw) is replaced by A (in × r) and B (r × out) with x·Wᵀ ≈ (x·A)·B:

* ``"svd"``: the exact truncated SVD Wᵀ ≈ U_r·S_r·V_rᵀ split as A = U_r·√S_r, B = √S_r·V_rᵀ (the
  best rank-r approximation of the weight in Frobenius and spectral norm);
* ``"rsvd"``: the randomized SVD (Halko–Martinsson–Tropp), near-optimal and cheaper on large weights;
* ``"data-aware"``: the best rank-r approximation in the metric of the recorded activations
  (whitened by their second moment, see :mod:`.calibrate`);
* ``"sketch"``: the unbiased two-sided sign sketch of ``pr.nn.SKLinear``, drawn from a seed.

All come from :func:`panther.linalg.lowrank`; this module adds the rank rules (spectrum,
error for a rank, rank for an error) and the per-weight cache.

The relative weight error ‖Wᵀ − A·B‖_F / ‖W‖_F is returned with the factors: it is the
report's predicted relative output error for inputs that are not aligned with W's spectrum.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .stamp import weight_stamp

__all__ = ["singular_values", "tail_error", "rank_for_error", "lowrank_factors", "weight_error", "cached_factors"]

# id(weight) -> {(weight_stamp(weight), *key): factors}; an entry goes when its weight is freed.
_CACHE: dict[int, dict[tuple, Any]] = {}

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
    W: Tensor,
    rank: int,
    *,
    method: str = "svd",
    num_terms: int = 1,
    seed: int = 0,
    activations: Tensor | None = None,
    damping: float = 1e-2,
) -> tuple[Tensor, Tensor, float]:
    """Factors (A: in×r, B: r×out) with x·Wᵀ ≈ (x·A)·B, and the relative weight error.

    The factors come from :func:`panther.linalg.lowrank`; the sketch's rank is rounded down to an
    even number (``num_terms`` only set the rank: one term of ``k = r/2`` is drawn).

    Args:
        W: (out, in) weight; any float dtype; factors come back in W's dtype and device.
        rank: r.
        method: ``"svd"``, ``"rsvd"``, ``"data-aware"`` or ``"sketch"``.
        num_terms: L of the sketch (the rank is 2·L·k either way).
        seed: seed of the random draws (a private generator; the global RNG is untouched).
        activations: rows whose second moment defines the data-aware metric (e.g.
            :func:`.calibrate.gram_root`); required for ``"data-aware"``.
        damping: the data-aware ridge (:func:`.calibrate.data_aware_damping`).
    """
    from panther.linalg import lowrank

    W = W.detach()
    n_out, n_in = W.shape
    gen = torch.Generator(device=W.device).manual_seed(seed)
    if method in ("svd", "rsvd", "data-aware"):
        rank = min(rank, n_in, n_out)
        if method == "data-aware":
            A, B = lowrank(W, rank, method, activations=activations, damping=damping)
        else:
            A, B = lowrank(W, rank, method, generator=gen)
    elif method == "sketch":
        A, B = lowrank(W, max(2, rank - rank % 2), "sketch", generator=gen)
    else:
        raise ValueError(f"method must be one of ['svd', 'rsvd', 'data-aware', 'sketch'], got {method!r}")
    return A.contiguous(), B.contiguous(), weight_error(W, A, B)


def weight_error(W: Tensor, A: Tensor, B: Tensor) -> float:
    """Relative Frobenius error ‖Wᵀ − A·B‖ / ‖W‖ of factors of the (out, in) weight W."""
    Wt = W.detach().to(_work_dtype(W)).t()
    norm = float(Wt.norm())
    return float((Wt - A.to(Wt.dtype) @ B.to(Wt.dtype)).norm()) / norm if norm > 0 else 0.0


def cached_factors(weight: Tensor, key: tuple, compute: Callable[[], Any], valid: Callable[[Any], bool] | None = None) -> Any:
    """``compute()``, cached per weight tensor, its in-place version and ``key``.

    Dynamo compiles a graph again for new sizes (the second compile is dynamic), and each compile
    would factorize every weight anew; with the cache, a weight is factorized once per version.
    A cached value that ``valid`` rejects (e.g. calibrated factors that miss the tolerance on this
    compile's activations) is computed again and replaces the entry.
    """
    if id(weight) not in _CACHE:
        _CACHE[id(weight)] = {}
        weakref.finalize(weight, _CACHE.pop, id(weight), None)
    per_weight = _CACHE[id(weight)]
    stamp = weight_stamp(weight)
    full = (stamp, *key)
    if full in per_weight and valid is not None and not valid(per_weight[full]):
        del per_weight[full]
    if full not in per_weight:
        if any(k[0] != stamp for k in per_weight):
            per_weight.clear()  # factors of an older version (or of swapped-out data) are stale
        per_weight[full] = compute()
    return per_weight[full]


def candidate_factors(ctx, cand, weight: Tensor | None, dense: Callable[[], Tensor], key: tuple) -> tuple[Tensor, Tensor, float]:
    """(A, B, predicted error) of ``cand`` at ``cand.rank`` by ``cand.method``, cached per weight.

    Shared by the linear and conv passes: ``dense()`` gives the (out, in) matrix to factorize
    (called only on a cache miss), ``key`` what distinguishes this candidate's factors of the
    same weight (kind, slice, layout); data-aware uses the activations recorded by calibration.
    """
    opts = ctx.options
    owner = ctx.inputs.example_inputs[cand.weight_index] if weight is None else weight
    seed = ctx.seed_for(cand)
    # Data-aware factors fit this call site's activations: a weight shared by two call sites
    # (tied weights) gets one set per site.
    site = cand.name if "root" in cand.stats else None
    return cached_factors(
        owner, (*key, cand.rank, cand.method, opts.num_terms, seed, site),
        lambda: lowrank_factors(
            dense(), cand.rank, method=cand.method, num_terms=opts.num_terms, seed=seed,
            activations=cand.stats.get("root"), damping=cand.stats.get("damping", 0.0),
        ),
    )


def _work_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32
