"""Calibration: record what each candidate sees on the example inputs, and pick ranks from it.

:func:`calibrate` (the ``calibrate`` pass) runs the dense graph once on the real example inputs
with an FX interpreter. For every candidate still pending it records:

* linear / conv: the second moment of the layer's input rows, ``G = Σ xᵀx`` over every row (a
  conv's rows are its image patches, in the order of the flattened kernel), the number of rows
  and ``‖y‖²`` of the dense output (bias included). That is all the output error of any
  factorization needs;
* attention: q, k, v (and the key-mask terms) and the dense output, to measure a Performer
  replacement on them.

It runs when a tolerance is in force or the method may be data-aware, and only on real
example inputs (``measure_error=True``).

Rank selection (:func:`choose_rank`): one factorization of the largest worthwhile rank ``R``,
then the exact relative output error of every prefix ``r <= R`` at once. With
``A`` (in×R), ``B`` (R×out), ``W`` the dense (out, in) weight and ``Wt = Wᵀ``::

    ‖X·Wt − X·A_r·B_r‖² = ‖X·Wt‖² − 2·Σ_{i<r} a_iᵀ·G·Wt·b_i + Σ_{i,j<r} (a_iᵀ·G·a_j)(b_i·b_jᵀ)

(cumulative sums over ``i``; exact for any factors whose columns / rows are ordered, as the
truncated SVD's, the randomized SVD's and the data-aware ones are). The chosen rank is the
smallest whose error is within the tolerance. The sketch is not a prefix family: its rank is
found by bisection over fresh seeded draws, each measured exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .kinds import kind_module
from .measure import CandidateProbe, _fenced, real_inputs

__all__ = [
    "calibrate",
    "needs_calibration",
    "choose_rank",
    "prefix_errors",
    "metric_error",
    "gram_root",
    "data_aware_damping",
    "RankChoice",
    "DATA_AWARE_DAMPING",
    "FEATURE_DOUBLINGS",
]

log = logging.getLogger("panther")

# Relative ridge added to the activations' second moment before whitening (data-aware), on top
# of in/rows (see data_aware_damping): the directions the example inputs never visit are then
# approximated as the plain SVD would, rather than dropped, so the factors generalize beyond
# the calibration batch and the error measured on it stays an honest estimate.
DATA_AWARE_DAMPING = 1e-2
# Attention under a tolerance: features tried are num_random_features·2^i, i = 0..FEATURE_DOUBLINGS.
FEATURE_DOUBLINGS = 3
# Rows of a conv's patch matrix formed at a time while accumulating its second moment.
_PATCH_BLOCK_ELEMENTS = 1 << 24


def needs_calibration(options, kind: str) -> bool:
    """Whether a candidate of ``kind`` needs recorded activations under ``options``."""
    if not options.measure_error:
        return False
    if options.effective_tolerance() is not None:
        return True
    return kind != "attention" and options.method in ("auto", "data-aware")


def calibrate(ctx) -> None:
    """The ``calibrate`` pass: record, on the example inputs, what each pending candidate sees."""
    cands = [c for c in ctx.candidates if c.decision == "pending" and needs_calibration(ctx.options, c.kind)]
    if not cands:
        return
    if not ctx.inputs.all_real():
        ctx.report.notes.append("example inputs are fake tensors: nothing was calibrated (no activations recorded)")
        return
    try:
        with _fenced(ctx.example_inputs):
            CandidateProbe(ctx.gm, cands, _record).run(*real_inputs(ctx.example_inputs))
    except Exception as e:  # calibrating is never a reason to fail the compile
        if ctx.options.strict:
            raise
        for c in cands:
            c.stats = {}
        ctx.report.notes.append(f"calibration on the example inputs failed ({type(e).__name__}: {e})")
        log.warning("panther: calibration failed: %s: %s", type(e).__name__, e)


def _record(cand: Any, values: dict[str, Any], out: Any) -> None:
    """Keep what calibration needs of one candidate's real inputs and dense output."""
    if cand.kind == "attention":
        cand.stats = {"values": {k: _clone(v) for k, v in values.items()}, "out": _clone(out)}
    else:
        cand.stats = _layer_stats(kind_module(cand.kind).activation_rows(cand, values), out)


def _clone(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def _layer_stats(rows, out: Tensor) -> dict[str, Any]:
    gram, total, n = None, None, 0
    for X in rows:
        X = X.detach().to(torch.float64)
        g, t = X.t() @ X, X.sum(0)
        gram = g if gram is None else gram + g
        total = t if total is None else total + t
        n += X.shape[0]
    return {"gram": gram, "sum": total, "rows": n, "out_sq": float(out.detach().to(torch.float64).square().sum())}


def patch_block(n_cols: int, rows_per_image: int) -> int:
    """Images per block so that a block of patches holds about ``_PATCH_BLOCK_ELEMENTS`` values."""
    return max(1, _PATCH_BLOCK_ELEMENTS // max(1, n_cols * rows_per_image))


# -- exact output errors of factors -------------------------------------------------------------


def prefix_errors(stats: dict[str, Any], W: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """Relative output error of ``x·A[:, :r]·B[:r]`` against ``x·Wᵀ`` for r = 1..R, on the recorded rows.

    The error is relative to the dense output (bias included), as the measured error is.

    Args:
        stats: a linear / conv candidate's recorded statistics (``gram``, ``out_sq``).
        W: (out, in) dense weight. A: (in, R). B: (R, out).

    Returns:
        float64 tensor of R errors.
    """
    G = stats["gram"]
    Wt = W.detach().to(G).t()  # (in, out)
    A, B = A.detach().to(G), B.detach().to(G)
    GW = G @ Wt  # (in, out)
    dense_sq = (Wt * GW).sum()
    cross = ((A.t() @ GW) * B).sum(1)  # a_iᵀ·G·Wᵀ·b_i
    M = (A.t() @ G @ A) * (B @ B.t())  # (a_iᵀ·G·a_j)(b_i·b_j)
    approx_sq = torch.cumsum(M.diagonal() + 2 * M.tril(-1).sum(1), 0)
    err_sq = (dense_sq - 2 * torch.cumsum(cross, 0) + approx_sq).clamp_min(0)
    out_sq = stats["out_sq"]
    if out_sq <= 0.0:
        return torch.where(err_sq > 0, torch.inf, 0.0).to(err_sq)
    return (err_sq / out_sq).sqrt()


def metric_error(stats: dict[str, Any], W: Tensor, A: Tensor, B: Tensor, bias: Tensor | None) -> float:
    """Relative output error of ``x·A·B`` against ``x·Wᵀ + bias`` over the recorded rows, from
    their kept summary: ``root`` (Rᵀ·R = the second moment per row) and ``mean`` (the mean row).

    Per row, ‖X·Wᵀ + 1·bᵀ‖² / rows = ‖R·Wᵀ‖² + 2·meanᵀ·Wᵀ·b + ‖b‖², so a weight (and bias) that
    changed after calibration is measured on the same activations without keeping them.
    """
    # The summary is kept in host memory; measure on the weight's device (two in×in×out products).
    R = stats["root"].to(W.device)
    mean = stats["mean"].to(R)
    Wt = W.detach().to(R).t()
    num_sq = (R @ (Wt - A.detach().to(R) @ B.detach().to(R))).square().sum()
    den_sq = (R @ Wt).square().sum()
    if bias is not None:
        b = bias.detach().to(R).reshape(-1)
        den_sq = den_sq + 2 * (mean @ Wt @ b) + b.square().sum()
    num_sq, den_sq = float(num_sq), float(den_sq)
    if den_sq <= 0.0:
        return math.inf if num_sq > 0 else 0.0
    return math.sqrt(num_sq / den_sq)


def data_aware_damping(stats: dict[str, Any]) -> float:
    """Ridge (relative to the mean eigenvalue) for whitening by the recorded second moment:
    ``DATA_AWARE_DAMPING + in / rows``. With fewer rows than input features the moment is
    singular and a factorization fit to it would match those rows, and only them; the ``in/rows``
    term then puts the average recorded eigenvalue on every direction (shrinkage toward the
    plain SVD), and vanishes as rows accumulate."""
    return DATA_AWARE_DAMPING + stats["gram"].shape[0] / max(stats["rows"], 1)


def gram_root(stats: dict[str, Any]) -> Tensor:
    """A square matrix ``R`` with ``Rᵀ·R`` = the recorded second moment (per row), as activations
    for :func:`panther.linalg.lowrank` (Cholesky, with a vanishing jitter for singular moments)."""
    G = stats["gram"] / max(stats["rows"], 1)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    scale = float(G.diagonal().mean()) or 1.0
    jitter = 1e-12 * scale
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(G + jitter * eye)
        if int(info) == 0:
            return L.t().contiguous()
        jitter *= 100
    evals, E = torch.linalg.eigh(G)
    return (evals.clamp_min(0).sqrt()[:, None] * E.t()).contiguous()


@dataclass
class RankChoice:
    """Outcome of :func:`choose_rank` for one weight.

    ``rank`` is None when no rank up to ``max_rank`` meets the tolerance. ``errors[r - 1]`` is
    the output error at rank r (for the sketch, only the ranks the bisection tried are known:
    ``tried`` maps them to their errors); ``svd_errors[r - 1]`` that of the truncated SVD.
    """

    method: str
    max_rank: int
    rank: int | None
    A: Tensor | None = None
    B: Tensor | None = None
    error: float | None = None
    errors: list[float] = field(default_factory=list)
    svd_errors: list[float] = field(default_factory=list)
    tried: dict[int, float] = field(default_factory=dict)

    @property
    def best_error(self) -> float:
        """The lowest error found (at the largest rank tried)."""
        vals = list(self.tried.values()) if self.tried else self.errors
        return min(vals) if vals else math.inf


def _factors(W: Tensor, rank: int, method: str, root: Tensor | None, seed: int, damping: float = 0.0) -> tuple[Tensor, Tensor]:
    from panther.linalg import lowrank

    gen = torch.Generator(device=W.device).manual_seed(seed)
    if method == "data-aware":
        return lowrank(W, rank, "data-aware", activations=root, damping=damping)
    return lowrank(W, rank, method, generator=gen)


def svd_errors(stats: dict[str, Any], W: Tensor, max_rank: int) -> list[float]:
    """Output errors of the truncated SVD at ranks 1..min(max_rank, min(W.shape))."""
    from panther.linalg import lowrank

    r = min(max_rank, *W.shape)
    A, B = lowrank(W.detach(), r, "svd")
    return prefix_errors(stats, W, A, B).tolist()


def choose_rank(
    W: Tensor, stats: dict[str, Any], method: str, tolerance: float, max_rank: int, seed: int, root: Tensor | None = None
) -> RankChoice:
    """The smallest rank ``r <= max_rank`` whose output error on the recorded rows is <= ``tolerance``.

    Args:
        W: (out, in) dense weight (a conv kernel flattened to out × in·kh·kw).
        stats: the candidate's recorded statistics.
        method: ``"data-aware"``, ``"svd"``, ``"rsvd"`` or ``"sketch"``.
        tolerance: largest relative output error.
        max_rank: the largest rank worth having (budget and cost model).
        seed: seed of the random methods.
        root: :func:`gram_root` of ``stats`` (data-aware), computed when not given.

    Returns:
        :class:`RankChoice` with the factors at the chosen rank (W's dtype), the error curves,
        or ``rank=None``.
    """
    W = W.detach()
    if method == "sketch":
        return _bisect_sketch(W, stats, tolerance, max_rank, seed)
    if method == "data-aware" and root is None:
        root = gram_root(stats)
    R = min(max_rank, *W.shape)
    A, B = _factors(W, R, method, root, seed, data_aware_damping(stats))
    errors = prefix_errors(stats, W, A, B)
    svd = errors.tolist() if method == "svd" else svd_errors(stats, W, R)
    ok = torch.nonzero(errors <= tolerance)
    choice = RankChoice(method, R, None, errors=errors.tolist(), svd_errors=svd)
    if len(ok):
        r = int(ok[0]) + 1
        choice.rank, choice.error = r, float(errors[r - 1])
        choice.A, choice.B = A[:, :r].contiguous(), B[:r].contiguous()
    return choice


def _bisect_sketch(W: Tensor, stats: dict[str, Any], tolerance: float, max_rank: int, seed: int) -> RankChoice:
    """Sketch ranks 2k: bisection on k (the sketch's error falls as 1/√k; each draw is measured)."""
    tried: dict[int, float] = {}
    made: dict[int, tuple[Tensor, Tensor]] = {}

    def err(k: int) -> float:
        A, B = _factors(W, 2 * k, "sketch", None, seed)
        made[k] = (A, B)
        tried[2 * k] = float(prefix_errors(stats, W, A, B)[-1])
        return tried[2 * k]

    K = max_rank // 2
    choice = RankChoice("sketch", 2 * K, None, tried=tried)
    if K < 1 or err(K) > tolerance:
        return choice
    lo, hi = 1, K
    while lo < hi:
        mid = (lo + hi) // 2
        if err(mid) <= tolerance:
            hi = mid
        else:
            lo = mid + 1
    if lo not in made:
        err(lo)
    choice.rank, choice.error = 2 * lo, tried[2 * lo]
    choice.A, choice.B = (t.contiguous() for t in made[lo])
    choice.svd_errors = svd_errors(stats, W, 2 * lo)
    return choice
