"""Triton Performer kernels against the plain-PyTorch reference, forward and backward.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so shapes are small
and odd: several chunks and segments, a last chunk cut short, head dims that are not powers of
two (R-dimensional SRPE codes), N ≠ Nk. Every test runs with fresh allocations poisoned.
Full sizes run on the GPU in ``test_gpu_attention.py``.
"""

from __future__ import annotations

import pytest
import torch

from panther.kernels.performer import reference as ref

triton_kernels = pytest.importorskip("panther.kernels.performer.triton")

from panther_testing import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _segment_kernels(monkeypatch):
    """This file tests the segment kernels of triton.py (the chunked ones, which triton.py's
    dispatch picks for many of these calls, have test_kernels_performer_chunked*.py)."""
    monkeypatch.setattr(triton_kernels, "PATH", "segments")
CHUNK = 16  # small chunks: N = 45 spans three, the last cut short


def _inputs(B, H, N, Nk, D, E, m, dtype, mask, causal, gen_mask_all_off=False):
    q = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    k = torch.randn(B, H, Nk, D, device=DEVICE).to(dtype)
    v = torch.randn(B, H, Nk, E, device=DEVICE).to(dtype)
    # omega in the inputs' dtype, as a converted module holds it (the kernels project in that dtype)
    omega = torch.randn(H, m, D, device=DEVICE).to(dtype)
    key_mask = None
    if mask:
        key_mask = torch.rand(B, Nk, device=DEVICE) > 0.3
        key_mask[:, 0] = True
        if gen_mask_all_off:
            key_mask[-1] = False  # every key of the last batch masked: out and grads are 0
    return q, k, v, omega, key_mask


def _check(q, k, v, omega, key_mask, kernel_fn, causal, chunk=CHUNK, scale=None, zero_grads=(), f64=False):
    """Compare forward and backward with the reference (with f64, the reference runs in float64 on
    the same rounded inputs, so the error measured is the kernels' own). Gradients named in
    zero_grads are 0 in exact arithmetic (both sides hold rounding noise only): they are checked
    to be tiny instead."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    up = [t.double() if f64 else t for t in (q, k, v, omega)]
    out = triton_kernels.performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size=chunk)
    exp = ref.performer_attention(*up, key_mask, kernel_fn, causal, scale)
    assert out.dtype == v.dtype and out.shape == exp.shape
    assert_close(out, exp, name="out")
    grad = torch.randn_like(out)
    got = triton_kernels.performer_attention_backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size=chunk)
    want = ref.performer_attention_backward(grad.double() if f64 else grad, *up, key_mask, kernel_fn, causal, scale)
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        if name in zero_grads:
            assert torch.isfinite(g).all() and g.abs().max() <= 1e-5 * grad.abs().max(), name
        else:
            assert_close(g, w, name=name)
    return out, got


# (B, H, N, Nk, D, E, m): ids read as shapes.
SHAPES = {
    "B2H2-N45-D16-m16": (2, 2, 45, 45, 16, 16, 16),
    "B1H2-N17-D20-m24": (1, 2, 17, 17, 20, 20, 24),  # SRPE-like code dim, m not a power of two
    "B2H2-N1-D16-m16": (2, 2, 1, 9, 16, 16, 16),  # one query (causal: one query, one key)
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_fp32_matches_reference(poison, shape, causal, kernel_fn):
    B, H, N, Nk, D, E, m = SHAPES[shape]
    Nk = N if causal else Nk
    # A lone query over a lone key: out = v, so dq = dk = 0.
    zero = ("dq", "dk") if N == Nk == 1 else ()
    _check(*_inputs(B, H, N, Nk, D, E, m, torch.float32, N > 1, causal), kernel_fn, causal, zero_grads=zero)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_low_precision_matches_reference(poison, dtype, causal):
    _check(*_inputs(2, 2, 45, 45, 20, 20, 24, dtype, mask=True, causal=causal), "softmax", causal)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_cross_attention_n_ne_nk_and_e_ne_d(poison, kernel_fn):
    """Non-causal with 45 queries over 30 keys, value dim 12 ≠ head dim 20."""
    _check(*_inputs(2, 2, 45, 30, 20, 12, 24, torch.float32, mask=True, causal=False), kernel_fn, False)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_all_keys_masked_gives_zero(poison, causal):
    q, k, v, omega, mask = _inputs(2, 2, 17, 17, 16, 16, 16, torch.float32, True, causal, gen_mask_all_off=True)
    out, (dq, dk, dv) = _check(q, k, v, omega, mask, "softmax", causal)
    assert torch.all(out[-1] == 0) and torch.all(dq[-1] == 0) and torch.all(dk[-1] == 0) and torch.all(dv[-1] == 0)


@pytest.mark.parametrize("path", ["chunked", "segments"])
def test_underflowing_normalizer_gives_finite_gradients(poison, monkeypatch, path):
    """q and k ×30 (D = 16, m = 24, scale 1/4): some causal queries' features overlap the visible
    keys' by less than fp32's range (float64 den down to 1e-73), so den is subnormal or 0 in fp32.
    Their 1/den used to overflow the backward's sums to inf and then NaN (every gradient, kernels
    and the fp32 reference alike); such a query now passes no gradient (den < DEN_MIN) and every
    output and gradient is finite."""
    monkeypatch.setattr(triton_kernels, "PATH", path)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    q, k = (30 * torch.randn(1, 1, 50, 16, device=DEVICE, generator=g) for _ in range(2))
    v = torch.randn(1, 1, 50, 16, device=DEVICE, generator=g)
    omega = torch.randn(1, 24, 16, device=DEVICE, generator=g)
    grad = torch.randn(1, 1, 50, 16, device=DEVICE, generator=g)
    args = (omega, None, "softmax", True, 0.25)
    den64 = ref._forward(*(t.double() for t in (q, k, v, omega)), None, "softmax", True, 0.25, 64)[4]
    assert (den64 < ref.DEN_MIN).any()  # the case the test is about
    out = triton_kernels.performer_attention(q, k, v, *args, 16)
    got = triton_kernels.performer_attention_backward(grad, q, k, v, *args, 16)
    want = ref.performer_attention_backward(grad, q, k, v, *args)
    assert torch.isfinite(out).all()
    for name, a, b in zip(("dq", "dk", "dv"), got, want):  # (fp32 cannot be accurate here)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_strided_inputs_and_default_chunk(poison, causal):
    """(B, N, H, D) tensors viewed as (B, H, N, D), as a module's projections give them."""
    B, H, N, D, m = 2, 2, 45, 16, 16
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))
    omega = torch.randn(H, m, D, device=DEVICE)
    assert not q.is_contiguous()
    _check(q, k, v, omega, None, "softmax", causal, chunk=None, scale=0.3)


def test_causal_output_ignores_later_keys(poison):
    q, k, v, omega, _ = _inputs(1, 2, 45, 45, 16, 16, 16, torch.float32, False, True)
    out = triton_kernels.performer_attention(q, k, v, omega, None, "softmax", True, 0.25, chunk_size=CHUNK)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 30:] *= 3.0
    v2[:, :, 30:] = -v2[:, :, 30:]
    out2 = triton_kernels.performer_attention(q, k2, v2, omega, None, "softmax", True, 0.25, chunk_size=CHUNK)
    torch.testing.assert_close(out2[:, :, :30], out[:, :, :30], rtol=1e-6, atol=1e-6)


def test_rejects_bad_arguments():
    q, k, v, omega, _ = _inputs(1, 2, 17, 9, 16, 16, 16, torch.float32, False, False)
    with pytest.raises(ValueError, match="kernel_fn"):
        triton_kernels.performer_attention(q, k, v, omega, None, "gelu", False, 0.25)
    with pytest.raises(ValueError, match="causal"):
        triton_kernels.performer_attention(q, k, v, omega, None, "softmax", True, 0.25)
    with pytest.raises(ValueError, match="chunk_size"):
        triton_kernels.performer_attention(q, k, v, omega, None, "softmax", False, 0.25, chunk_size=24)


@pytest.mark.parametrize(
    "D,E,m,ok",
    [
        (64, 64, 256, True),
        (128, 128, 256, True),
        (100, 60, 200, True),
        (200, 64, 256, True),
        (256, 64, 256, True),  # the spec's sinSRPE example: codes of R = 256 at m = 256
        (512, 128, 256, True),
        (513, 64, 256, False),
        (64, 256, 256, False),
        (64, 64, 512, False),
    ],
    ids=lambda v: str(v),
)
def test_supports_only_shapes_whose_tiles_fit(D, E, m, ok):
    """Head dims up to MAX_HEAD_DIM (cut into blocks past MAX_TILE), value dims up to MAX_TILE and
    m up to MAX_FEATURES run on the kernels; the op sends wider shapes to the reference."""
    from panther.kernels.performer.triton import MAX_FEATURES, MAX_HEAD_DIM, MAX_TILE, supports

    assert (MAX_TILE, MAX_HEAD_DIM, MAX_FEATURES) == (128, 512, 256)
    assert supports(torch.empty(1, 1, 2, D), torch.empty(1, 1, 2, E), torch.empty(1, m, D)) is ok


# ---------------------------------------------------------------------------------------------
# head dims past MAX_TILE: the projection, ‖x‖² and dx cut into blocks of D_BLOCK columns
# ---------------------------------------------------------------------------------------------

WIDE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _wide_inputs(D, dtype, causal, N=37, E=16, m=24):
    """B=1, H=2, N=37 (three chunks of 16, the last cut short), with a key mask; ω of unit entries,
    causal too (a fixed causal stabilizer maxⱼ‖ωⱼ‖²/2 − 40 sat ~100 above the logits there, past
    fp32's range; the running max does not)."""
    return _inputs(1, 2, N, N, D, E, m, dtype, True, causal)


def _last_plan():
    return list(triton_kernels._PLANS.values())[-1]


@pytest.mark.parametrize("dtype", list(WIDE_DTYPES), ids=list(WIDE_DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("D", [200, 256], ids=["D200", "D256"])
def test_wide_head_dim_matches_reference(poison, D, causal, dtype):
    """D = 200 (odd: the last block is partial) and D = 256, against float64."""
    q, k, v, omega, key_mask = _wide_inputs(D, WIDE_DTYPES[dtype], causal)
    _check(q, k, v, omega, key_mask, "softmax", causal, f64=True)
    cfg = _last_plan().cfg  # the backward's plan: blocks of the head dim, not one whole tile
    # bf16 features: 64-column blocks (D = 200: the last of four holds 8); fp32 features (fp16/fp32
    # inputs): 32-column blocks (the last of seven holds 8).
    blk = triton_kernels.D_BLOCK if q.dtype == torch.bfloat16 else triton_kernels.D_BLOCK_F32
    assert (cfg.BD, cfg.ND) == (blk, -(-D // blk))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_wide_head_dim_relu(poison, causal):
    _check(*_wide_inputs(200, torch.float32, causal), "relu", causal, f64=True)


def test_wide_head_dim_other_block(poison, monkeypatch):
    """D_BLOCK is a knob: 32-column blocks (seven of them for D = 200) give the same results."""
    monkeypatch.setattr(triton_kernels, "D_BLOCK", 32)
    _check(*_wide_inputs(200, torch.float32, False), "softmax", False, f64=True)
    assert _last_plan().cfg.ND == 7


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_segment_reduction_in_row_blocks(poison, monkeypatch, causal):
    """REDUCE_ROWS = 16 with m = 40 (padded to 64): the segment states are combined by four
    programs per (batch, head), each owning 16 feature rows (sum rescaled to the global key max,
    exclusive prefix and suffix)."""
    monkeypatch.setattr(triton_kernels, "REDUCE_ROWS", 16)
    _check(*_inputs(2, 2, 45, 45, 20, 12, 40, torch.float32, True, causal), "softmax", causal, f64=True)
    assert _last_plan().r_reduce.grid[:2] == (4, 4)


# ---------------------------------------------------------------------------------------------
# cached launch plans
# ---------------------------------------------------------------------------------------------


def test_plans_are_cached_per_call_signature(poison, monkeypatch):
    """The second call of a signature runs the plan the first built (both match the reference);
    other strides, flags or module knobs get a plan of their own."""
    monkeypatch.setattr(triton_kernels, "_PLANS", {})
    plans = triton_kernels._PLANS
    q, k, v, omega, mask = _inputs(2, 2, 45, 45, 20, 12, 24, torch.float32, True, False)
    args = (omega, mask, "softmax", False, 0.3)
    exp = ref.performer_attention(q, k, v, *args)
    outs = [triton_kernels.performer_attention(q, k, v, *args, chunk_size=CHUNK) for _ in range(2)]
    for out in outs:
        assert_close(out, exp, name="out")
    assert len(plans) == 1
    plan = _last_plan()
    assert isinstance(plan, triton_kernels._ForwardPlan)
    # New tensors of the same signature: the same plan.
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    assert_close(triton_kernels.performer_attention(q2, k2, v2, *args, chunk_size=CHUNK), exp, name="out (clones)")
    assert len(plans) == 1 and _last_plan() is plan
    # The same values through other strides: another plan, the same result.
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert qt.stride() != q.stride()
    assert_close(triton_kernels.performer_attention(qt, k, v, *args, chunk_size=CHUNK), exp, name="out (strided q)")
    assert len(plans) == 2 and _last_plan() is not plan
    # Another chunk or scale: other plans.
    triton_kernels.performer_attention(q, k, v, *args, chunk_size=32)
    triton_kernels.performer_attention(q, k, v, omega, mask, "softmax", False, 0.25, chunk_size=CHUNK)
    assert len(plans) == 4
    # The backward: one plan, used again by the second call.
    grad = torch.randn_like(exp)
    want = ref.performer_attention_backward(grad, q, k, v, *args)
    for _ in range(2):
        got = triton_kernels.performer_attention_backward(grad, q, k, v, *args, chunk_size=CHUNK)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert_close(g, w, name=name)
    assert len(plans) == 5 and isinstance(_last_plan(), triton_kernels._BackwardPlan)
    # A module knob changed (as the benchmark's --sweep does): the cache starts over.
    monkeypatch.setitem(triton_kernels.TUNED, ("noncausal", "fwd"), (32, 4))
    assert_close(triton_kernels.performer_attention(q, k, v, *args), exp, name="out (knob)")
    assert len(plans) == 1
    monkeypatch.setattr(triton_kernels, "NUM_WARPS", 2)
    triton_kernels.performer_attention(q, k, v, *args)
    assert len(plans) == 1 and _last_plan().fwd.opts["num_warps"] == 2


def test_out_of_resources_falls_back_to_one_stage(poison, monkeypatch):
    """A first launch over the shared-memory limit is retried with num_stages=1, which the plan
    keeps (later calls do not fail again); at num_stages=1 the error propagates."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(triton_kernels, "_PLANS", {})
    launch_cls = triton_kernels._Launch
    real_call = launch_cls.__call__
    failed = []

    def call(self, *tensors):
        if self.fn is triton_kernels._fwd_kernel and self.opts["num_stages"] != 1:
            failed.append(self.opts["num_stages"])
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real_call(self, *tensors)

    monkeypatch.setattr(launch_cls, "__call__", call)
    q, k, v, omega, mask = _inputs(2, 2, 45, 45, 16, 16, 16, torch.float32, True, False)
    exp = ref.performer_attention(q, k, v, omega, mask, "softmax", False, 0.25)
    for _ in range(2):
        out = triton_kernels.performer_attention(q, k, v, omega, mask, "softmax", False, 0.25, chunk_size=CHUNK)
        assert_close(out, exp, name="out")
    plan = _last_plan()
    assert failed == [3] and plan.fwd.opts["num_stages"] == 1 and plan.state.opts["num_stages"] == 3

    def always(self, *tensors):
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(launch_cls, "__call__", always)
    with pytest.raises(OutOfResources):
        triton_kernels.performer_attention(q, k, v, omega, mask, "softmax", False, 0.25, chunk_size=CHUNK)
