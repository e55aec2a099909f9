"""Second derivatives through the layers (``create_graph=True``: gradient penalties,
Hessian-vector products).

The backward ops have no derivative of their own; a backward that must itself be differentiable
runs the reference math outside them (panther/ops). References: ``torch.autograd.gradgradcheck``
in float64 (analytic against numerical second derivatives), and on CUDA the fp32 Triton path
against float64 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import panther as pr
from panther.ops.attention import performer_attention_apply
from panther.ops.conv import skconv2d_apply
from panther.ops.linear import lowrank_linear_apply, sklinear_apply
from panther_testing import RTOL_TF32, rel_err

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed, device="cpu", dtype=F64):
    # Drawn in float64 whatever the dtype: the same values for the fp32 and fp64 runs.
    return torch.randn(*shape, generator=gen(seed), dtype=F64).to(device, dtype)


def _leaf(*shape, seed, device="cpu", dtype=F64):
    return _rand(*shape, seed=seed, device=device, dtype=dtype).requires_grad_()


def _cases(device="cpu", dtype=F64):
    """name -> (function of the differentiable inputs, those inputs)."""
    L, n_in, k, n_out = 2, 7, 3, 5
    U1s = _rand(L, k, n_out, seed=1, device=device, dtype=dtype)
    U2s = _rand(L, n_in, k, seed=2, device=device, dtype=dtype)
    bias = _rand(n_out, seed=3, device=device, dtype=dtype)
    x = _leaf(4, n_in, seed=4, device=device, dtype=dtype)
    S1s, S2s = _leaf(L, n_in, k, seed=5, device=device, dtype=dtype), _leaf(L, k, n_out, seed=6, device=device, dtype=dtype)
    A, B = _leaf(n_in, 3, seed=7, device=device, dtype=dtype), _leaf(3, n_out, seed=8, device=device, dtype=dtype)
    c, o, kh = 2, 3, 3
    cU1 = _rand(L, k, o, seed=9, device=device, dtype=dtype)
    cU2 = _rand(L, k, c, kh, kh, seed=10, device=device, dtype=dtype)
    cx = _leaf(1, c, 5, 4, seed=11, device=device, dtype=dtype)
    cS1, cS2 = _leaf(L, k, c, kh, kh, seed=12, device=device, dtype=dtype), _leaf(L, k, o, seed=13, device=device, dtype=dtype)
    H, N, D, m = 2, 5, 4, 6
    omega = _rand(H, m, D, seed=14, device=device, dtype=dtype)
    q, kk, v = (_leaf(1, H, N, D, seed=s, device=device, dtype=dtype) for s in (15, 16, 17))
    mask = torch.tensor([[True, True, False, True, True]], device=device)
    return {
        "sklinear": (lambda x, a, b: sklinear_apply(x, a, b, U1s, U2s, bias), (x, S1s, S2s)),
        "lowrank": (lambda x, a, b: lowrank_linear_apply(x, a, b, bias, 0.5), (x, A, B)),
        "skconv2d": (lambda x, a, b: skconv2d_apply(x, a, b, cU1, cU2, None, [1, 1], [1, 1]), (cx, cS1, cS2)),
        "performer": (lambda q, k, v: performer_attention_apply(q, k, v, omega, mask, "softmax", False, 0.5), (q, kk, v)),
        "performer-causal": (lambda q, k, v: performer_attention_apply(q, k, v, omega, None, "softmax", True, 0.5), (q, kk, v)),
        "performer-relu": (lambda q, k, v: performer_attention_apply(q, k, v, omega, None, "relu", True, 0.5), (q, kk, v)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_gradgradcheck(name):
    fn, inputs = _cases()[name]
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def _penalty_grads(fn, inputs):
    """Gradients of the gradient penalty ‖∂(Σ y³)/∂inputs‖² with respect to the inputs."""
    y = fn(*inputs)
    first = torch.autograd.grad(y.pow(3).sum(), inputs, create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    return torch.autograd.grad(penalty, inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path needs CUDA")
@pytest.mark.parametrize("name", list(_cases()))
def test_second_derivatives_on_cuda_match_float64(name):
    fn_c, inputs_c = _cases("cuda", torch.float32)[name]
    fn_r, inputs_r = _cases("cpu", F64)[name]
    got = _penalty_grads(fn_c, inputs_c)
    want = _penalty_grads(fn_r, inputs_r)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= RTOL_TF32


def test_layer_gradient_penalty_matches_the_dense_layer():
    layer = pr.nn.SKLinear(24, 20, 2, 2, dtype=F64, generator=gen(0))
    x = _leaf(4, 24, seed=1)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    gx.square().sum().backward()
    got = (x.grad, layer.S1s.grad, layer.S2s.grad)
    x2 = x.detach().clone().requires_grad_()
    S1s, S2s = (p.detach().clone().requires_grad_() for p in (layer.S1s, layer.S2s))
    W = ((S1s @ layer.U1s + layer.U2s @ S2s).sum(0) / (2 * layer.num_terms)).t()  # dense (out, in)
    y2 = x2 @ W.t() + layer.bias
    (gx2,) = torch.autograd.grad(y2.pow(3).sum(), x2, create_graph=True)
    gx2.square().sum().backward()
    for a, b in zip(got, (x2.grad, S1s.grad, S2s.grad)):
        assert rel_err(a, b) <= 1e-10
