"""Tests for ``panther.sketch``.

The statistical tests draw from fixed seeds, so they are deterministic, but every bound is
derived from the variance of the statistic it checks (the derivation sits beside it) with a
margin of about six standard deviations: a correct sketch passes with overwhelming probability,
while a wrong scale, a bias or a non-uniform sampler fails.
"""

from __future__ import annotations

import doctest
import itertools
import math

import pytest
import torch

import panther.sketch as sk
from panther.sketch import (
    SJLT,
    SRHT,
    CountSketch,
    GaussianSketch,
    SignSketch,
    count_sketch,
    fwht,
    gaussian_matrix,
    sign_matrix,
    sjlt,
    srht,
)
from panther_testing import RTOL, assert_close

F64 = torch.float64

# name -> factory(k, n, **rng) building one sketch; SJLT with s=2 uses the Floyd sampler, s=4
# with k=4 the argsort one (s² > k·bit_length(k)).
FACTORIES = {
    "sign": lambda k, n, **kw: SignSketch(k, n, dtype=F64, **kw),
    "gaussian": lambda k, n, **kw: GaussianSketch(k, n, dtype=F64, **kw),
    "srht": lambda k, n, **kw: SRHT(k, n, **kw),
    "count": lambda k, n, **kw: CountSketch(k, n, **kw),
    "sjlt_s2": lambda k, n, **kw: SJLT(k, n, 2, **kw),
    "sjlt_s4": lambda k, n, **kw: SJLT(k, n, 4, **kw),
}
NAMES = list(FACTORIES)


def _draws(name: str, k: int, n: int, num: int, generator: torch.Generator) -> torch.Tensor:
    """(num, k, n) float64 independent sketch matrices."""
    if name == "sign_matrix":
        return sign_matrix(k, n, num=num, generator=generator, dtype=F64)
    if name == "gaussian_matrix":
        return gaussian_matrix(k, n, num=num, generator=generator, dtype=F64)
    return torch.stack([FACTORIES[name](k, n, generator=generator).matrix(dtype=F64) for _ in range(num)])


def _sylvester(m: int) -> torch.Tensor:
    """The ±1 Sylvester–Hadamard matrix H_m, built by its definition."""
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


# ---------------------------------------------------------------------------------------------
# Defining properties, statistically
# ---------------------------------------------------------------------------------------------

GRAM_DRAWS = 2000
GRAM_K = 4


@pytest.mark.parametrize("n", [6, 8], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("name", NAMES + ["sign_matrix", "gaussian_matrix"])
def test_expected_gram_is_identity(name, n):
    # Each entry of G = SᵀS has variance at most v/k over the draw of S:
    #  * off-diagonal, every sketch: (SᵀS)ᵢⱼ is a sum of sign-symmetric terms whose squares add
    #    up to 1/k in expectation (sign/Gaussian: k terms of variance 1/k²; count/SJLT: a
    #    collision of two columns' s entries has probability 1/k per pair, value ±1/s; SRHT:
    #    k of the m rows of H without replacement, variance (m-k)/(k(m-1)) <= 1/k);
    #  * diagonal: exactly 1 except for the Gaussian, where Σᵣ gᵣ²/k has variance 2/k.
    # The mean of D draws has entry std <= sqrt(v/(k·D)); we allow 6 std on the largest entry,
    # and 4x the expected squared Frobenius distance Σ var/D (a χ² with >= 15 d.o.f. exceeds
    # 4x its mean with probability < 1e-6). Both shrink like 1/sqrt(D) and 1/D.
    k, D = GRAM_K, GRAM_DRAWS
    g = torch.Generator().manual_seed(1234)
    S = _draws(name, k, n, D, g)
    err = (S.mT @ S).mean(dim=0) - torch.eye(n, dtype=F64)
    gaussian = name.startswith("gaussian")
    v = 2.0 if gaussian else 1.0
    max_bound = 6 * math.sqrt(v / (k * D))
    fro2_expected = (n * (n - 1) + (2 * n if gaussian else 0)) / (k * D)
    assert err.abs().max() <= max_bound, f"max |E[SᵀS] - I| = {err.abs().max():.4f} > {max_bound:.4f}"
    fro2 = (err**2).sum()
    assert fro2 <= 4 * fro2_expected, f"‖E[SᵀS] - I‖²_F = {fro2:.2e} > 4·{fro2_expected:.2e}"
    if not gaussian:  # unit-norm columns: the diagonal is 1 in every single draw
        assert (S.square().sum(dim=1) - 1).abs().max() <= 1e-12


NORM_DRAWS = 200
NORM_N = 300  # not a power of two: SRHT pads to 512


def _test_vectors(n: int) -> torch.Tensor:
    """(n, 6) float64 columns: dense, spiky, flat, sparse and heavy-tailed."""
    g = torch.Generator().manual_seed(99)
    X = torch.zeros(n, 6, dtype=F64)
    X[:, 0] = torch.randn(n, generator=g, dtype=F64)
    X[0, 1] = 1.0
    X[:, 2] = 1.0
    X[:10, 3] = torch.randn(10, generator=g, dtype=F64)
    X[:, 4] = torch.empty(n, dtype=F64).cauchy_(generator=g)
    X[:, 5] = torch.arange(n, dtype=F64) ** 2
    return X


@pytest.mark.parametrize("k", [16, 128], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("name", NAMES)
def test_norm_preservation(name, k):
    # r = ‖Sx‖²/‖x‖² has E[r] = 1 (from E[SᵀS] = I) and Var[r] <= 2/k for every sketch here
    # (sign, count, SJLT: (2/k)(1 - ‖x‖₄⁴/‖x‖⁴); SRHT: that times (m-k)/(m-1); Gaussian: 2/k).
    # Mean over T draws: |mean - 1| <= 6·sqrt(2/(kT)). Sample variance over T draws: at most
    # 1.5·(2/k); its relative standard error is sqrt((kurtosis-1)/T) <= 0.14 for kurtosis <= 5,
    # so 1.5 is over 3.5 standard errors above the worst true value. Both bounds tighten as k
    # grows: that is the concentration.
    X = _test_vectors(NORM_N)
    T = NORM_DRAWS
    g = torch.Generator().manual_seed(4321)
    if name in ("sign", "gaussian"):  # one batched draw; apply() of these is checked elsewhere
        SX = _draws(f"{name}_matrix", k, NORM_N, T, g) @ X
    else:
        SX = torch.stack([FACTORIES[name](k, NORM_N, generator=g).apply(X, dim=0) for _ in range(T)])
    ratios = SX.square().sum(dim=1) / X.square().sum(dim=0)
    mean_dev = (ratios.mean(dim=0) - 1).abs().max()
    assert mean_dev <= 6 * math.sqrt(2 / (k * T)), f"|E‖Sx‖²/‖x‖² - 1| = {mean_dev:.4f}"
    var = ratios.var(dim=0).max()
    assert var <= 1.5 * 2 / k, f"Var ‖Sx‖²/‖x‖² = {var:.2e} > 1.5·2/k = {3 / k:.2e}"


@pytest.mark.parametrize("s", [1, 2, 5], ids=lambda s: f"s{s}")
def test_sjlt_supports_are_uniform_subsets(s):
    # Each column's support must be a uniform s-subset of range(k). With N = D·n columns, the
    # count of each of the C(k, s) subsets is Binomial(N, p), p = 1/C(k, s): allow 6 std.
    # k=6: s=1 and s=2 use the Floyd sampler, s=5 the argsort one.
    k, n, D = 6, 50, 200
    g = torch.Generator().manual_seed(5)
    subsets = list(itertools.combinations(range(k), s))
    index = {sub: i for i, sub in enumerate(subsets)}
    counts = torch.zeros(len(subsets))
    for _ in range(D):
        support = SJLT(k, n, s, generator=g).matrix() != 0
        for col in support.T:
            counts[index[tuple(col.nonzero().flatten().tolist())]] += 1
    N, p = D * n, 1 / len(subsets)
    dev = (counts - N * p).abs().max()
    assert dev <= 6 * math.sqrt(N * p * (1 - p)), f"subset counts {counts.tolist()} far from {N * p}"


def test_srht_rows_are_uniform_without_replacement():
    # P keeps k of the m rows uniformly without replacement: each row is kept with probability
    # k/m, so over D draws its count is Binomial(D, k/m): allow 6 std. (Random signs alone make
    # E[SᵀS] = I, so this is checked on the sampled rows themselves.)
    k, n, D = 5, 12, 2000
    g = torch.Generator().manual_seed(6)
    counts = torch.zeros(16)
    for _ in range(D):
        rows = SRHT(k, n, generator=g)._rows
        assert rows.unique().numel() == k and torch.equal(rows, rows.sort().values)
        counts[rows] += 1
    p = k / 16
    assert (counts - D * p).abs().max() <= 6 * math.sqrt(D * p * (1 - p)), counts.tolist()


def test_structure_of_each_sketch():
    k, n = 8, 20
    inv = 1 / math.sqrt(k)
    signs = (SignSketch(k, n, seed=0, dtype=F64).matrix(), sign_matrix(k, n, seed=0, dtype=F64))
    for S in (*signs, SRHT(k, n, seed=0).matrix(dtype=F64)):
        assert torch.allclose(S.abs(), torch.full_like(S, inv), rtol=0, atol=1e-15)
    C = CountSketch(k, n, seed=0).matrix(dtype=F64)
    assert ((C != 0).sum(dim=0) == 1).all() and (C.abs().sum(dim=0) == 1).all()
    for s in (1, 3, 8):
        J = SJLT(k, n, s, seed=0).matrix(dtype=F64)
        assert ((J != 0).sum(dim=0) == s).all()
        assert torch.allclose(J[J != 0].abs(), torch.full((n * s,), 1 / math.sqrt(s), dtype=F64), rtol=0, atol=1e-15)
    # SRHT samples distinct rows of H: with n = m, S Sᵀ = (1/k)·P H Hᵀ Pᵀ = (m/k)·I_k exactly.
    S = SRHT(k, 32, seed=0).matrix(dtype=F64)
    assert_close(S @ S.T, (32 / k) * torch.eye(k, dtype=F64))
    # the leading batch of sign_matrix / gaussian_matrix: independent matrices
    for U in (sign_matrix(k, n, num=3, seed=0), gaussian_matrix(k, n, num=3, seed=0)):
        assert U.shape == (3, k, n) and U.dtype == torch.get_default_dtype()
        assert not torch.equal(U[0], U[1]) and not torch.equal(U[1], U[2])


# ---------------------------------------------------------------------------------------------
# apply() against matrix(), dtypes, devices, autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
@pytest.mark.parametrize("name", NAMES)
def test_apply_matches_matrix(name, dim, device, poison):
    x = torch.randn(5, 6, 7, dtype=F64, device=device)  # 5, 6, 7: SRHT pads each to 8
    n = x.shape[dim]
    S = FACTORIES[name](4, n, seed=11, device=device)
    M = S.matrix(dtype=F64)
    assert M.shape == (4, n) and M.device == x.device
    expected = torch.tensordot(M, x, dims=([1], [dim])).movedim(0, dim)
    got = S.apply(x, dim)
    assert got.dtype == F64 and got.device == x.device
    assert_close(got, expected, name=f"{name} dim={dim}")
    assert torch.equal(S(x, dim=dim), got)  # __call__ is apply, and apply is deterministic
    # float32 input: computed in float32, within float32 accuracy of the float64 result
    got32 = S.apply(x.float(), dim)
    assert got32.dtype == torch.float32
    assert_close(got32, expected, rtol=RTOL[torch.float32])


@pytest.mark.parametrize("name", NAMES)
def test_apply_vector_and_4d_batch(name):
    S = FACTORIES[name](4, 9, seed=2)
    M = S.matrix(dtype=F64)
    v = torch.randn(9, dtype=F64)
    assert_close(S.apply(v), M @ v)
    x = torch.randn(2, 3, 9, 5, dtype=F64)
    assert_close(S.apply(x, dim=2), torch.einsum("kn,abnc->abkc", M, x))


@pytest.mark.parametrize("name", NAMES)
def test_apply_is_differentiable(name):
    S = FACTORIES[name](4, 6, seed=3)
    x = torch.randn(3, 6, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: S.apply(t, dim=1), (x,))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_functional_forms_match_classes(dim):
    x = torch.randn(6, 10, 12, dtype=F64)
    n = x.shape[dim]
    assert torch.equal(srht(x, 4, dim, seed=8), SRHT(4, n, seed=8).apply(x, dim))
    assert torch.equal(count_sketch(x, 4, dim, seed=8), CountSketch(4, n, seed=8).apply(x, dim))
    assert torch.equal(sjlt(x, 4, 3, dim, seed=8), SJLT(4, n, 3, seed=8).apply(x, dim))
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert torch.equal(srht(x, 4, dim, generator=g1), SRHT(4, n, generator=g2).apply(x, dim))
    assert torch.equal(sign_matrix(4, n, seed=8), SignSketch(4, n, seed=8).matrix())
    assert torch.equal(gaussian_matrix(4, n, seed=8), GaussianSketch(4, n, seed=8).matrix())


def test_sign_matrix_bits_do_not_depend_on_dtype():
    a = sign_matrix(5, 7, num=2, seed=4, dtype=torch.float32)
    b = sign_matrix(5, 7, num=2, seed=4, dtype=F64)
    assert torch.equal(a.sign(), b.sign().float())
    bits = torch.randint(0, 2, (2, 5, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(b.sign(), bits.to(F64) * 2 - 1)


# ---------------------------------------------------------------------------------------------
# Walsh–Hadamard transform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 8, 64])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_fwht_matches_sylvester_matrix(m, dim):
    shape = [3, 4, 5]
    shape[dim] = m
    x = torch.randn(*shape, dtype=F64)
    H = _sylvester(m)
    expected = torch.tensordot(H, x, dims=([1], [dim])).movedim(0, dim)
    assert_close(fwht(x, dim), expected)
    assert_close(fwht(fwht(x, dim), dim), m * x)  # H² = m·I
    assert fwht(x.float(), dim).dtype == torch.float32


def test_fwht_is_differentiable():
    x = torch.randn(3, 16, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fwht, (x,))


# ---------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_seed_and_generator_reproduce(name):
    k, n = 4, 50
    make = FACTORIES[name]
    a = make(k, n, seed=7).matrix()
    assert torch.equal(a, make(k, n, seed=7).matrix())
    assert torch.equal(a, make(k, n, generator=torch.Generator().manual_seed(7)).matrix())
    assert not torch.equal(a, make(k, n, seed=8).matrix())
    g = torch.Generator().manual_seed(7)
    first, second = make(k, n, generator=g).matrix(), make(k, n, generator=g).matrix()
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances


@pytest.mark.parametrize("name", NAMES + ["sign_matrix", "gaussian_matrix"])
def test_generator_and_seed_leave_global_rng_alone(name):
    state = torch.get_rng_state()
    _draws(name, 4, 12, 3, torch.Generator().manual_seed(1))
    if name in FACTORIES:
        S = FACTORIES[name](4, 12, seed=1)
        S.apply(torch.randn(2, 12, generator=torch.Generator().manual_seed(0)))
    else:
        (sign_matrix if name == "sign_matrix" else gaussian_matrix)(4, 12, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    srht(torch.ones(3, 12), 4, seed=1)
    count_sketch(torch.ones(3, 12), 4, generator=torch.Generator())
    sjlt(torch.ones(3, 12), 4, 2, seed=1)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", NAMES + ["sign_matrix", "gaussian_matrix"])
def test_default_draws_from_global_rng(name, device):
    def draw():
        if name == "sign_matrix":
            return sign_matrix(4, 12, device=device)
        if name == "gaussian_matrix":
            return gaussian_matrix(4, 12, device=device)
        return FACTORIES[name](4, 12, device=device).matrix()

    get_state = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state
    torch.manual_seed(3)
    before = get_state()
    a = draw()
    assert not torch.equal(before, get_state()), "the default path must draw from the global RNG"
    b = draw()
    torch.manual_seed(3)
    assert torch.equal(a, draw()) and not torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sketch_is_the_same_on_every_device(name, device):
    a = FACTORIES[name](4, 30, seed=21, device=device).matrix(device="cpu")
    assert torch.equal(a, FACTORIES[name](4, 30, seed=21).matrix())


# ---------------------------------------------------------------------------------------------
# Validation: raised before any random draw, with a message naming parameter and value
# ---------------------------------------------------------------------------------------------

X = torch.randn(3, 5)
S5 = SRHT(4, 5, seed=0)

BAD_CALLS = [
    ("k zero", lambda: SignSketch(0, 5), ValueError, r"k must be a positive integer, got 0"),
    ("k float", lambda: GaussianSketch(2.0, 5), TypeError, r"k must be an int, got float"),
    ("k bool", lambda: sign_matrix(True, 5), TypeError, r"k must be an int, got bool"),
    ("n negative", lambda: SRHT(4, -1), ValueError, r"n must be a positive integer, got -1"),
    ("s zero", lambda: SJLT(4, 10, 0), ValueError, r"s must be a positive integer, got 0"),
    ("s above k", lambda: SJLT(4, 10, 5), ValueError, r"s must be <= k=4 .*got s=5"),
    ("srht k above m", lambda: SRHT(9, 8),
     ValueError, r"k must be <= 8 for SRHT with n=8 .*got k=9"),
    ("num zero", lambda: sign_matrix(2, 3, num=0),
     ValueError, r"num must be a positive integer, got 0"),
    ("seed negative", lambda: sign_matrix(2, 3, seed=-1),
     ValueError, r"seed must be an integer >= 0, got -1"),
    ("seed too large", lambda: sign_matrix(2, 3, seed=2**70),
     ValueError, r"seed must be below 2\*\*64, got 1180591620717411303424"),
    ("seed float", lambda: CountSketch(2, 3, seed=1.5),
     TypeError, r"seed must be an int, got float"),
    ("seed and generator", lambda: SJLT(2, 3, 1, seed=1, generator=torch.Generator()),
     ValueError, r"either generator or seed, not both"),
    ("generator type", lambda: gaussian_matrix(2, 3, generator=5),
     TypeError, r"generator must be a torch.Generator, got int"),
    ("dtype int", lambda: gaussian_matrix(2, 3, dtype=torch.int64),
     TypeError, r"dtype must be a floating-point torch.dtype.*torch.int64"),
    ("matrix dtype", lambda: S5.matrix(dtype=torch.int32),
     TypeError, r"dtype must be a floating-point torch.dtype.*torch.int32"),
    ("x not tensor", lambda: S5.apply([1.0] * 5), TypeError, r"x must be a torch.Tensor, got list"),
    ("x integer", lambda: S5.apply(torch.arange(5)),
     TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
    ("x 0-d", lambda: S5.apply(torch.tensor(1.0)), ValueError, r"x must have at least 1 dimension"),
    ("dim out of range", lambda: S5.apply(X, dim=2),
     IndexError, r"dim must be in \[-2, 1\] for a 2-D input, got 2"),
    ("dim negative out of range", lambda: S5.apply(X, dim=-3),
     IndexError, r"dim must be in \[-2, 1\] for a 2-D input, got -3"),
    ("dim float", lambda: S5.apply(X, dim=1.0), TypeError, r"dim must be an int, got float"),
    ("x wrong size", lambda: S5.apply(X, dim=0),
     ValueError, r"x has size 3 along dim 0 \(shape \(3, 5\)\), but the sketch expects n=5"),
    ("srht k zero", lambda: srht(X, 0), ValueError, r"k must be a positive integer, got 0"),
    ("srht k above m", lambda: srht(X, 9), ValueError, r"k must be <= 8 for SRHT with n=5"),
    ("empty dim", lambda: srht(torch.zeros(3, 0), 2),
     ValueError, r"nonzero size along dim 1.*\(3, 0\)"),
    ("count_sketch x integer", lambda: count_sketch(torch.ones(4, dtype=torch.int32), 2),
     TypeError, r"floating-point tensor, got dtype torch.int32"),
    ("count_sketch dim", lambda: count_sketch(X, 2, dim=5),
     IndexError, r"dim must be in \[-2, 1\]"),
    ("sjlt s above k", lambda: sjlt(X, 3, 4), ValueError, r"s must be <= k=3 .*got s=4"),
    ("fwht not power of two", lambda: fwht(torch.zeros(2, 6)),
     ValueError, r"power-of-two size along dim 1, got shape \(2, 6\)"),
    ("fwht integer", lambda: fwht(torch.ones(4, dtype=torch.int64)),
     TypeError, r"floating-point tensor"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_validation(call, exc, match):
    state = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        call()
    assert torch.equal(state, torch.get_rng_state()), "validation must fail before drawing"


def test_srht_accepts_k_up_to_padded_size():
    # k may exceed n up to the padded size m (sampling without replacement from m rows)
    assert SRHT(8, 5, seed=0).matrix().shape == (8, 5)


def test_repr():
    assert repr(SJLT(4, 10, 2, seed=0)) == "SJLT(k=4, n=10, s=2)"
    assert repr(SRHT(4, 10, seed=0)) == "SRHT(k=4, n=10, m=16)"
    assert repr(CountSketch(4, 10, seed=0)) == "CountSketch(k=4, n=10)"


def test_docstring_examples():
    result = doctest.testmod(sk, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
