"""SKLinear / SKLinear_triton and the panther::sklinear / panther::lowrank_linear ops (CPU)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import panther as pr
from panther_testing import assert_close, rel_err

F64 = torch.float64


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*a, **kw)


def formula(layer: pr.nn.SKLinear, x: torch.Tensor) -> torch.Tensor:
    """y = 1/(2L) Σ (x S1 U1 + x U2 S2) + b, term by term in float64."""
    S1, S2, U1, U2 = (t.detach().to(F64) for t in (layer.S1s, layer.S2s, layer.U1s, layer.U2s))
    x = x.to(F64)
    y = sum(x @ S1[i] @ U1[i] + x @ U2[i] @ S2[i] for i in range(layer.num_terms)) / (2 * layer.num_terms)
    return y + layer.bias.detach().to(F64) if layer.bias is not None else y


# ----------------------------------------------------------------------------------- function


@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 37), (37,), (1, 37)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_formula(shape, bias):
    layer = pr.nn.SKLinear(37, 29, num_terms=2, low_rank=3, bias=bias)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 29)
    assert_close(y, formula(layer, x))


def test_dense_weight_is_the_applied_map():
    layer = pr.nn.SKLinear(20, 12, 2, 2, dtype=F64)
    x = torch.randn(7, 20, dtype=F64)
    assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias)


def test_sketches_come_from_the_weight():
    """S1ᵢ = Wᵀ·U1ᵢᵀ and S2ᵢ = U2ᵢᵀ·Wᵀ for the W it was given; U entries are ±1/√k."""
    W = torch.randn(12, 20, dtype=F64)
    layer = pr.nn.SKLinear(20, 12, 3, 2, W_init=W, dtype=F64)
    for i in range(3):
        assert_close(layer.S1s[i], W.t() @ layer.U1s[i].t())
        assert_close(layer.S2s[i], layer.U2s[i].t() @ W.t())
    for U in (layer.U1s, layer.U2s):
        assert torch.equal(U.abs(), torch.full_like(U, 1 / math.sqrt(2)))
    assert {n for n, _ in layer.named_parameters()} == {"S1s", "S2s", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"U1s", "U2s"}


def _predicted_mse(W: torch.Tensor, x: torch.Tensor, L: int, k: int) -> float:
    """Exact E‖y − x·Wᵀ‖² of the Rademacher two-sided sketch (summed over the batch).

    Term x·S1·U1 = a·U1ᵀU1 with a = x·Wᵀ: variance (out − 1)·‖a‖²/k.
    Term x·U2·S2 = x·U2U2ᵀ·Wᵀ with M = WᵀW: variance (‖x‖²·tr M + xᵀMx − 2·Σᵢ xᵢ²·Mᵢᵢ)/k.
    The layer averages 2L independent terms, L of each kind: MSE = (v1 + v2)/(4L).
    """
    out = W.shape[0]
    a = x @ W.t()
    M = W.t() @ W
    v1 = (out - 1) * (a * a).sum(-1) / k
    v2 = ((x * x).sum(-1) * M.trace() + ((x @ M) * x).sum(-1) - 2 * (x * x * M.diagonal()).sum(-1)) / k
    return float(((v1 + v2) / (4 * L)).sum())


@pytest.mark.parametrize("L,k", [(1, 2), (1, 8), (2, 4), (1, 32)])
def test_error_matches_sketch_variance(L, k):
    """The measured MSE against the dense layer equals the sketch's exact variance (±15%).

    The bound is a 5-sigma band for 400 draws (relative std of a mean of 400 roughly
    chi-square-like terms ≈ 0.05), so a biased or mis-scaled sketch fails it.
    """
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 40, generator=g, dtype=F64)
    x = torch.randn(6, 40, generator=g, dtype=F64)
    ref = x @ W.t()
    draws = 400
    mse = 0.0
    for _ in range(draws):
        layer = quiet(pr.nn.SKLinear, 40, 24, L, k, W_init=W, bias=False, dtype=F64, generator=g)
        with torch.no_grad():
            mse += float(((layer(x) - ref) ** 2).sum())
    ratio = (mse / draws) / _predicted_mse(W, x, L, k)
    assert 0.85 < ratio < 1.15, f"measured/predicted MSE = {ratio:.3f}"


def test_error_shrinks_as_low_rank_grows():
    """Relative error against the dense layer falls like 1/√k (the sketch's standard deviation)."""
    g = torch.Generator().manual_seed(2)
    dense = nn.Linear(200, 150)
    x = torch.randn(32, 200)
    ref = dense(x).detach()
    errs = {}
    for k in (4, 16, 64):
        errs[k] = sum(
            rel_err(quiet(pr.nn.SKLinear.from_linear, dense, 1, k, generator=g)(x), ref) for _ in range(8)
        ) / 8
    # Each 4x in k should halve the error; allow 1.6x..2.5x per step.
    for lo, hi in ((4, 16), (16, 64)):
        assert 1.6 < errs[lo] / errs[hi] < 2.5, errs


def test_unbiased_average_converges_to_dense():
    g = torch.Generator().manual_seed(3)
    dense = nn.Linear(30, 20).double()
    x = torch.randn(4, 30, dtype=F64)
    n = 400
    with torch.no_grad():
        draws = [quiet(pr.nn.SKLinear.from_linear, dense, 1, 4, generator=g)(x) for _ in range(n + 8)]
        ref = dense(x)
    mean = sum(draws[:n]) / n
    e_mean = rel_err(mean, ref)
    e_single = sum(rel_err(d, ref) for d in draws[n:]) / 8
    # n independent draws: the error of the mean is ~1/√n of one draw's.
    assert e_mean < 2 * e_single / math.sqrt(n), (e_mean, e_single)


def test_from_linear_copies_bias_and_device_dtype():
    dense = nn.Linear(64, 48).to(F64)
    layer = pr.nn.SKLinear.from_linear(dense, 1, 4)
    assert torch.equal(layer.bias, dense.bias)
    assert layer.S1s.dtype == F64 and layer.bias is not dense.bias
    no_bias = pr.nn.SKLinear.from_linear(nn.Linear(64, 48, bias=False), 1, 4)
    assert no_bias.bias is None
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        pr.nn.SKLinear.from_linear(nn.Conv2d(3, 3, 1), 1, 4)


# -------------------------------------------------------------------------------- ops / autograd


def _op_args(L=2, n_in=11, n_out=7, k=3, T=(2, 5), dtype=F64, bias=True):
    g = torch.Generator().manual_seed(4)
    mk = lambda *s, rg=True: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(rg)  # noqa: E731
    x = mk(*T, n_in)
    return (x, mk(L, n_in, k), mk(L, k, n_out), mk(L, k, n_out, rg=False), mk(L, n_in, k, rg=False),
            mk(n_out) if bias else None)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sklinear_op_gradcheck_and_opcheck(bias):
    x, S1, S2, U1, U2, b = _op_args(bias=bias)
    fn = lambda x, S1, S2, *b: torch.ops.panther.sklinear(x, S1, S2, U1, U2, b[0] if b else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, S1, S2) + ((b,) if bias else ()))
    torch.library.opcheck(torch.ops.panther.sklinear.default, (x, S1, S2, U1, U2, b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lowrank_op_gradcheck_and_opcheck(bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 9, generator=g, dtype=F64, requires_grad=True)
    A = torch.randn(9, 3, generator=g, dtype=F64, requires_grad=True)
    B = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=F64, requires_grad=True) if bias else None
    fn = lambda x, A, B, *b: torch.ops.panther.lowrank_linear(x, A, B, b[0] if b else None, 0.25)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B) + ((b,) if bias else ()))
    torch.library.opcheck(torch.ops.panther.lowrank_linear.default, (x, A, B, b, 0.25))
    assert_close(fn(x, A, B, *((b,) if bias else ())), 0.25 * (x @ A @ B) + (b if bias else 0))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_train_ops_gradcheck_and_opcheck(bias):
    # The training ops return (y, h = x·A) and their backward reads h instead of recomputing it.
    x, S1, S2, U1, U2, b = _op_args(bias=bias)
    fn = lambda x, S1, S2, *b: torch.ops.panther.sklinear_train(x, S1, S2, U1, U2, b[0] if b else None)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, S1, S2) + ((b,) if bias else ()))
    torch.library.opcheck(torch.ops.panther.sklinear_train.default, (x, S1, S2, U1, U2, b))
    y, h = torch.ops.panther.sklinear_train(x, S1, S2, U1, U2, b)
    assert_close(y, torch.ops.panther.sklinear(x, S1, S2, U1, U2, b))
    assert_close(h, torch.cat([x @ S1[0], x @ S1[1], x @ U2[0], x @ U2[1]], dim=-1))
    assert not h.requires_grad
    g = torch.Generator().manual_seed(7)
    A = torch.randn(11, 3, generator=g, dtype=F64, requires_grad=True)
    B = torch.randn(3, 7, generator=g, dtype=F64, requires_grad=True)
    lb = torch.randn(7, generator=g, dtype=F64, requires_grad=True) if bias else None
    fn = lambda x, A, B, *b: torch.ops.panther.lowrank_linear_train(x, A, B, b[0] if b else None, 0.5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B) + ((lb,) if bias else ()))
    torch.library.opcheck(torch.ops.panther.lowrank_linear_train.default, (x, A, B, lb, 0.5))


def test_layers_train_through_the_saved_h_and_infer_without_it(monkeypatch):
    # Under autograd SKLinear / LowRankLinear call the *_train op; under no_grad the plain one
    # (on CPU and under compile; eager CUDA calls skip the op layers, tested above).
    calls = []
    for name in ("sklinear", "sklinear_train", "lowrank_linear", "lowrank_linear_train"):
        op = getattr(torch.ops.panther, name)
        monkeypatch.setattr(torch.ops.panther, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    sk = pr.nn.SKLinear(40, 24, 1, 4)
    lr = pr.nn.LowRankLinear.from_factors(torch.randn(40, 5), torch.randn(5, 24))
    x = torch.randn(3, 40)
    for layer, name in ((sk, "sklinear"), (lr, "lowrank_linear")):
        calls.clear()
        y = layer(x)
        assert calls == [f"{name}_train"]
        y.sum().backward()
        calls.clear()
        with torch.no_grad():
            assert_close(layer(x), y.detach())
        assert calls == [name]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_eager_path_without_the_op_layers(bias, monkeypatch):
    # Eager CUDA calls of the layers skip the custom-op dispatch (same kernels, same saved h).
    # Forced on here, on CPU (where it calls the reference): gradcheck, and equal to the op path.
    import panther.ops.linear as opl

    monkeypatch.setattr(opl, "_eager_cuda", lambda x: True)
    x, S1, S2, U1, U2, b = _op_args(bias=bias)
    fn = lambda x, S1, S2, *b: opl.sklinear_apply(x, S1, S2, U1, U2, b[0] if b else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, S1, S2) + ((b,) if bias else ()))
    with torch.no_grad():
        assert_close(fn(x, S1, S2, *((b,) if bias else ())), torch.ops.panther.sklinear(x, S1, S2, U1, U2, b))
    g = torch.Generator().manual_seed(8)
    A = torch.randn(11, 3, generator=g, dtype=F64, requires_grad=True)
    B = torch.randn(3, 7, generator=g, dtype=F64, requires_grad=True)
    lb = torch.randn(7, generator=g, dtype=F64, requires_grad=True) if bias else None
    fn = lambda x, A, B, *b: opl.lowrank_linear_apply(x, A, B, b[0] if b else None, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B) + ((lb,) if bias else ()))
    # Only some inputs trainable: the others get no gradient.
    xd = x.detach()
    y = opl.sklinear_apply(xd, S1, S2.detach(), U1, U2, None)
    y.sum().backward()
    assert S1.grad is not None and xd.grad is None


def test_backward_ops_opcheck():
    # First-order only: the backward ops have no autograd of their own (no double backward).
    x, S1, S2, U1, U2 = (t.detach() for t in _op_args()[:5])
    grad = torch.randn(2, 5, 7, dtype=F64)
    for flags in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(torch.ops.panther.sklinear_backward.default, (grad, x, S1, S2, U1, U2, *flags))


def test_no_gradient_flows_to_fixed_sketches():
    layer = pr.nn.SKLinear(16, 8, 1, 2)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.U1s.grad is None and layer.U2s.grad is None
    assert layer.S1s.grad is not None and layer.S2s.grad is not None and layer.bias.grad is not None


def test_training_step_lowers_loss():
    g = torch.Generator().manual_seed(6)
    target = torch.randn(40, 24, generator=g)
    layer = pr.nn.SKLinear(40, 24, 1, 4, generator=g)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(128, 40, generator=g)
    y = x @ target * 0.1
    losses = []
    for _ in range(20):
        loss = ((layer(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------ state, dtype, device


def test_state_dict_round_trip_is_bit_exact():
    a = pr.nn.SKLinear(33, 17, 2, 3)
    b = pr.nn.SKLinear(33, 17, 2, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 33)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"S1s", "S2s", "U1s", "U2s", "bias"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_dtype_is_honored(dtype):
    layer = pr.nn.SKLinear(24, 16, 1, 4, dtype=dtype)
    assert all(t.dtype == dtype for t in layer.state_dict().values())
    x = torch.randn(5, 24, dtype=dtype)
    assert_close(layer(x), formula(layer, x))


def test_to_moves_everything(device):
    layer = pr.nn.SKLinear(24, 16, 1, 4).to(device=device, dtype=F64)
    assert all(t.device.type == device.type and t.dtype == F64 for t in layer.state_dict().values())
    x = torch.randn(3, 24, dtype=F64, device=device)
    assert_close(layer(x), formula(layer, x))


def test_device_argument(device):
    layer = pr.nn.SKLinear(24, 16, 1, 4, device=device)
    assert all(t.device.type == device.type for t in layer.state_dict().values())


def test_global_rng_reproducibility_and_generator_isolation():
    torch.manual_seed(123)
    a = pr.nn.SKLinear(20, 10, 1, 2)
    torch.manual_seed(123)
    b = pr.nn.SKLinear(20, 10, 1, 2)
    assert all(torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in a.state_dict())
    c = pr.nn.SKLinear(20, 10, 1, 2)  # the global RNG moved on: a different draw
    assert not torch.equal(a.U1s, c.U1s)

    state = torch.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    d, e = pr.nn.SKLinear(20, 10, 1, 2, generator=g1), pr.nn.SKLinear(20, 10, 1, 2, generator=g2)
    assert torch.equal(torch.get_rng_state(), state), "a generator-driven layer touched the global RNG"
    assert all(torch.equal(d.state_dict()[n], e.state_dict()[n]) for n in d.state_dict())


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_terms=0), ValueError, "num_terms must be a positive integer, got 0"),
        (dict(low_rank=-2), ValueError, "low_rank must be a positive integer, got -2"),
        (dict(num_terms=1.5), TypeError, r"num_terms must be an int, got float \(1.5\)"),
        (dict(in_features=0), ValueError, "in_features must be a positive integer"),
        (dict(W_init=torch.randn(20, 16)), ValueError, r"W_init must have shape .*\(16, 20\).*got \(20, 16\)"),
        (dict(W_init=[[1.0]]), TypeError, "W_init must be a torch.Tensor"),
        (dict(W_init=torch.ones(16, 20, dtype=torch.int64)), TypeError, "W_init must be a floating-point"),
        (dict(generator=3), TypeError, "generator must be a torch.Generator"),
        (dict(bias="no"), TypeError, r"bias must be a bool, got str \('no'\)"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point torch.dtype.*got torch.int32"),
        (dict(dtype="float32"), TypeError, "dtype must be a floating-point torch.dtype.*got 'float32'"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    args = dict(in_features=20, out_features=16, num_terms=1, low_rank=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pr.nn.SKLinear(**args)


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.randn(4, 19), ValueError, r"x has 19 features \(shape \(4, 19\)\), but the layer expects 20"),
        (torch.randn(4, 20, dtype=F64), ValueError, "x has dtype torch.float64, but the layer's parameters are torch.float32"),
        (torch.tensor(1.0), ValueError, "x must have at least 1 dimension"),
        ("x", TypeError, "x must be a torch.Tensor"),
    ],
)
def test_forward_errors(x, exc, match):
    layer = pr.nn.SKLinear(20, 16, 1, 2)
    with pytest.raises(exc, match=match):
        layer(x)


def test_budget_warning():
    with pytest.warns(UserWarning, match=r"2\*1\*16\*\(256\+10\) = 8512 values \(trainable S and fixed U\), not fewer than .* 2560"):
        pr.nn.SKLinear(256, 10, num_terms=1, low_rank=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.nn.SKLinear(784, 512, num_terms=2, low_rank=64)  # under budget: silent


def test_low_rank_above_width_is_legal():
    with pytest.warns(UserWarning):
        layer = pr.nn.SKLinear(8, 4, num_terms=1, low_rank=16)
    x = torch.randn(2, 8)
    assert_close(layer(x), formula(layer, x))


# ------------------------------------------------------------------------------ SKLinear_triton


def test_sklinear_triton_same_function_and_warns_once_on_cpu():
    torch.manual_seed(9)
    a = pr.nn.SKLinear(30, 20, 1, 4)
    torch.manual_seed(9)
    b = pr.nn.SKLinear_triton(30, 20, 1, 4)
    x = torch.randn(3, 30)
    with pytest.warns(UserWarning, match="no Triton kernels; computing the same function"):
        yb = b(x)
    assert torch.equal(a(x), yb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b(x)  # second call: silent


# -------------------------------------------------------------------------------- torch.compile


def test_compiles_with_inductor_without_graph_breaks():
    torch._dynamo.reset()
    layer = pr.nn.SKLinear(40, 24, 2, 4)
    x = torch.randn(5, 40, requires_grad=True)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    y = compiled(x)
    assert_close(y, layer(x), rtol=1e-5)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    assert_close(gx, x.grad, rtol=1e-5)
