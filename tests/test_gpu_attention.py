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


def _inputs(B, H, N, Nk, D, m, dtype, mask, E=None, omega_scale=1.0, key_scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(1234 + N + D + m)
    q, k = (torch.randn(B, H, n, D, device="cuda", generator=g) for n in (N, Nk))
    q, k = q.to(dtype), (key_scale * k).to(dtype)
    v = torch.randn(B, H, Nk, D if E is None else E, device="cuda", generator=g).to(dtype)
    omega = (omega_scale * torch.randn(H, m, D, device="cuda", generator=g)).to(dtype)
    key_mask = None
    if mask:
        key_mask = torch.rand(B, Nk, device="cuda", generator=g) > 0.2
        key_mask[:, 0] = True
    return q, k, v, omega, key_mask


def _check(B, H, N, Nk, D, m, dtype, causal, kernel_fn, mask, backward=True, E=None, omega_scale=1.0, key_scale=1.0):
    from panther.kernels.performer import triton as tk

    q, k, v, omega, key_mask = _inputs(B, H, N, Nk, D, m, dtype, mask, E, omega_scale, key_scale)
    scale = D**-0.5
    up = [t.double() for t in (q, k, v, omega)]
    out = tk.performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale)
    exp = ref.performer_attention(*up, key_mask, kernel_fn, causal, scale)
    assert_close(out, exp, name="out")
    if backward:
        grad = torch.randn_like(out)
        want = ref.performer_attention_backward(grad.double(), *up, key_mask, kernel_fn, causal, scale)
        # The training pair too: out and stats from the forward, reused by the backward.
        out2, stats = tk.performer_attention_train(q, k, v, omega, key_mask, kernel_fn, causal, scale)
        assert_close(out2, exp, name="train out")
        saved = {"out": out2, "stats": stats}
        for kw in ({}, saved):
            got = tk.performer_attention_backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, **kw)
            for name, a, b in zip(("dq", "dk", "dv"), got, want):
                assert_close(a, b, name=f"{name} ({'saved' if kw else 'recomputed'})")


@pytest.fixture(params=["chunked", "segments"])
def path(request, monkeypatch):
    """Both kernel families of triton.py's dispatch (PATH), wherever they take the shape."""
    from panther.kernels.performer import triton as tk

    monkeypatch.setattr(tk, "PATH", request.param)
    return request.param


# (dtype, head dim): every head dim in bf16, the other dtypes at d = 64 and 128 (at 128 their fp32
# features take the sliced head-dim path).
CASES = [("bf16", 32), ("bf16", 64), ("bf16", 128), ("fp16", 64), ("fp16", 128), ("fp32", 64), ("fp32", 128)]


@pytest.mark.parametrize("dtype,D", CASES, ids=[f"{t}-d{d}" for t, d in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_softmax_full_size(poison, path, dtype, D, causal):
    """B=2, H=4, N=2053 (not a multiple of the chunk), m=256, with a key mask."""
    _check(2, 4, 2053, 2053, D, 256, DTYPES[dtype], causal, "softmax", mask=True)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_relu_full_size(poison, path, causal):
    _check(2, 4, 2053, 2053, 64, 256, torch.bfloat16, causal, "relu", mask=True)


@pytest.mark.parametrize("R", [24, 48])
def test_srpe_codes_cross_attention(poison, R):
    """R-dimensional SRPE codes in place of q/k (R not a power of two), N ≠ Nk, m = 128."""
    _check(2, 4, 1500, 3001, R, 128, torch.bfloat16, False, "softmax", mask=True)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_causal_large_norm_keys_full_size(poison, path, dtype):
    """Keys ×8 at d = 64 (‖ks‖²/2 ≈ 256): the fixed causal stabilizer maxⱼ‖ωⱼ‖²/2 − 40 sat ~190
    above every key's largest logit, so every feature flushed to 0 (output 0); the running max
    keeps them. (At ×12 fp32 math itself is past the fp32 tolerance: the float32 reference's dq
    is off by 1.4e-5, the logits being ~1000 in magnitude.) bf16 is checked forward only: its
    gradients here sat at the bf16 tolerance (dk 1.63e-2 against 1.6e-2 on the H200), the
    attention being this peaked; fp32 checks the backward."""
    bf16 = dtype == "bf16"
    _check(2, 4, 2053, 2053, 64, 256, DTYPES[dtype], True, "softmax", mask=True, backward=not bf16, key_scale=8.0)


def test_long_sequence_forward(poison, path):
    """B=1, H=12, N=65536 (the benchmark's long row): forward only, against fp64."""
    _check(1, 12, 65536, 65536, 64, 256, torch.bfloat16, False, "softmax", mask=False, backward=False)
    _check(1, 12, 65536, 65536, 64, 256, torch.bfloat16, True, "softmax", mask=False, backward=False)


def test_offsets_past_int32(poison, monkeypatch):
    """B·H = 520 heads at N = 16384, d = E = 64, m = 256, bf16, causal, on the chunked kernels:
    the key scan's per-chunk states hold 520·256·256·64 > 2³¹ elements, so offsets into them wrap
    in int32 (the last heads read and write outside the buffer). The first and last heads match
    the float64 reference, forward and the training backward."""
    from panther.kernels.performer import triton as tk

    monkeypatch.setattr(tk, "PATH", "chunked")
    B, H, N, D, m = 1, 520, 16384, 64, 256
    q, k, v, omega, _ = _inputs(B, H, N, N, D, m, torch.bfloat16, False)
    scale = D**-0.5
    out, stats = tk.performer_attention_train(q, k, v, omega, None, "softmax", True, scale)
    grad = torch.randn_like(out)
    got = tk.performer_attention_backward(grad, q, k, v, omega, None, "softmax", True, scale, out=out, stats=stats)
    for h in (0, H - 1):
        one = [t[:, h : h + 1].double() for t in (q, k, v)] + [omega[h : h + 1].double()]
        assert_close(out[:, h : h + 1], ref.performer_attention(*one, None, "softmax", True, scale), name=f"out {h}")
        want = ref.performer_attention_backward(grad[:, h : h + 1].double(), *one, None, "softmax", True, scale)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert_close(a[:, h : h + 1], b, name=f"{name} {h}")


@pytest.mark.parametrize("train", [False, True], ids=["op", "train_op"])
@pytest.mark.parametrize("D", [64, 256], ids=["d64", "d256"])
def test_op_under_compile(poison, D, train):
    """torch.ops.panther.performer_attention (and the training op) on CUDA under torch.compile
    (triton_op + wrap_triton; D = 256: the head dim in blocks)."""
    ops = pytest.importorskip("panther.ops.attention")
    q, k, v, omega, key_mask = _inputs(2, 4, 1000, 1000, D, 256, torch.bfloat16, True, E=64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        if train:
            return ops.performer_attention_train(q, k, v, omega, key_mask, "softmax", True, 0.125)[0]
        return ops.performer_attention(q, k, v, omega, key_mask, "softmax", True, 0.125)

    out = torch.compile(f, fullgraph=True)(q, k, v)
    up = [t.detach().double() for t in (q, k, v, omega)]
    exp = ref.performer_attention(*up, key_mask, "softmax", True, 0.125)
    assert_close(out, exp, name="compiled out")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = ref.performer_attention_backward(grad.double(), *up, key_mask, "softmax", True, 0.125)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, name=f"compiled {name}")


@pytest.mark.parametrize("train", [False, True], ids=["op", "train_op"])
def test_held_tile_output_pass_under_compile(poison, train):
    """The non-causal forward whose output pass the plan runs as chunked._out_pass_kernel (bf16,
    d = 64, m = 128: two feature tiles; B·H = 48 and N = 4096 give 13 chunks a program), eager and
    under torch.compile, against float64 (and, for the training op, its gradients)."""
    ops = pytest.importorskip("panther.ops.attention")
    from panther.kernels.performer import triton as tk

    q, k, v, omega, key_mask = _inputs(4, 12, 4096, 4096, 64, 128, torch.bfloat16, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        if train:
            return ops.performer_attention_train(q, k, v, omega, key_mask, "softmax", False, 0.125)[0]
        return ops.performer_attention(q, k, v, omega, key_mask, "softmax", False, 0.125)

    up = [t.detach().double() for t in (q, k, v, omega)]
    exp = ref.performer_attention(*up, key_mask, "softmax", False, 0.125)
    tk._PLANS.clear()
    assert_close(f(q, k, v), exp, name="eager out")
    assert any(getattr(p, "out_pass", None) is not None for p in tk._PLANS.values())
    out = torch.compile(f, fullgraph=True)(q, k, v)
    assert_close(out, exp, name="compiled out")
    if train:
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = ref.performer_attention_backward(grad.double(), *up, key_mask, "softmax", False, 0.125)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert_close(a, b, name=f"compiled {name}")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_wide_head_dim_full_size(poison, dtype, causal):
    """sinSRPE's shape (codes of R = 256 for q and k): B=2, H=4, N=2048, D=256, E=64, m=256, with a
    key mask; the head dim runs in blocks of D_BLOCK. Unit-entry ω, causal too (a fixed causal
    stabilizer maxⱼ‖ωⱼ‖²/2 − 40 sat ~100 above the logits here, past fp32's range)."""
    from panther.kernels.performer import triton as tk

    ops = pytest.importorskip("panther.ops.attention")
    q, _, v, omega, _ = _inputs(2, 4, 8, 8, 256, 256, DTYPES[dtype], False, E=64)
    assert tk.supports(q, v, omega) and ops._impl("performer_attention", q, v, omega) is tk.performer_attention
    _check(2, 4, 2048, 2048, 256, 256, DTYPES[dtype], causal, "softmax", mask=True, E=64)


@pytest.mark.parametrize("D", [64, 256], ids=["d64", "d256"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_repeated_calls_launch_directly(poison, D, causal):
    """The second call of a shape runs its cached plan's compiled kernels directly (no Triton
    dispatch): bit-identical to the first call, and both match the float64 reference."""
    from panther.kernels import _launch
    from panther.kernels.performer import triton as tk

    q, k, v, omega, key_mask = _inputs(2, 4, 1000, 1000, D, 256, torch.bfloat16, True, E=64, omega_scale=0.5)
    scale = D**-0.5
    args = (omega, key_mask, "softmax", causal, scale)
    up = [t.double() for t in (q, k, v, omega)]
    grad = torch.randn(2, 4, 1000, 64, device="cuda").to(torch.bfloat16)
    exp = ref.performer_attention(*up, key_mask, "softmax", causal, scale)
    want = ref.performer_attention_backward(grad.double(), *up, key_mask, "softmax", causal, scale)
    outs, grads = [], []
    for _ in range(3):
        outs.append(tk.performer_attention(q, k, v, *args))
        grads.append(tk.performer_attention_backward(grad, q, k, v, *args))
    torch.cuda.synchronize()
    assert_close(outs[0], exp, name="out")
    for name, a, b in zip(("dq", "dk", "dv"), grads[0], want):
        assert_close(a, b, name=name)
    for out, gs in zip(outs[1:], grads[1:]):
        assert torch.equal(out, outs[0])
        assert all(torch.equal(a, b) for a, b in zip(gs, grads[0]))
    plans = [p for p in tk._PLANS.values() if p.cfg.D == D and p.cfg.causal == causal and p.cfg.N == 1000]
    # One forward and one backward plan, of whichever family the dispatch picked for each.
    assert len(plans) == 2 and {type(p).__name__.endswith("ForwardPlan") for p in plans} == {True, False}
    if _launch.FAST_LAUNCH:
        # Every launch of the plans, the chunked plans' scans included.
        parts = [x for p in plans for x in vars(p).values()]
        parts += [x for s in parts if hasattr(s, "segment") for x in (s.scan, s.segment)]
        launches = [x for x in parts if isinstance(x, _launch.Launch)]
        assert launches and all(lc.compiled is not None for lc in launches)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_apply_in_eager_mode_matches_reference(poison, causal):
    """performer_attention_apply (what RandMultiHeadAttention calls) in eager CUDA: the training
    kernels without the custom-op dispatch (its autograd node is _EagerPerformer's), output and
    gradients against float64; without grad (the plain kernels) the output matches too."""
    ops = pytest.importorskip("panther.ops.attention")
    q, k, v, omega, key_mask = _inputs(2, 4, 1000, 1000, 64, 256, torch.bfloat16, True)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = ops.performer_attention_apply(qg, kg, vg, omega, key_mask, "softmax", causal, 0.125)
    assert type(out.grad_fn).__name__ == "_EagerPerformerBackward"
    up = [t.double() for t in (q, k, v, omega)]
    assert_close(out, ref.performer_attention(*up, key_mask, "softmax", causal, 0.125), name="out")
    with torch.no_grad():
        plain = ops.performer_attention_apply(q, k, v, omega, key_mask, "softmax", causal, 0.125)
    assert_close(plain, ref.performer_attention(*up, key_mask, "softmax", causal, 0.125), name="out (no grad)")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qg, kg, vg), grad)
    want = ref.performer_attention_backward(grad.double(), *up, key_mask, "softmax", causal, 0.125)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, name=name)
