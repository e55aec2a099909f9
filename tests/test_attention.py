"""RandMultiHeadAttention and the ``panther::performer_attention`` ops.

Covers: opcheck and float64 gradcheck of the ops; convergence to exact softmax attention as the
number of random features grows; causality; key-mask equivalence with removing the keys;
dropout; ``from_mha``; state_dict round trips; dtype/device; RNG reproducibility; every
validation error; torch.compile; the spec's example.
"""

from __future__ import annotations

import copy
import math
import re
import time

import pytest
import torch
import torch.nn.functional as F
from panther.kernels.performer import reference as ref
from panther_testing import assert_close
from test_spec_examples import BLOCKS

import panther as pr
from panther.features import orthogonal_random_features
from panther.nn import RandMultiHeadAttention
from panther.nn.pawXimpl import sinSRPE

F64 = torch.float64
KERNELS = ("softmax", "relu")

# Quality bounds: relative RMS error of the layer's output against exact softmax attention
# (float64, E=32, 4 heads, inputs 0.5·N(0, 1), mean of 3 seeds). Measured: 0.28 (m=16),
# 0.075 (m=256), 0.022 (m=4096): the 1/√m of a Monte Carlo estimate. (Positive random
# features lose accuracy fast as ‖q‖, ‖k‖ grow: at inputs N(0, 1) the same errors are 0.70,
# 0.39, 0.17.)
INPUT_SCALE = 0.5
EXACT_MAX_ERR = {16: 0.45, 256: 0.12, 4096: 0.04}
# from_mha at m = 4096 against nn.MultiheadAttention, same input scale (measured 0.010).
FROM_MHA_MAX_ERR = 0.03


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(E=16, H=2, m=32, seed=0, **kw) -> RandMultiHeadAttention:
    kw.setdefault("dtype", F64)
    return RandMultiHeadAttention(E, H, m, generator=gen(seed), **kw)


def exact(layer: RandMultiHeadAttention, query, key, value, key_mask=None, causal=False):
    """The layer's projections around exact softmax attention (F.scaled_dot_product_attention)."""
    B, Nq, E = query.shape
    Nk, H, D = key.shape[1], layer.num_heads, layer.head_dim

    def heads(x, n):
        return x.reshape(B, n, H, D).transpose(1, 2)

    q, k, v = heads(layer.q_proj(query), Nq), heads(layer.k_proj(key), Nk), heads(layer.v_proj(value), Nk)
    mask = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :].bool()
    if causal:
        mask = mask & torch.ones(Nq, Nk, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scale)
    return layer.out_proj(out.transpose(1, 2).reshape(B, Nq, E))


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

# (kernel_fn, causal, masked): every value of each flag, in a covering set of four cases.
OP_CASES = [("softmax", False, False), ("softmax", True, True), ("relu", False, True), ("relu", True, False)]


def op_inputs(causal, masked, N=6, Nk=None, seed=0):
    g = gen(seed)
    Nk = N if (causal or Nk is None) else Nk
    B, H, D, E, m = 2, 2, 3, 2, 5
    q = torch.randn(B, H, N, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, H, Nk, E, generator=g, dtype=F64, requires_grad=True)
    omega = orthogonal_random_features(H, m, D, generator=g, dtype=F64)
    mask = torch.rand(B, Nk, generator=g) > 0.3 if masked else None
    return q, k, v, omega, mask


# opcheck's dynamic-shape AOT test costs ~9 s of CPU per causal case: run it on one of them.
OPCHECK_NO_DYNAMIC = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("kernel_fn,causal,masked", OP_CASES, ids=lambda v: str(v))
def test_op_opcheck_and_gradcheck(kernel_fn, causal, masked):
    q, k, v, omega, mask = op_inputs(causal, masked, Nk=None if causal else 4)
    args = (q, k, v, omega, mask, kernel_fn, causal, 0.5)
    utils = OPCHECK_NO_DYNAMIC if (causal and kernel_fn == "relu") else "ALL"
    torch.library.opcheck(torch.ops.panther.performer_attention.default, args, test_utils=utils)
    # Causal: gradcheck's fast mode (a random projection vᵀJu against finite differences; the full
    # Jacobian costs ~10 s of CPU here). test_op_backward_across_chunks_* checks every entry.
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.panther.performer_attention(q, k, v, omega, mask, kernel_fn, causal, 0.5),
        (q, k, v),
        fast_mode=causal,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_train_op_opcheck_and_gradcheck(causal):
    """The training op: opcheck, the same output as performer_attention, and its own autograd
    (through (out, stats) to the backward op) against finite differences."""
    q, k, v, omega, mask = op_inputs(causal, True)
    args = (q, k, v, omega, mask, "softmax", causal, 0.5)
    torch.library.opcheck(torch.ops.panther.performer_attention_train.default, args, test_utils=OPCHECK_NO_DYNAMIC)
    out, stats = torch.ops.panther.performer_attention_train(*args)
    assert torch.equal(out, torch.ops.panther.performer_attention(*args))
    assert stats.dtype == torch.float32 and not stats.requires_grad
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.panther.performer_attention_train(q, k, v, omega, mask, "softmax", causal, 0.5)[0],
        (q, k, v),
        fast_mode=causal,
    )


def test_layer_trains_through_the_train_op_and_infers_through_the_plain_one(monkeypatch):
    """RandMultiHeadAttention (performer_attention_apply; on CPU the ops) calls
    performer_attention_train when a gradient is needed and performer_attention otherwise (no
    stats kept for inference); both give the same output."""
    layer = RandMultiHeadAttention(8, 2, 6, iscausal=True, generator=gen(0)).double()
    x = torch.randn(2, 5, 8, generator=gen(1), dtype=F64)
    calls = []
    for name in ("performer_attention", "performer_attention_train"):
        op = getattr(torch.ops.panther, name)
        monkeypatch.setattr(torch.ops.panther, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    y_train = layer(x, x, x)[0]
    with torch.no_grad():
        y_infer = layer(x, x, x)[0]
    assert calls == ["performer_attention_train", "performer_attention"]
    assert torch.equal(y_train.detach(), y_infer)


def test_op_dispatch():
    from panther.ops import attention as ops_attention

    q, omega = torch.zeros(1, 1, 2, 4), torch.zeros(1, 8, 4)
    assert ops_attention._impl("performer_attention", q, q, omega) is ref.performer_attention
    d = q.double()
    assert ops_attention._impl("performer_attention_backward", d, d, omega.double()) is ref.performer_attention_backward
    assert ops_attention._triton_fn("no_such_function") is None


def test_backward_op_opcheck():
    q, k, v, omega, mask = op_inputs(True, True)
    grad = torch.randn(2, 2, 6, 2, dtype=F64)
    args = (grad, q.detach(), k.detach(), v.detach(), omega, mask, "softmax", True, 0.5)
    torch.library.opcheck(torch.ops.panther.performer_attention_backward.default, args, test_utils=OPCHECK_NO_DYNAMIC)
    out, stats = torch.ops.panther.performer_attention_train(*args[1:])
    saved = (*args, out.detach(), stats)
    torch.library.opcheck(torch.ops.panther.performer_attention_backward.default, saved, test_utils=OPCHECK_NO_DYNAMIC)


@pytest.mark.parametrize("key_scale", [1.0, 30.0], ids=["unit-keys", "large-norm-keys"])
@pytest.mark.parametrize("kernel_fn", KERNELS)
def test_op_backward_across_chunks_matches_dense_autograd(kernel_fn, key_scale):
    # N = 150 spans three 64-position chunks. The dense version forms φ(Q)φ(K)ᵀ (N×N) explicitly,
    # (softmax: in log space, normalized per query, so no stabilizer is involved), and torch
    # autograd differentiates it; the op's causal running-max stabilizer and chunked backward are
    # independent of it. Keys ×30 put ‖ks‖²/2 in the hundreds: a fixed causal stabilizer left
    # every key feature at 0 in fp32.
    q, k, v, omega, mask = op_inputs(True, True, N=150, seed=1)
    with torch.no_grad():
        k *= key_scale
    mask[:, 0] = True  # every query sees a key (the dense version below would divide 0 by 0)

    def dense(q, k, v):
        allow = torch.ones(150, 150, dtype=torch.bool).tril() & mask[:, None, None, :]
        if kernel_fn == "relu":
            phiq = ref.feature_map(q, omega, kernel_fn, 0.5, True, False)
            phik = ref.feature_map(k, omega, kernel_fn, 0.5, False, False, mask)
            a = (phiq @ phik.transpose(-1, -2)) * allow
        else:  # log φ(qᵢ)·φ(kⱼ) by logsumexp over features, normalized per query
            lq = ref._logits(q, omega, 0.5)[1]
            lk = ref._logits(k, omega, 0.5)[1]
            lw = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], -1).masked_fill(~allow, float("-inf"))
            a = torch.exp(lw - lw.amax(-1, keepdim=True).detach())
        return (a @ v) / a.sum(-1, keepdim=True)

    grad = torch.randn(2, 2, 150, 2, generator=gen(2), dtype=F64)
    want = torch.autograd.grad(dense(q, k, v), (q, k, v), grad)
    out = torch.ops.panther.performer_attention(q, k, v, omega, mask, kernel_fn, True, 0.5)
    assert_close(out, dense(q, k, v), name="out")
    got = torch.autograd.grad(out, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, name=f"d{name}")
    if key_scale > 1:  # fp32 keeps them too (the CPU op computes fp32 inputs in fp32)
        f32 = [t.detach().float() for t in (q, k, v)]
        out32 = torch.ops.panther.performer_attention(*f32, omega.float(), mask, kernel_fn, True, 0.5)
        assert_close(out32, dense(q, k, v).detach().float(), name="out fp32")


# ---------------------------------------------------------------------------------------------
# Quality: the softmax kernel approaches exact attention
# ---------------------------------------------------------------------------------------------


def test_approaches_exact_softmax_attention_as_m_grows():
    errs = {}
    for m in EXACT_MAX_ERR:
        e = []
        for seed in range(3):
            layer = make(E=32, H=4, m=m, seed=seed)  # weights drawn before omega: same for every m
            x = INPUT_SCALE * torch.randn(2, 40, 32, generator=gen(100 + seed), dtype=F64)
            with torch.no_grad():
                got, want = layer(x, x, x)[0], exact(layer, x, x, x)
            e.append(((got - want).norm() / want.norm()).item())
        errs[m] = sum(e) / len(e)
    msg = ", ".join(f"m={m}: {v:.4f}" for m, v in errs.items())
    assert errs[16] > errs[256] > errs[4096], msg
    for m, bound in EXACT_MAX_ERR.items():
        assert errs[m] < bound, msg


# ---------------------------------------------------------------------------------------------
# Causality, masks, shapes
# ---------------------------------------------------------------------------------------------


def test_causal_softmax_wide_features_and_large_norm_keys_match_float64():
    """Causal softmax stays right where a fixed key stabilizer flushed every feature to 0 in fp32
    (the output was the bias alone): sinSRPE codes of R = 256, and inputs ×12 at head dim 64
    (‖ks‖²/2 ≈ 580). The fp32 layer against its float64 copy; both far from the bias. Also
    under torch.compile."""
    x = torch.randn(2, 40, 32, generator=gen(7))
    spe = sinSRPE(2, 16, 8, 256, generator=gen(8))
    wide = make(E=32, m=64, kernel_fn="softmax", iscausal=True, SRPE=spe, dtype=torch.float32)
    big = RandMultiHeadAttention(128, 2, 64, iscausal=True, generator=gen(9))
    xb = 12 * torch.randn(2, 40, 128, generator=gen(10))
    for layer, inp in ((wide, x), (big, xb)):
        with torch.no_grad():
            got = layer(inp, inp, inp)[0]
            want = copy.deepcopy(layer).double()(inp.double(), inp.double(), inp.double())[0]
            bias_only = layer.out_proj.bias.double().expand_as(want)
            assert (want - bias_only).norm() > 0.1 * want.norm()
            assert_close(got, want, name="fp32 vs float64")
            assert_close(torch.compile(layer, backend="eager")(inp, inp, inp)[0], got, name="compiled")


@pytest.mark.parametrize("kernel_fn", KERNELS)
@pytest.mark.parametrize("srpe", [False, True], ids=["plain", "srpe"])
def test_causal_outputs_ignore_later_positions(kernel_fn, srpe):
    N, t = 150, 70  # several chunks; perturb everything after position t
    spe = sinSRPE(2, 8, 4, 16, dtype=F64, generator=gen(3)) if srpe else None
    layer = make(m=24, kernel_fn=kernel_fn, iscausal=True, SRPE=spe)
    x = torch.randn(2, N, 16, generator=gen(4), dtype=F64)
    mask = torch.rand(2, N, generator=gen(5)) > 0.2
    y = x.clone()
    y[:, t + 1 :] = 100 * torch.randn(2, N - t - 1, 16, generator=gen(6), dtype=F64)
    mask2 = mask.clone()
    mask2[:, t + 1 :] = ~mask2[:, t + 1 :]
    with torch.no_grad():
        a = layer(x, x, x, mask)[0]
        b = layer(y, y, y, mask2)[0]
    assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() <= 1e-12
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3  # the perturbation did reach later outputs


@pytest.mark.parametrize("kernel_fn", KERNELS)
def test_causal_matches_exact_prefix_attention_at_large_m(kernel_fn):
    # Causal output i is non-causal attention of query i over keys ≤ i (same omega).
    layer = make(m=16, kernel_fn=kernel_fn, iscausal=True)
    free = make(m=16, kernel_fn=kernel_fn)
    x = torch.randn(1, 20, 16, generator=gen(7), dtype=F64)
    with torch.no_grad():
        full = layer(x, x, x)[0]
        for i in (0, 7, 19):
            part = free(x[:, i : i + 1], x[:, : i + 1], x[:, : i + 1])[0]
            assert_close(full[:, i : i + 1], part, name=f"position {i}")


@pytest.mark.parametrize("kernel_fn", KERNELS)
def test_key_mask_equals_removing_keys(kernel_fn):
    layer = make(m=32, kernel_fn=kernel_fn)
    q = torch.randn(3, 9, 16, generator=gen(8), dtype=F64)
    kv = torch.randn(3, 13, 16, generator=gen(9), dtype=F64)
    mask = torch.rand(3, 13, generator=gen(10)) > 0.4
    mask[:, 0] = True
    with torch.no_grad():
        out = layer(q, kv, kv, mask)[0]
        for b in range(3):
            kept = kv[b : b + 1, mask[b]]
            assert_close(out[b : b + 1], layer(q[b : b + 1], kept, kept)[0], name=f"batch {b}")
        # 0/1 ints and floats are the same mask
        assert torch.equal(layer(q, kv, kv, mask.long())[0], out)
        assert torch.equal(layer(q, kv, kv, mask.to(F64))[0], out)
        # a fully masked row gets no attention output: only the output projection's bias
        mask[1] = False
        empty = layer(q, kv, kv, mask)[0][1]
    assert torch.equal(empty, layer.out_proj.bias.expand_as(empty))


def test_key_mask_matches_exact_masked_attention_at_large_m():
    layer = make(m=4096)
    x = INPUT_SCALE * torch.randn(2, 12, 16, generator=gen(11), dtype=F64)
    mask = torch.rand(2, 12, generator=gen(12)) > 0.5
    with torch.no_grad():
        assert_close(layer(x, x, x, mask)[0], exact(layer, x, x, x, mask), rtol=0.05)


def test_leading_dims_and_unbatched_input():
    layer = make()
    x = torch.randn(2, 3, 7, 16, generator=gen(13), dtype=F64)
    mask = torch.rand(2, 3, 7, generator=gen(14)) > 0.3
    with torch.no_grad():
        out = layer(x, x, x, mask)[0]
        flat = layer(x.reshape(6, 7, 16), x.reshape(6, 7, 16), x.reshape(6, 7, 16), mask.reshape(6, 7))[0]
        assert out.shape == (2, 3, 7, 16)
        assert_close(out.reshape(6, 7, 16), flat)
        single = layer(x[0, 0], x[0, 0], x[0, 0], mask[0, 0])[0]
        assert single.shape == (7, 16)
        assert_close(single, out[0, 0])


@pytest.mark.parametrize("kernel_fn", KERNELS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_batch_and_sequences(kernel_fn, causal):
    """A batch of 0, a sequence of 0, and (non-causal) queries with no keys at all, as
    nn.MultiheadAttention takes them: the right shapes, gradients of the right shapes, and the
    output projection's bias where a query sees no key (the class docstring's rule for masked ones)."""
    layer = make(kernel_fn=kernel_fn, iscausal=causal)
    cases = [((2, 0), (2, 0)), ((0, 5), (0, 5))] + ([] if causal else [((2, 3), (2, 0))])
    for (B, Nq), (_, Nk) in cases:
        q = torch.randn(B, Nq, 16, generator=gen(40), dtype=F64, requires_grad=True)
        kv = torch.randn(B, Nk, 16, generator=gen(41), dtype=F64, requires_grad=True)
        out = layer(q, kv, kv)[0]
        assert out.shape == (B, Nq, 16)
        assert_close(out, layer.out_proj.bias.expand_as(out))
        out.sum().backward()
        assert q.grad.shape == q.shape and kv.grad.shape == kv.shape


def test_cross_attention_with_other_key_length_and_kdim_vdim():
    layer = make(kdim=5, vdim=3)
    q = torch.randn(2, 4, 16, generator=gen(15), dtype=F64)
    k = torch.randn(2, 9, 5, generator=gen(16), dtype=F64)
    v = torch.randn(2, 9, 3, generator=gen(17), dtype=F64)
    out, weights = layer(q, k, v)
    assert out.shape == (2, 4, 16) and weights is None


def test_backward_reaches_every_parameter():
    spe = sinSRPE(2, 8, 4, 16, dtype=F64, generator=gen(18))
    layer = make(SRPE=spe, iscausal=True)
    x = torch.randn(2, 10, 16, generator=gen(19), dtype=F64)
    layer(x, x, x)[0].square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "omega" not in dict(layer.named_parameters())


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


def test_dropout_eval_deterministic_train_random_and_unbiased():
    layer = make(m=16, dropout=0.3)
    plain = make(m=16, dropout=0.0)
    x = torch.randn(1, 6, 16, generator=gen(20), dtype=F64)
    with torch.no_grad():
        layer.eval()
        ref_out = plain(x, x, x)[0]
        assert torch.equal(layer(x, x, x)[0], ref_out)
        assert torch.equal(layer(x, x, x)[0], layer(x, x, x)[0])
        layer.train()
        a, b = layer(x, x, x)[0], layer(x, x, x)[0]
        assert not torch.equal(a, b) and not torch.equal(a, ref_out)
        # E[out] = the no-dropout output: average over 4000 independent draws (batch copies).
        many = layer(x.expand(4000, 6, 16), x.expand(4000, 6, 16), x.expand(4000, 6, 16))[0]
    mean, sem = many.mean(0), many.std(0) / math.sqrt(4000)
    assert ((mean - ref_out[0]).abs() <= 5 * sem + 1e-12).all()
    assert (mean - ref_out[0]).norm() / ref_out.norm() < 0.02


# ---------------------------------------------------------------------------------------------
# from_mha
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dims", [None, (5, 7)], ids=["packed", "kdim-vdim"])
def test_from_mha_copies_projections_and_approximates(kv_dims):
    kdim, vdim = kv_dims or (None, None)
    torch.manual_seed(21)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=vdim, dtype=F64).eval()
    layer = RandMultiHeadAttention.from_mha(mha, 4096, generator=gen(22)).eval()
    q = INPUT_SCALE * torch.randn(2, 11, 32, generator=gen(23), dtype=F64)
    k = INPUT_SCALE * torch.randn(2, 9, kdim or 32, generator=gen(24), dtype=F64)
    v = torch.randn(2, 9, vdim or 32, generator=gen(25), dtype=F64)
    E = 32
    if kv_dims is None:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        # Exact in its projections: the same numbers as the MHA's own linear maps.
        assert torch.equal(layer.q_proj(q), F.linear(q, wq, bq))
        assert torch.equal(layer.k_proj(k), F.linear(k, wk, bk))
        assert torch.equal(layer.v_proj(v), F.linear(v, wv, bv))
        x = torch.randn(2, 5, E, generator=gen(26), dtype=F64)
        assert torch.equal(layer.out_proj(x), mha.out_proj(x))
        got, want = layer(q, k, v)[0], mha(q, k, v, need_weights=False)[0]
    assert ((got - want).norm() / want.norm()).item() < FROM_MHA_MAX_ERR
    assert layer.dropout == mha.dropout and layer.num_heads == 4


def test_from_mha_without_bias_and_on_dtype():
    mha = torch.nn.MultiheadAttention(16, 2, bias=False, batch_first=True, dropout=0.1)
    layer = RandMultiHeadAttention.from_mha(mha, 64, kernel_fn="relu", iscausal=True, dropout=0.0)
    assert layer.q_proj.bias is None and layer.out_proj.bias is None
    assert layer.kernel_fn == "relu" and layer.iscausal and layer.dropout == 0.0
    assert layer.omega.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_first": False}, "batch_first=True"),
        ({"batch_first": True, "add_bias_kv": True}, "add_bias_kv"),
        ({"batch_first": True, "add_zero_attn": True}, "add_zero_attn"),
    ],
    ids=["seq-first", "bias-kv", "zero-attn"],
)
def test_from_mha_rejects_unsupported(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandMultiHeadAttention.from_mha(torch.nn.MultiheadAttention(16, 2, **kwargs), 32)


def test_from_mha_rejects_other_modules():
    with pytest.raises(TypeError, match="mha must be a torch.nn.MultiheadAttention"):
        RandMultiHeadAttention.from_mha(torch.nn.Linear(4, 4), 32)


# ---------------------------------------------------------------------------------------------
# State, dtype, device, RNG
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("srpe", [False, True], ids=["plain", "srpe"])
def test_state_dict_reproduces_outputs_bit_for_bit(srpe):
    def build(seed):
        spe = sinSRPE(2, 8, 4, 16, generator=gen(seed)) if srpe else None
        return RandMultiHeadAttention(16, 2, 32, SRPE=spe, iscausal=True, generator=gen(seed))

    a, b = build(0), build(1)
    x = torch.randn(2, 70, 16, generator=gen(27))
    assert not torch.equal(a(x, x, x)[0], b(x, x, x)[0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, x, x)[0], b(x, x, x)[0])
    assert "omega" in a.state_dict() and ("SRPE.Z1" in a.state_dict()) == srpe


def test_dtype_device_and_to(device):
    spe = sinSRPE(2, 8, 4, 16, device=device, dtype=F64)
    layer = RandMultiHeadAttention(16, 2, 32, SRPE=spe, device=device, dtype=F64)
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert all(t.dtype == F64 and t.device.type == device.type for t in tensors)
    x = torch.randn(2, 5, 16, device=device, dtype=F64)
    assert layer(x, x, x)[0].dtype == F64
    layer.to(torch.float32)
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert all(t.dtype == torch.float32 for t in tensors)
    x32 = x.float()
    out = layer(x32, x32, x32)[0]
    assert out.dtype == torch.float32 and out.device.type == device.type
    with pytest.raises(ValueError, match="query has dtype torch.float64"):
        layer(x, x32, x32)
    cpu = layer.to("cpu")
    assert cpu(x32.cpu(), x32.cpu(), x32.cpu())[0].device.type == "cpu"


def test_generator_reproducible_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = RandMultiHeadAttention(16, 2, 32, generator=gen(5))
    b = RandMultiHeadAttention(16, 2, 32, generator=gen(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    c = RandMultiHeadAttention(16, 2, 32, generator=gen(6))
    assert not torch.equal(a.omega, c.omega) and not torch.equal(a.q_proj.weight, c.q_proj.weight)


def test_global_rng_reproducible_and_redraw():
    torch.manual_seed(9)
    a = RandMultiHeadAttention(16, 2, 32)
    torch.manual_seed(9)
    b = RandMultiHeadAttention(16, 2, 32)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    old = a.omega.clone()
    a.redraw_features(gen(1))
    assert not torch.equal(a.omega, old)
    assert torch.equal(a.omega, orthogonal_random_features(2, 32, 8, generator=gen(1)))


def test_init_matches_multihead_attention_statistics():
    # xavier-uniform on the packed (3E, E) in-projection (bound √(6/4E)), zero biases.
    E = 64
    layer = RandMultiHeadAttention(E, 4, 8, generator=gen(0))
    bound = math.sqrt(6 / (4 * E))
    w = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]).detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
        assert torch.equal(p.bias, torch.zeros_like(p.bias))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((15, 2, 8), {}, ValueError, r"embed_dim \(15\) must be divisible by num_heads \(2\)"),
        ((16, 2, 8), {"kernel_fn": "gelu"}, ValueError, r"kernel_fn must be one of \['softmax', 'relu'\]"),
        ((16, 2, 0), {}, ValueError, "num_random_features must be a positive integer"),
        ((16, 0, 8), {}, ValueError, "num_heads must be a positive integer"),
        ((0, 1, 8), {}, ValueError, "embed_dim must be a positive integer"),
        ((16, 2, 8.0), {}, TypeError, "num_random_features must be an int"),
        ((16, 2, 8), {"dropout": 1.0}, ValueError, r"dropout must be in \[0.0, 1.0\)"),
        ((16, 2, 8), {"dropout": -0.1}, ValueError, r"dropout must be in \[0.0, 1.0\)"),
        ((16, 2, 8), {"iscausal": 1}, TypeError, "iscausal must be a bool"),
        ((16, 2, 8), {"bias": "yes"}, TypeError, "bias must be a bool"),
        ((16, 2, 8), {"SRPE": torch.nn.Linear(2, 2)}, TypeError, "SRPE must be a panther.nn.pawXimpl.sinSRPE"),
        ((16, 2, 8), {"SRPE": sinSRPE(4, 4, 2, 8)}, ValueError, "SRPE has num_heads=4, perHead_in=4"),
        ((16, 2, 8), {"SRPE": sinSRPE(2, 8, 2, 8, dtype=F64)}, ValueError, "SRPE is torch.float64 on cpu"),
        ((16, 2, 8), {"generator": 3}, TypeError, "generator must be a torch.Generator"),
        ((16, 2, 8), {"dtype": torch.int64}, TypeError, "dtype must be a floating-point"),
    ],
    ids=[
        "indivisible", "kernel_fn", "m0", "heads0", "embed0", "m-float", "dropout1", "dropout-neg",
        "causal-int", "bias-str", "srpe-type", "srpe-shape", "srpe-dtype", "generator", "int-dtype",
    ],
)
def test_constructor_validation(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RandMultiHeadAttention(*args, **kwargs)


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda L: L(_x(16), _x(16), _x(16)), ValueError, "query must have at least 2 dimension"),
        (lambda L: L(_x(2, 5, 12), _x(2, 5, 16), _x(2, 5, 16)), ValueError, "query has 12 features"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 12), _x(2, 5, 16)), ValueError, "key has 12 features"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 16), _x(2, 5, 12)), ValueError, "value has 12 features"),
        (lambda L: L(_x(2, 5, 16, dtype=F64), _x(2, 5, 16), _x(2, 5, 16)), ValueError, "query has dtype torch.float64"),
        (lambda L: L(_x(2, 5, 16), _x(3, 5, 16), _x(3, 5, 16)), ValueError, "same batch dimensions"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 16), _x(2, 6, 16)), ValueError, "key and value must have the same"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 16), _x(2, 5, 16), torch.ones(2, 4)), ValueError,
         r"attention_mask must have shape \(batch, key_seq\) = \(2, 5\)"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 16), _x(2, 5, 16), torch.ones(5)), ValueError, "attention_mask must have shape"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 16), _x(2, 5, 16), torch.full((2, 5), float("-inf"))), ValueError,
         "hold only 0 and 1"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 16), _x(2, 5, 16), torch.full((2, 5), 2)), ValueError, "hold only 0 and 1"),
        (lambda L: L(_x(2, 5, 16), _x(2, 5, 16), _x(2, 5, 16), [[1] * 5] * 2), TypeError,
         "attention_mask must be a torch.Tensor"),
        (lambda L: L("x", _x(2, 5, 16), _x(2, 5, 16)), TypeError, "query must be a torch.Tensor"),
    ],
    ids=[
        "rank", "query-embed", "key-embed", "value-embed", "dtype", "batch", "kv-seq", "mask-shape",
        "mask-rank", "mask-additive", "mask-values", "mask-type", "query-type",
    ],
)
def test_forward_validation(call, exc, match):
    layer = RandMultiHeadAttention(16, 2, 8)
    with pytest.raises(exc, match=match):
        call(layer)


def test_causal_needs_equal_lengths():
    layer = RandMultiHeadAttention(16, 2, 8, iscausal=True)
    with pytest.raises(ValueError, match="causal attention needs equal query and key lengths, got 4 and 6"):
        layer(_x(2, 4, 16), _x(2, 6, 16), _x(2, 6, 16))


# ---------------------------------------------------------------------------------------------
# torch.compile and the spec
# ---------------------------------------------------------------------------------------------


def test_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    spe = sinSRPE(2, 8, 4, 16, generator=gen(30))
    layer = RandMultiHeadAttention(16, 2, 32, iscausal=True, SRPE=spe, generator=gen(31)).eval()
    x = torch.randn(2, 70, 16, generator=gen(32))
    mask = torch.rand(2, 70, generator=gen(33)) > 0.2
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    with torch.no_grad():
        got, weights = compiled(x, x, x, mask)
        want = layer(x, x, x, mask)[0]
    assert weights is None
    assert_close(got, want)


def test_spec_attention_example(capsys):
    (code,) = [b for b in BLOCKS if "RandMultiHeadAttention(" in b]
    namespace: dict = {}
    start = time.perf_counter()
    exec(compile(code, "<spec attention example>", "exec"), namespace)  # noqa: S102
    seconds = time.perf_counter() - start
    assert "Output shape: torch.Size([32, 100, 512])" in capsys.readouterr().out
    assert namespace["attn_weights"] is None and torch.isfinite(namespace["output"]).all()
    assert isinstance(namespace["randomized_attention"].SRPE, sinSRPE)
    print(f"spec attention example: {seconds:.2f} s on {namespace['device']}")


def test_exports():
    assert pr.nn.RandMultiHeadAttention is RandMultiHeadAttention
    assert pr.nn.pawXimpl.sinSRPE is sinSRPE
    assert re.search(r"num_random_features=32", repr(RandMultiHeadAttention(16, 2, 32)))
