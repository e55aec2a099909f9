"""torch.func transforms and forward-mode AD through the layers.

The custom ops carry reverse-mode formulas only, so under functorch's jvp/jacfwd they would give
zero tangents without an error, and vmap of their autograd wrapper fails; the layers then compute
with the ops' plain-PyTorch math (panther.ops._transforms). References: the dense map each layer
applies (dense_weight), and reverse-mode Jacobians through the ops outside any transform.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacfwd, jvp, vmap

import panther as pr
from panther_testing import assert_close

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_tangent(f, x: torch.Tensor, t: torch.Tensor, tangent: torch.Tensor) -> None:
    """tangent = J·t, checked as uᵀ(J·t) = (Jᵀ·u)ᵀ·t for random u, with Jᵀ·u by torch.autograd
    through the ops' backward (no transform): one backward instead of a whole Jacobian."""
    x = x.detach().requires_grad_(True)
    out = f(x)
    u = torch.randn(out.shape, generator=gen(99), dtype=out.dtype)
    (vjp,) = torch.autograd.grad(out, x, u)
    assert_close((tangent * u).sum(), (vjp * t).sum())


def layers():
    g = gen(0)
    return {
        "sklinear": (pr.nn.SKLinear(12, 7, 2, 3, dtype=F64, generator=g), (3, 12)),
        "lowrank": (pr.nn.LowRankLinear(12, 7, 3, dtype=F64, generator=g), (3, 12)),
        "skconv": (pr.nn.SKConv2d(3, 5, 3, padding=1, num_terms=1, low_rank=2, dtype=F64, generator=g), (2, 3, 6, 6)),
    }


@pytest.mark.filterwarnings("ignore:.*values \\(trainable S and fixed U\\)")
@pytest.mark.parametrize("name", ["sklinear", "lowrank", "skconv"])
def test_jvp_and_jacfwd_match_the_dense_map(name):
    layer, shape = layers()[name]
    x = torch.randn(*shape, generator=gen(1), dtype=F64)
    t = torch.randn(*shape, generator=gen(2), dtype=F64)
    out, tangent = jvp(layer, (x,), (t,))
    assert_close(out, layer(x))
    check_tangent(layer, x, t, tangent)
    if name != "skconv":  # a linear map: the tangent is W·t (bias-free) for every row
        W = layer.dense_weight()
        assert_close(tangent, t @ W.t())
        assert_close(jacfwd(layer)(x[0]), W)
    with forward_ad.dual_level():
        dual_out = layer(forward_ad.make_dual(x, t))
        assert_close(forward_ad.unpack_dual(dual_out).tangent, tangent)


@pytest.mark.filterwarnings("ignore:.*values \\(trainable S and fixed U\\)")
@pytest.mark.parametrize("name", ["sklinear", "lowrank", "skconv"])
def test_per_sample_gradients_with_vmap(name):
    layer, shape = layers()[name]
    X = torch.randn(*shape, generator=gen(3), dtype=F64)
    params = dict(layer.named_parameters())

    def loss(p, xi):
        return functional_call(layer, p, (xi.unsqueeze(0),)).pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params, X)
    for i in range(X.shape[0]):
        want = torch.autograd.grad(layer(X[i : i + 1]).pow(2).sum(), list(params.values()))
        for (n, _), w in zip(params.items(), want):
            assert_close(got[n][i], w, name=f"{n}[{i}]")


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_jvp_matches_the_reverse_jacobian(kernel_fn, causal):
    layer = pr.nn.RandMultiHeadAttention(8, 2, 16, kernel_fn=kernel_fn, iscausal=causal, dtype=F64, generator=gen(4))
    x = torch.randn(2, 70, 8, generator=gen(5), dtype=F64)  # more than one causal chunk of 64
    t = torch.randn(2, 70, 8, generator=gen(6), dtype=F64)

    def f(z):
        return layer(z, z, z)[0]

    out, tangent = jvp(f, (x,), (t,))
    assert_close(out, f(x))
    check_tangent(f, x, t, tangent)
    assert tangent.abs().max() > 1e-3  # (not the zero tangent a reverse-only op would give)
