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


def _check(q, k, v, omega, key_mask, kernel_fn, causal, chunk=CHUNK, scale=None, zero_grads=()):
    """Compare forward and backward with the reference. Gradients named in zero_grads are 0 in
    exact arithmetic (both sides hold rounding noise only): they are checked to be tiny instead."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = triton_kernels.performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size=chunk)
    exp = ref.performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale)
    assert out.dtype == v.dtype and out.shape == exp.shape
    assert_close(out, exp, name="out")
    grad = torch.randn_like(out)
    got = triton_kernels.performer_attention_backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size=chunk)
    want = ref.performer_attention_backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale)
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
    [(64, 64, 256, True), (128, 128, 256, True), (100, 60, 200, True), (256, 64, 256, False), (64, 256, 256, False), (64, 64, 512, False)],
    ids=lambda v: str(v),
)
def test_supports_only_shapes_whose_tiles_fit(D, E, m, ok):
    """The op sends shapes past the kernels' on-chip tiles (the spec's sinSRPE example has
    D = R = 256 at m = 256, which overflowed shared memory on an H200) to the reference."""
    from panther.kernels.performer.triton import supports

    assert supports(torch.empty(1, 1, 2, D), torch.empty(1, 1, 2, E), torch.empty(1, m, D)) is ok
