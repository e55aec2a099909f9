"""Triton Performer kernels at full sizes on the GPU (skipped without CUDA).

Run through the device tool (``scripts/gpu_attention.sh``). The reference runs in float64 on the
same (rounded) inputs, so the error measured is the kernels' own.
"""

from __future__ import annotations

import pytest
import torch

from panther.kernels.performer import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from panther_testing import assert_close  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(B, H, N, Nk, D, m, dtype, mask):
    g = torch.Generator(device="cuda").manual_seed(1234 + N + D + m)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", generator=g).to(dtype) for n in (N, Nk, Nk))
    omega = torch.randn(H, m, D, device="cuda", generator=g).to(dtype)
    key_mask = None
    if mask:
        key_mask = torch.rand(B, Nk, device="cuda", generator=g) > 0.2
        key_mask[:, 0] = True
    return q, k, v, omega, key_mask


def _check(B, H, N, Nk, D, m, dtype, causal, kernel_fn, mask, backward=True):
    from panther.kernels.performer import triton as tk

    q, k, v, omega, key_mask = _inputs(B, H, N, Nk, D, m, dtype, mask)
    scale = D**-0.5
    up = [t.double() for t in (q, k, v, omega)]
    out = tk.performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale)
    exp = ref.performer_attention(*up, key_mask, kernel_fn, causal, scale)
    assert_close(out, exp, name="out")
    if backward:
        grad = torch.randn_like(out)
        got = tk.performer_attention_backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale)
        want = ref.performer_attention_backward(grad.double(), *up, key_mask, kernel_fn, causal, scale)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert_close(a, b, name=name)


# (dtype, head dim): every head dim in bf16, the other dtypes at d = 64.
CASES = [("bf16", 32), ("bf16", 64), ("bf16", 128), ("fp16", 64), ("fp32", 64)]


@pytest.mark.parametrize("dtype,D", CASES, ids=[f"{t}-d{d}" for t, d in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_softmax_full_size(poison, dtype, D, causal):
    """B=2, H=4, N=2053 (not a multiple of the chunk), m=256, with a key mask."""
    _check(2, 4, 2053, 2053, D, 256, DTYPES[dtype], causal, "softmax", mask=True)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_relu_full_size(poison, causal):
    _check(2, 4, 2053, 2053, 64, 256, torch.bfloat16, causal, "relu", mask=True)


@pytest.mark.parametrize("R", [24, 48])
def test_srpe_codes_cross_attention(poison, R):
    """R-dimensional SRPE codes in place of q/k (R not a power of two), N ≠ Nk, m = 128."""
    _check(2, 4, 1500, 3001, R, 128, torch.bfloat16, False, "softmax", mask=True)


def test_long_sequence_forward(poison):
    """B=1, H=12, N=65536 (the benchmark's long row): forward only, against fp64."""
    _check(1, 12, 65536, 65536, 64, 256, torch.bfloat16, False, "softmax", mask=False, backward=False)
    _check(1, 12, 65536, 65536, 64, 256, torch.bfloat16, True, "softmax", mask=False, backward=False)


def test_op_under_compile(poison):
    """torch.ops.panther.performer_attention on CUDA under torch.compile (triton_op + wrap_triton)."""
    ops = pytest.importorskip("panther.ops.attention")
    q, k, v, omega, key_mask = _inputs(2, 4, 1000, 1000, 64, 256, torch.bfloat16, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return ops.performer_attention(q, k, v, omega, key_mask, "softmax", True, 0.125)

    out = torch.compile(f, fullgraph=True)(q, k, v)
    exp = ref.performer_attention(q.double(), k.double(), v.double(), omega.double(), key_mask, "softmax", True, 0.125)
    assert_close(out, exp, name="compiled out")
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
