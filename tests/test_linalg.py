"""panther.linalg: randomized SVD and the low-rank factorization methods."""

from __future__ import annotations

import pytest
import torch

from panther.linalg import lowrank, randomized_svd
from panther_testing import assert_close

F64 = torch.float64


def decaying(m: int, n: int, decay: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with singular values decay**i and random singular vectors."""
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=F64)).Q
    s = decay ** torch.arange(min(m, n), dtype=F64)
    return U @ torch.diag(s) @ V.t(), s


@pytest.mark.parametrize("decay", [0.9, 0.97, 0.99])
@pytest.mark.parametrize("rank", [5, 20])
def test_randomized_svd_within_1p1_of_optimal(decay, rank):
    """Frobenius error of the randomized SVD is within 1.1x of the truncated SVD's (Eckart–Young)."""
    g = torch.Generator().manual_seed(rank)
    M, s = decaying(200, 150, decay, g)
    U, S, Vh = randomized_svd(M, rank, generator=g)
    err = (M - U @ torch.diag(S) @ Vh).norm()
    optimal = s[rank:].norm()
    assert err <= 1.1 * optimal, (float(err), float(optimal))
    assert_close(U.t() @ U, torch.eye(rank, dtype=F64), rtol=1e-8)


def test_randomized_svd_exact_on_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(60, 8, generator=g, dtype=F64) @ torch.randn(8, 40, generator=g, dtype=F64)
    U, S, Vh = randomized_svd(M, 8, generator=g)
    assert_close(U @ torch.diag(S) @ Vh, M)
    assert_close(S, torch.linalg.svdvals(M)[:8])


def test_randomized_svd_power_iterations_help():
    g = torch.Generator().manual_seed(1)
    M, s = decaying(300, 300, 0.995, g)
    errs = [float((M - (lambda u, s_, v: u @ torch.diag(s_) @ v)(*randomized_svd(M, 10, n_iter=q, generator=torch.Generator().manual_seed(2)))).norm()) for q in (0, 3)]
    assert errs[1] < errs[0]


def test_lowrank_methods_give_factors_of_the_weight():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(30, 12, generator=g, dtype=F64) @ torch.randn(12, 50, generator=g, dtype=F64)
    x = torch.randn(7, 50, generator=g, dtype=F64)
    for method in ("svd", "rsvd"):
        A, B = lowrank(W, 12, method, generator=g)
        assert A.shape == (50, 12) and B.shape == (12, 30)
        assert_close(x @ A @ B, x @ W.t(), rtol=1e-8, name=method)
    X = torch.randn(100, 50, generator=g, dtype=F64)
    A, B = lowrank(W, 12, "data-aware", activations=X)
    assert_close(x @ A @ B, x @ W.t(), rtol=1e-6, name="data-aware")


def test_sketch_method_is_unbiased():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(20, 30, generator=g, dtype=F64)
    x = torch.randn(3, 30, generator=g, dtype=F64)
    n = 500
    draws = [x @ (lambda A, B: A @ B)(*lowrank(W, 8, "sketch", generator=g)) for _ in range(n + 10)]
    ref = x @ W.t()
    mean = sum(draws[:n]) / n
    one = sum((d - ref).norm() for d in draws[n:]) / 10  # typical error of a single draw
    # The mean of n independent unbiased draws has ~1/√n of one draw's error; bias would not shrink.
    assert (mean - ref).norm() < 2.5 * one / n**0.5


def test_data_aware_beats_rsvd_on_correlated_activations():
    """Output error ‖X·Wᵀ − X·A·B‖ is lower for data-aware than for rsvd at equal rank."""
    g = torch.Generator().manual_seed(5)
    n_in, n_out, rank = 64, 48, 8
    W = torch.randn(n_out, n_in, generator=g, dtype=F64)
    # Correlated activations: most energy in a few input directions.
    mix = torch.randn(n_in, n_in, generator=g, dtype=F64) * (0.7 ** torch.arange(n_in, dtype=F64))
    X = torch.randn(2000, n_in, generator=g, dtype=F64) @ mix.t()
    Xtest = torch.randn(500, n_in, generator=g, dtype=F64) @ mix.t()
    err = {}
    for method in ("rsvd", "data-aware"):
        A, B = lowrank(W, rank, method, activations=X, generator=g)
        err[method] = float((Xtest @ W.t() - Xtest @ A @ B).norm() / (Xtest @ W.t()).norm())
    assert err["data-aware"] < 0.5 * err["rsvd"], err


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.randn(4, 5), 0), {}, ValueError, "rank must be a positive integer, got 0"),
        ((torch.randn(4, 5), 5), {}, ValueError, r"rank must be in \[1, min\(out, in\)\] = \[1, 4\]"),
        ((torch.randn(4, 5), 2, "qr"), {}, ValueError, r"method must be one of \['sketch', 'svd', 'rsvd', 'data-aware'\], got 'qr'"),
        ((torch.randn(4, 5), 3, "sketch"), {}, ValueError, "even integer >= 2 for method='sketch'"),
        ((torch.randn(4, 5), 2, "data-aware"), {}, ValueError, "needs activations"),
        ((torch.randn(4, 5), 2, "data-aware", torch.randn(3, 4)), {}, ValueError, "activations must have last dim in = 5"),
        ((torch.randn(4), 2), {}, ValueError, "W must be a 2-D matrix"),
        ((torch.ones(4, 5, dtype=torch.int64), 2), {}, TypeError, "W must be a floating-point tensor"),
        ((torch.randn(0, 5), 2, "sketch"), {}, ValueError, r"W must have at least one row and one column, got shape \(0, 5\)"),
        ((torch.randn(4, 5), 2, "data-aware", torch.randn(0, 5)), {}, ValueError, "activations must hold at least one row"),
        ((torch.randn(4, 5), 2, "data-aware", torch.randn(3, 5)), {"damping": -1.0}, ValueError, r"damping must be in \[0.0, inf\), got -1.0"),
        ((torch.randn(4, 5), 2, "data-aware", torch.randn(3, 5)), {"damping": "x"}, TypeError, "damping must be a float"),
    ],
)
def test_lowrank_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lowrank(*args, **kwargs)


def test_randomized_svd_errors():
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\)\] = \[1, 3\]"):
        randomized_svd(torch.randn(3, 7), 4)
    with pytest.raises(ValueError, match="n_iter must be an integer >= 0, got -1"):
        randomized_svd(torch.randn(3, 7), 2, n_iter=-1)
