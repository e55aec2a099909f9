"""The Triton low-rank linear kernels against their reference (kernels/lowrank_linear/reference.py).

Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (the conftest sets it);
with CUDA the same tests run on the GPU. Small odd shapes, every dtype, forward and backward, both
forward paths, with and without split reductions; fresh allocations are poisoned with NaN, and the
reference runs in float64. The launchers are called directly: the ops pick Triton only on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from panther.kernels import _launch
from panther.kernels.lowrank_linear import reference as ref
from panther.kernels.lowrank_linear import triton as tk
from panther_testing import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (T, in, out, L, k): odd sizes, T = 1, one L·k over 16 (two rank tiles per pair).
CASES = [(1, 17, 33, 1, 3), (5, 33, 40, 2, 8), (37, 40, 17, 2, 3), (37, 17, 40, 1, 8)]


def _id(c):
    return "T{}_{}x{}_L{}_k{}".format(*c)


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Launch plans and tuned configs are cached per shape; the ``splits`` fixture changes how a
    shape is planned, so every test starts from empty caches."""
    tk._PLANS.clear()
    tk._TUNED.clear()
    yield
    tk._PLANS.clear()
    tk._TUNED.clear()


@pytest.fixture(params=["split", "whole"])
def splits(request, monkeypatch):
    """``split``: reductions split in slices of 16 (the atomic paths); ``whole``: the defaults."""
    if request.param == "split":
        monkeypatch.setattr(tk, "_K_GRANULE", 16)
        monkeypatch.setattr(tk, "_T_GRANULE", 16)
    return request.param


def _layer(case, dtype, bias=True, x_layout="contiguous"):
    T, n_in, n_out, L, k = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)

    if x_layout == "transposed":  # column-major (T, in): stride (1, T)
        x = rnd(n_in, T).t()
    elif x_layout == "strided":  # every other column of a wider matrix
        x = rnd(T, 2 * n_in)[:, ::2]
    else:
        x = rnd(T, n_in)
    S1s = rnd(L, n_in, k, scale=n_in**-0.5)
    S2s = rnd(L, k, n_out, scale=k**-0.5)
    U1s = rnd(L, k, n_out).sign() * k**-0.5
    U2s = rnd(L, n_in, k).sign() * k**-0.5
    b = rnd(n_out) if bias else None
    return x, S1s, S2s, U1s, U2s, b


def _f64(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sklinear_forward(case, path, dtype, splits, poison):
    i = CASES.index(case)
    args = _layer(case, dtype, bias=i % 2 == 0, x_layout=["contiguous", "transposed", "strided", "contiguous"][i])
    y = tk.sklinear_forward(*args, path=path)
    assert y.shape == (case[0], case[2]) and y.dtype == dtype
    assert_close(y, ref.sklinear_forward(*_f64(args)), name="y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sklinear_backward(case, dtype, splits, poison):
    i = CASES.index(case)
    x, S1s, S2s, U1s, U2s, _ = _layer(case, dtype, x_layout=["contiguous", "strided", "transposed", "contiguous"][i])
    g = torch.randn(case[0], case[2], device=DEV).to(dtype)
    if i == 3:
        g = g.t().contiguous().t()  # non-contiguous grad
    got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True)
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
    for name, a, w, like in zip(("dx", "dS1s", "dS2s", "db"), got, want, (x, S1s, S2s, g[0])):
        assert a.shape == like.shape and a.dtype == dtype, name
        assert_close(a, w, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("case", CASES[1:3], ids=_id)
def test_sklinear_forward_keeps_h(case, path, dtype, splits, poison):
    # want_h: the forward also returns h = x·[S1 U2] (T × 2Lk), from either path, split or not.
    args = _layer(case, dtype, x_layout="strided" if case == CASES[2] else "contiguous")
    y, h = tk.sklinear_forward(*args, want_h=True, path=path)
    y_ref, h_ref = ref.sklinear_forward(*_f64(args), want_h=True)
    assert h.shape == (case[0], 2 * case[3] * case[4]) and h.dtype == dtype and h.is_contiguous()
    assert_close(y, y_ref, name="y")
    assert_close(h, h_ref, name="h")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[1:3], ids=_id)
def test_backward_reads_the_saved_h(case, dtype, splits, poison):
    # Given h, the backward uses it (not a recomputed x·A): an h off by a known amount must move
    # dS2 / dB exactly as the reference says, and leave the other gradients alone.
    x, S1s, S2s, U1s, U2s, _ = _layer(case, dtype)
    T, n_in, n_out, L, k = case
    g = torch.randn(T, n_out, device=DEV).to(dtype)
    h = ref.sklinear_forward(x.double(), S1s.double(), S2s.double(), U1s.double(), U2s.double(), None, want_h=True)[1]
    h = (h + 0.5 * torch.randn_like(h)).to(dtype)
    got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True, h)
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True, h.double())
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)
    A = (torch.randn(n_in, 7, device=DEV) * n_in**-0.5).to(dtype)
    B = (torch.randn(7, n_out, device=DEV) * 7**-0.5).to(dtype)
    hA = (x.double() @ A.double() + 0.5 * torch.randn(T, 7, device=DEV, dtype=torch.float64)).to(dtype)
    got = tk.lowrank_backward(g, x, A, B, 0.5, True, True, True, True, hA)
    want = ref.lowrank_backward(*_f64([g, x, A, B]), 0.5, True, True, True, True, hA.double())
    for name, a, w in zip(("dx", "dA", "dB", "db"), got, want):
        assert_close(a, w, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_persistent_hq(case, dtype, splits, poison, monkeypatch):
    # The persistent h·B kernel (the tuner's choice at large ranks on the GPU; under the interpreter
    # the plans use _hq_kernel unless told): forward with and without h kept, and dx in the backward.
    # Tiles of 16 × 32 and rank slices of 16: several tiles per program, several slices per tile,
    # a slice across the boundary of the two factors (L·k = 24 in one case).
    monkeypatch.setattr(tk, "_hq_candidates", lambda M, rp, es: [tk._HqPCfg(16, 32, 16, 4, 1, 1)])
    args = _layer(case, dtype, x_layout="strided" if case[0] > 1 else "contiguous")
    y = tk.sklinear_forward(*args, path="split")
    y2, h = tk.sklinear_forward(*args, want_h=True, path="split")
    y_ref, h_ref = ref.sklinear_forward(*_f64(args), want_h=True)
    assert any(isinstance(p, tk._ForwardPlan) and p.hq.fn is tk._hq_persistent_kernel for p in tk._PLANS.values())
    assert_close(y, y_ref, name="y")
    assert_close(y2, y_ref, name="y (want_h)")
    assert_close(h, h_ref, name="h")
    g = torch.randn(case[0], case[2], device=DEV).to(dtype)
    got = tk.sklinear_backward(g, *args[:5], True, True, True, h)
    want = ref.sklinear_backward(*_f64([g, *args[:5]]), True, True, True, h.double())
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)


# (T, in, out, L, k) for the TMA h·B: out a multiple of 8 (16-byte rows), L·k a multiple of 16; T
# and out not multiples of the 16 × 32 interpreter tile (stores clipped at both edges), 3 rank
# slices per factor in one case.
TMA_CASES = [(70, 33, 40, 2, 8), (129, 24, 72, 1, 32), (65, 17, 8, 3, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", TMA_CASES, ids=_id)
def test_tma_hq(case, dtype, poison, monkeypatch):
    # _hq_tma_kernel (on the GPU the tuner's candidate for 16-bit h·B from T = 1024; forced here at
    # any T): both B factors through its one descriptor, in either order in memory; one factor
    # (lowrank); y and the kept h against float64.
    monkeypatch.setattr(tk, "_HQ_TMA_FORCE", True)
    monkeypatch.setattr(tk, "_num_sms", lambda device: 4)  # (row blocks fill the "GPU": x·A unsplit)
    i = TMA_CASES.index(case)
    x, S1s, S2s, U1s, U2s, b = _layer(case, dtype, bias=i != 1, x_layout="strided" if i == 2 else "contiguous")
    if i == 1:  # S2s below U1s in memory: the B descriptor's base is the second factor
        S2s, U1s = torch.stack([S2s, U1s]).unbind(0)
    args = (x, S1s, S2s, U1s, U2s, b)
    y, h = tk.sklinear_forward(*args, want_h=True, path="split")
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    assert plan.hq.fn is tk._hq_tma_kernel
    y_ref, h_ref = ref.sklinear_forward(*_f64(args), want_h=True)
    assert_close(y, y_ref, name="y")
    assert_close(h, h_ref, name="h")
    _, n_in, n_out, L, k = case
    A = (torch.randn(n_in, 2 * L * k, device=DEV) * n_in**-0.5).to(dtype)
    B = (torch.randn(2 * L * k, n_out, device=DEV) * (L * k) ** -0.5).to(dtype)
    y = tk.lowrank_forward(x, A, B, b, 0.5, path="split")
    plans = [p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan) and p is not plan]
    assert any(p.hq.fn is tk._hq_tma_kernel for p in plans)
    assert_close(y, ref.lowrank_forward(*_f64([x, A, B, b]), 0.5), name="y (lowrank)")


def test_tma_hq_falls_back_in_the_kernel(poison, monkeypatch):
    # A plan that chose the TMA h·B, called with B factors its one descriptor cannot span (the same
    # memory under two tensors: distance 0), takes the kernel's descriptor per factor: still the
    # reference's y, the same plan.
    monkeypatch.setattr(tk, "_HQ_TMA_FORCE", True)
    monkeypatch.setattr(tk, "_num_sms", lambda device: 4)
    x, S1s, S2s, U1s, U2s, b = _layer(TMA_CASES[0], torch.bfloat16)
    tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b, path="split")
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    assert plan.hq.fn is tk._hq_tma_kernel
    alias = U1s.view(U1s.shape)
    y = tk.sklinear_forward(x, S1s, alias, U1s, U2s, b, path="split")
    assert len(tk._PLANS) == 1  # the same plan
    assert_close(y, ref.sklinear_forward(*_f64([x, S1s, U1s, U1s, U2s, b])), name="y")


def test_traced_plans_take_the_tma_hq_for_aligned_factors(monkeypatch):
    # A traced plan (no data pointers) takes the TMA h·B, its span checked by the kernel, where the
    # B factors' storage offsets keep them 16-byte aligned, and not for a factor one element off.
    monkeypatch.setattr(tk, "_HQ_TMA_FORCE", True)
    monkeypatch.setattr(tk, "_num_sms", lambda device: 4)
    x, S1s, S2s, U1s, U2s, b = _layer(TMA_CASES[0], torch.bfloat16)
    S2m = torch.empty(S2s.numel() + 1, device=DEV, dtype=S2s.dtype)[1:].view(S2s.shape)
    assert S2m.storage_offset() == 1

    def traced(s2):
        a = [tk._stacked_long_mid(S1s), tk._stacked_long_mid(U2s)]
        return tk._ForwardPlan(x, a, [tk._stacked_long_last(U1s), tk._stacked_long_last(s2)], b, 0.5, "split",
                               True, False)  # fmt: skip

    aligned, off = traced(S2s), traced(S2m)
    assert aligned.hq.fn is tk._hq_tma_kernel and aligned.hq.trace
    assert off.hq.fn is not tk._hq_tma_kernel


def test_tma_hq_only_where_it_applies(monkeypatch):
    # Eligibility: 16-bit operands, out rows of 16 bytes, rows of B back to back with unit column
    # stride, a rank slice of 16 dividing both ranks. A
    # traced plan takes the fastest config the stand-in timing recorded among its own candidates
    # (_tuned_among).
    monkeypatch.setattr(tk, "_HQ_TMA_FORCE", True)
    _, _, S2s, U1s, _, _ = _layer(TMA_CASES[0], torch.float32)
    bf = [tk._stacked_long_last(U1s), tk._stacked_long_last(S2s)]
    assert tk._tma_layout(bf, 40, torch.float32) is None
    assert tk._tma_layout(bf, 40, torch.bfloat16) == (40, 16)
    assert tk._tma_layout(bf, 36, torch.bfloat16) is None
    assert tk._tma_layout([tk._stacked_long_last(U1s[:, :6])], 40, torch.bfloat16) is None  # rank 12
    wide = torch.randn(3, 16, 40, device=DEV)
    one, three = tk._stacked_long_last(wide[:1]), tk._stacked_long_last(wide)
    assert tk._tma_layout([one, three], 40, torch.bfloat16) == (40, 16)  # ranks 16 and 48
    col_major = U1s.transpose(1, 2).contiguous().transpose(1, 2)  # long dim not of unit stride
    assert tk._tma_layout([tk._stacked_long_last(col_major)], 40, torch.bfloat16) is None
    key = ("hq_f", 1, "layer")
    cands = [tk._HqCfg(64, 128, 4, 3), tk._HqCfg(64, 64, 4, 3)]
    tma = tk._HqTCfg(128, 256, 64, 8, 4, 1, 2)
    monkeypatch.setitem(tk._TUNED, key, tma)
    monkeypatch.setitem(tk.TUNE_LOG, key, {tma: 0.01, cands[0]: 0.03, cands[1]: 0.02})
    assert tk._tuned_among(key, cands) == cands[1]
    assert tk._tuned_among(key, cands + [tma]) == tma


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("want_h", [False, True], ids=["y", "y_h"])
@pytest.mark.parametrize("sb", [32, 2], ids=["sb32", "sb2"])
def test_partials_summed_before_hq(dtype, want_h, sb, poison, monkeypatch):
    # Small T with wide split partials: one _reduce launch sums them into h before the h·B (on the
    # GPU from 16 KB of partials per row of h; here from any). Forward and kept h against float64;
    # sb = 2 partials a load takes the reduce through its loop over the 3 splits.
    monkeypatch.setattr(tk, "_K_GRANULE", 16)
    monkeypatch.setattr(tk, "_REDUCE_FWD_ROW_BYTES", 1)
    monkeypatch.setattr(tk, "_REDUCE_SB", sb)
    case = (5, 40, 33, 2, 8)
    args = _layer(case, dtype)
    out = tk.sklinear_forward(*args, want_h=want_h, path="split")
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    assert plan.red is not None and plan.xa.split > 1
    y_ref, h_ref = ref.sklinear_forward(*_f64(args), want_h=True)
    assert_close(out[0] if want_h else out, y_ref, name="y")
    if want_h:
        assert out[1].dtype == dtype and out[1].shape == (case[0], 2 * case[3] * case[4])
        assert_close(out[1], h_ref, name="h")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_partials_summed_first_by_read_bytes(dtype, poison, monkeypatch):
    # The forward also sums the x·A partials first where all h·B programs together would read
    # _REDUCE_FWD_READ_BYTES of them (4096², k = 64, T = 256 on the GPU); here from any, with the
    # per-row rule out of the way.
    monkeypatch.setattr(tk, "_K_GRANULE", 16)
    monkeypatch.setattr(tk, "_REDUCE_FWD_ROW_BYTES", 1 << 40)
    monkeypatch.setattr(tk, "_REDUCE_FWD_READ_BYTES", 1)
    case = (5, 40, 33, 1, 8)
    args = _layer(case, dtype)
    y = tk.sklinear_forward(*args, path="split")
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    assert plan.red is not None and plan.xa.split > 1
    assert_close(y, ref.sklinear_forward(*_f64(args)), name="y")
    # And not without it.
    tk._PLANS.clear()
    monkeypatch.setattr(tk, "_REDUCE_FWD_READ_BYTES", 1 << 40)
    tk.sklinear_forward(*args, path="split")
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    assert plan.red is None and plan.xa.split > 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_forward_splits_k_by_block(dtype, poison, monkeypatch):
    # fp32 at large ranks (here any): the forward's x·A splits K into slices of one BLOCK_K
    # (the interpreter's 32, the GPU's 64) rather than _K_GRANULE, the last one partial; other
    # dtypes keep the granule (256 > K: no split). Forward and kept h against float64.
    monkeypatch.setattr(tk, "_XA_FP32_FINE_MIN_RANK", 1)
    case = (3, 100, 24, 1, 5)
    args = _layer(case, dtype)
    y, h = tk.sklinear_forward(*args, want_h=True, path="split")
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    if dtype == torch.float32:
        bk = plan.xa.cfg.BLOCK_K
        assert bk < case[1] and plan.xa.split == -(-case[1] // bk)
    else:
        assert plan.xa.split == 1
    y_ref, h_ref = ref.sklinear_forward(*_f64(args), want_h=True)
    assert_close(y, y_ref, name="y")
    assert_close(h, h_ref, name="h")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_backward_splits_gh_by_block(dtype, poison, monkeypatch):
    # fp32 at large ranks (here any): g·Bᵀ splits `out` into slices of one BLOCK_K and its
    # partials are summed into gh before dx and dS1 read them; other dtypes keep the granule
    # (256 > out: no split). Every gradient against float64.
    monkeypatch.setattr(tk, "_XA_FP32_FINE_MIN_RANK", 1)
    case = (3, 24, 100, 1, 5)
    args = _layer(case, dtype)[:5]
    g = torch.randn(case[0], case[2], device=DEV).to(dtype)
    got = tk.sklinear_backward(g, *args, True, True, True)
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._BackwardPlan))
    if dtype == torch.float32:
        bk = plan.gh.cfg.BLOCK_K
        assert bk < case[2] and plan.gh.split == -(-case[2] // bk) and plan.gh_red is not None
    else:
        assert plan.gh.split == 1 and plan.gh_red is None
    want = ref.sklinear_backward(*_f64([g, *args]), True, True, True)
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)


@pytest.mark.parametrize("k", [2, 24], ids=["rank4", "rank48"])
def test_fp32_small_rank_forward_uses_fma_products(k, poison):
    # Below _TUNE_MIN_M rows an fp32 forward of padded rank ≤ 32 multiplies in full fp32
    # (PREC 0, FMAs), larger ranks as torch's TF32 setting says (TF32 off: tf32x3); the backward
    # keeps the setting's mode. Both against float64 at fp32 tolerance.
    case = (7, 40, 33, 1, k)
    args = _layer(case, torch.float32)
    y = tk.sklinear_forward(*args, path="split")
    fwd = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    want = 0 if 2 * k <= 32 else tk._precision(torch.float32)
    assert fwd.xa.launch.meta["PREC"] == want and fwd.hq.meta["PREC"] == want
    assert_close(y, ref.sklinear_forward(*_f64(args)), name="y")
    g = torch.randn(case[0], case[2], device=DEV)
    got = tk.sklinear_backward(g, *args[:5], True, True, True)
    bwd = next(p for p in tk._PLANS.values() if isinstance(p, tk._BackwardPlan))
    assert bwd.gh.launch.meta["PREC"] == tk._precision(torch.float32)
    want = ref.sklinear_backward(*_f64([g, *args[:5]]), True, True, True)
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
def test_backward_sums_gh_partials_first(dtype, need_dx, poison, monkeypatch):
    # Small T, g·Bᵀ split over `out`: its partials are summed once into gh before dx = gh·Aᵀ and
    # dS1 = xᵀ·gh read it (on the GPU from 32 KB of partials a consumer program would read; here
    # from any). Every gradient against float64.
    monkeypatch.setattr(tk, "_K_GRANULE", 16)
    monkeypatch.setattr(tk, "_REDUCE_BWD_BYTES", 1)
    monkeypatch.setattr(tk, "_REDUCE_SB", 2)
    T, n_in, n_out, L, k = 5, 33, 40, 2, 8
    args = _layer((T, n_in, n_out, L, k), dtype)[:5]
    g = torch.randn(T, n_out, device=DEV).to(dtype)
    got = tk.sklinear_backward(g, *args, need_dx, True, True)
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._BackwardPlan))
    assert plan.gh_red is not None and plan.gh.split > 1
    want = ref.sklinear_backward(*_f64([g, *args]), need_dx, True, True)
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert (a is None) == (w is None), name
        if a is not None:
            assert_close(a, w, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backward_dx_and_da_in_one_pass(case, dtype, splits, poison, monkeypatch):
    # dx = gh·Aᵀ and dA = xᵀ·gh from one _dxa launch (on the GPU a tuning candidate from T = 1024,
    # here forced): SKLinear (dS1 only, two A factors) and the plain op (dA of its one factor), with
    # x non-contiguous in some cases, dA split over T into partials under ``split``. Every gradient
    # against float64, and the plans took the one-pass launch.
    monkeypatch.setattr(tk, "_DXA_FORCE", True)
    # (gh summed whenever split, so that _dxa can read it)
    monkeypatch.setattr(tk, "_sum_first", lambda M, split, *rest: split > 1)
    i = CASES.index(case)
    x, S1s, S2s, U1s, U2s, _ = _layer(case, dtype, x_layout=["strided", "contiguous", "transposed", "contiguous"][i])
    T, n_in, n_out, L, k = case
    g = torch.randn(T, n_out, device=DEV).to(dtype)
    got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True)
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)
    A = (torch.randn(n_in, 2 * k + 1, device=DEV) * n_in**-0.5).to(dtype)
    B = (torch.randn(2 * k + 1, n_out, device=DEV) * k**-0.5).to(dtype)
    got = tk.lowrank_backward(g, x, A, B, 0.75, True, True, True, False)
    want = ref.lowrank_backward(*_f64([g, x, A, B]), 0.75, True, True, True, False)
    for name, a, w in zip(("dx", "dA", "dB"), got, want):
        assert_close(a, w, name=name)
    plans = [p for p in tk._PLANS.values() if isinstance(p, tk._BackwardPlan)]
    assert len(plans) == 2 and all(p.dxa is not None and p.dx is None for p in plans)
    if splits == "split" and T > 16:
        assert all(p.dxa.split > 1 for p in plans)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
def test_sklinear_backward_only_what_is_asked(needs, poison):
    args = _layer(CASES[2], torch.float32)[:5]
    g = torch.randn(CASES[2][0], CASES[2][2], device=DEV)
    got = tk.sklinear_backward(g, *args, *needs)
    want = ref.sklinear_backward(*_f64([g, *args]), *needs)
    for a, w in zip(got, want):
        assert (a is None) == (w is None)
        if a is not None:
            assert_close(a, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(37, 40, 17, 1, 24), (1, 17, 33, 1, 5)], ids=_id)
def test_lowrank_forward_backward(case, dtype, splits, poison):
    T, n_in, n_out, _, r = case
    x = torch.randn(T, n_in, device=DEV).to(dtype)
    A = (torch.randn(n_in, r, device=DEV) * n_in**-0.5).to(dtype)
    B = (torch.randn(n_out, r, device=DEV) * r**-0.5).to(dtype).t()  # non-contiguous factor
    b = torch.randn(n_out, device=DEV).to(dtype)
    for path in ("fused", "split"):
        y = tk.lowrank_forward(x, A, B, b, 0.75, path=path)
        assert_close(y, ref.lowrank_forward(*_f64([x, A, B, b]), 0.75), name=f"y ({path})")
    g = torch.randn(T, n_out, device=DEV).to(dtype)
    got = tk.lowrank_backward(g, x, A, B, 0.75, True, True, True, True)
    want = ref.lowrank_backward(*_f64([g, x, A, B]), 0.75, True, True, True, True)
    for name, a, w, like in zip(("dx", "dA", "dB", "db"), got, want, (x, A, B, b)):
        assert a.shape == like.shape and a.dtype == dtype, name
        assert_close(a, w, name=name)


def test_rank_above_max_falls_back_to_reference(poison):
    x = torch.randn(3, 17, device=DEV)
    A = torch.randn(17, tk.MAX_RANK + 1, device=DEV)
    B = torch.randn(tk.MAX_RANK + 1, 5, device=DEV)
    assert_close(tk.lowrank_forward(x, A, B, None, 0.5), ref.lowrank_forward(*_f64([x, A, B]), None, 0.5))


def test_empty_batch(poison):
    x, S1s, S2s, U1s, U2s, b = _layer((0, 17, 33, 1, 3), torch.float32)
    assert tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b).shape == (0, 33)
    dx, dS1s, dS2s, db = tk.sklinear_backward(torch.zeros(0, 33, device=DEV), x, S1s, S2s, U1s, U2s, True, True, True)
    assert dx.shape == (0, 17) and dS1s.abs().sum() == 0 and dS2s.abs().sum() == 0 and db.abs().sum() == 0


def test_fp32_follows_torch_tf32_setting():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert tk._precision(torch.float32) == tk._FP32_HIGHEST == 2  # "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert tk._precision(torch.float32) == 1  # "tf32"
        assert tk._precision(torch.bfloat16) == 0
    finally:
        torch.set_float32_matmul_precision(old)


def test_tuning_is_keyed_on_the_t_bucket():
    assert [tk._m_bucket(t) for t in (1, 16, 17, 4096, 5000, 10**6)] == [16, 16, 32, 4096, 8192, 16384]
    # A config timed at one T serves every T of its bucket without timing again.
    key = ("xa_f", 8192, 8192, (), torch.bfloat16, 0)
    tk._TUNED[key + (tk._m_bucket(5000),)] = "timed"
    never = lambda c: pytest.fail("timed again")
    assert tk._pick(key + (tk._m_bucket(8000),), ["a", "b"], never, True) == "timed"
    # Untimed (small T, tracing, capturing): the first candidate; one candidate: no timing at all.
    assert tk._pick(key + (tk._m_bucket(100),), ["a", "b"], never, False) == "a"
    assert tk._pick(key + (None,), ["a", "b"], never, True) == "a"
    assert tk._pick(key + (16,), ["only"], never, True) == "only"
    assert not tk._can_time(False, 64) and not tk._can_time(True, 10**5)


def test_plans_are_reused_and_recompute(poison):
    """A second call of the same shapes reuses the cached plan (on a GPU: the compiled kernels,
    launched directly) and computes with the new operands; a shape change makes a new plan."""
    case = (37, 40, 17, 2, 3)
    for i in range(2):
        args = _layer(case, torch.float32)
        g = torch.randn(case[0], case[2], device=DEV)
        assert_close(tk.sklinear_forward(*args), ref.sklinear_forward(*_f64(args)), name=f"y, call {i}")
        got = tk.sklinear_backward(g, *args[:5], True, True, True)
        want = ref.sklinear_backward(*_f64([g, *args[:5]]), True, True, True)
        for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
            assert_close(a, w, name=f"{name}, call {i}")
        assert len(tk._PLANS) == 2  # one forward, one backward plan
    x = torch.randn(5, case[1], device=DEV)
    tk.sklinear_forward(x, *args[1:])
    assert len(tk._PLANS) == 3


def test_misaligned_input(poison):
    """x at an address that is not 16-byte aligned (its own plan, no direct launches)."""
    case = (9, 33, 40, 1, 8)
    args = list(_layer(case, torch.float32))
    x = torch.randn(case[0] * case[1] + 1, device=DEV)[1:].view(case[0], case[1])
    assert x.data_ptr() % 16 != 0
    args[0] = x
    assert_close(tk.sklinear_forward(*args), ref.sklinear_forward(*_f64(args)))
    assert not next(iter(tk._PLANS))[-1]  # planned as misaligned


@triton.jit
def _f32_probe(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    b = tl.load(bits_ptr + i, mask=i < n)
    tl.store(out_ptr + i, _launch.f32_of(b), mask=i < n)


@triton.jit
def _f32_scalar_probe(out_ptr, bits):
    tl.store(out_ptr, _launch.f32_of(bits))


def test_float_scalars_reach_the_kernels_as_fp32_bits(poison):
    """f32_bits / f32_of: the fp32 value (rounded to nearest) comes back bit for bit, from a tensor
    of bits and from a scalar argument, including a negative, a subnormal and 1 (which triton
    specializes to a constant); a value beyond fp32 range is refused."""
    vals = [0.5, 1 / 3, -2.75, 1e-40, 3.0e38, 0.0, -0.0, 1 / (2 * 3), 1.401298464324817e-45]
    bits = [_launch.f32_bits(v) for v in vals]
    assert bits[-1] == 1
    want = torch.tensor(vals, dtype=torch.float32)
    out = torch.full((len(vals),), float("nan"), device=DEV)
    _f32_probe[(1,)](torch.tensor(bits, dtype=torch.int32, device=DEV), out, len(vals), BLOCK=16)
    assert torch.equal(out.cpu().view(torch.int32), want.view(torch.int32))
    for v, b in zip(vals, bits):
        one = torch.full((1,), float("nan"), device=DEV)
        _f32_scalar_probe[(1,)](one, b)
        assert torch.equal(one.cpu().view(torch.int32), torch.tensor([v], dtype=torch.float32).view(torch.int32)), v
    with pytest.raises(OverflowError):
        _launch.f32_bits(1e39)


def test_launches_take_no_float_scalars():
    """A Python float is typed fp32 by triton's launcher and fp64 by Inductor's generated code, so
    the same kernel would compile to two binaries (H200: the compiled _hq_kernel at 133 registers
    against 128, 32.1 against 20.9 µs). Launch refuses one; the plans pass f32_bits."""
    args = (1,) * 15  # M, K, R1, R2, K_PER_SPLIT, 10 strides
    meta = {"KT1": 16, "KT2": 16, "HAS_SECOND": True, "R1P": 16, "R2P": 16, "PREC": 0, "EVEN_K": True, "BLOCK_M": 16, "BLOCK_K": 16}
    tk._Launch(tk._xa_kernel, (1,), 4, (*args, _launch.f32_bits(0.5)), meta, {}, False, False)
    with pytest.raises(AssertionError, match="float scalar"):
        tk._Launch(tk._xa_kernel, (1,), 4, (*args, 0.5), meta, {}, False, False)


def test_jit_helpers_keep_their_names():
    """Inductor copies a user kernel's source and the @triton.jit functions it calls into its own
    module under their ``__name__``; a helper imported under another name (``import f32_of as
    _f32_of``) then fails to compile there with a NameError. Every JIT function a kernel module
    holds is bound to its own name."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    for mod in ("lowrank_linear.triton", "performer.triton", "performer.chunked", "performer.chunked_bwd"):
        m = importlib.import_module(f"panther.kernels.{mod}")
        for name, obj in vars(m).items():
            if isinstance(obj, (triton.runtime.JITFunction, InterpretedFunction)):
                assert obj.fn.__name__ == name, f"{mod}: {obj.fn.__name__} bound as {name}"


def test_compile_threads_setting_is_checked(monkeypatch):
    monkeypatch.setenv("PANTHER_COMPILE_THREADS", "many")
    with pytest.raises(ValueError, match="PANTHER_COMPILE_THREADS must be an integer, got 'many'"):
        _launch.compile_ahead(lambda: None)
    monkeypatch.setenv("PANTHER_COMPILE_THREADS", "0")
    built = []
    assert _launch.compile_ahead(lambda: built.append(1)) is False and built == []


def test_launch_checks_its_arguments():
    with pytest.raises(AssertionError, match="launch of"):
        tk._Launch(tk._xa_kernel, (1,), 4, (1, 2), {}, {}, False, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_partials(dtype, monkeypatch, poison):
    """A GPU with many SMs at small T: the reductions split into more than four partials, which the
    consumers sum in a loop rather than unrolled."""
    monkeypatch.setitem(tk._SMS, torch.device(DEV), 64)
    monkeypatch.setattr(tk, "_K_GRANULE", 16)
    monkeypatch.setattr(tk, "_T_GRANULE", 16)
    case = (5, 96, 112, 1, 8)
    x, S1s, S2s, U1s, U2s, b = _layer(case, dtype)
    y = tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b)
    plan = next(iter(tk._PLANS.values()))
    assert plan.xa.split > 4
    assert_close(y, ref.sklinear_forward(*_f64([x, S1s, S2s, U1s, U2s, b])), name="y")
    g = torch.randn(case[0], case[2], device=DEV).to(dtype)
    got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True)
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)
