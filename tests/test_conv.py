"""SKConv2d and ``torch.ops.panther.skconv2d``.

The reference is written independently of the op: explicit im2col (``F.unfold``) and the
per-term formula y = 1/(2L)·Σᵢ (P·S1ᵢ·U1ᵢ + P·U2ᵢ·S2ᵢ) + b in float64. Statistical checks use the
exact second moment of the sign sketch (``sketch_error_energy``) as their yardstick.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import panther as pr
from panther_testing import RTOL, RTOL_TF32, assert_close, rel_err

# Most layers here are tiny, far over the parameter budget; the budget test checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:SKConv2d. the sketch holds:UserWarning")

# A statistic may exceed its expectation by this many standard deviations before a test fails.
N_SIGMA = 3.0


@pytest.fixture
def one_thread():
    """Tests that make hundreds of calls on tiny tensors: one intra-op thread keeps them fast (and
    keeps them from stalling in a thread pool when the machine is busy)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _pad_and_stride(layer: pr.nn.SKConv2d | nn.Conv2d) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """(left, right, top, bottom) zero padding and stride, as nn.Conv2d defines them."""
    kh, kw = layer.kernel_size
    if layer.padding == "valid":
        return (0, 0, 0, 0), layer.stride
    if layer.padding == "same":
        th, tw = kh - 1, kw - 1
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2), layer.stride
    ph, pw = layer.padding
    return (pw, pw, ph, ph), layer.stride


def patches_of(layer: pr.nn.SKConv2d | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """im2col of x in float64: (N·Ho·Wo, C·kh·kw) rows, and (Ho, Wo)."""
    pad, stride = _pad_and_stride(layer)
    xp = F.pad(x.detach().to(torch.float64), pad)
    cols = F.unfold(xp, layer.kernel_size, stride=stride)  # (N, C·kh·kw, Ho·Wo)
    ho = (xp.shape[2] - layer.kernel_size[0]) // stride[0] + 1
    wo = (xp.shape[3] - layer.kernel_size[1]) // stride[1] + 1
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), (ho, wo)


def terms(layer: pr.nn.SKConv2d) -> list[tuple[torch.Tensor, ...]]:
    """Per term i: S1ᵢ (C·kh·kw × k), U1ᵢ (k × out), U2ᵢ (C·kh·kw × k), S2ᵢ (k × out) in float64."""
    d = {n: t.detach().to(torch.float64).cpu() for n, t in layer.state_dict().items()}
    L, k = layer.num_terms, layer.low_rank
    return [
        (d["S1s"][i].reshape(k, -1).T, d["U1s"][i], d["U2s"][i].reshape(k, -1).T, d["S2s"][i]) for i in range(L)
    ]


def reference(layer: pr.nn.SKConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in float64 from im2col and the per-term formula, shaped like the layer's."""
    unbatched = x.dim() == 3
    xb = x[None] if unbatched else x
    P, (ho, wo) = patches_of(layer, xb.cpu())
    L = layer.num_terms
    y = sum(P @ S1 @ U1 + P @ U2 @ S2 for S1, U1, U2, S2 in terms(layer)) / (2 * L)
    if layer.bias is not None:
        y = y + layer.bias.detach().to(torch.float64).cpu()
    y = y.reshape(xb.shape[0], ho, wo, -1).permute(0, 3, 1, 2)
    return y[0] if unbatched else y


def effective_kernel(layer: pr.nn.SKConv2d) -> torch.Tensor:
    """The dense (out, C, kh, kw) kernel the layer applies: (1/2L)·Σ (S1ᵢU1ᵢ + U2ᵢS2ᵢ)ᵀ, float64."""
    wt = sum(S1 @ U1 + U2 @ S2 for S1, U1, U2, S2 in terms(layer)) / (2 * layer.num_terms)
    return wt.T.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)


def sketch_error_energy(P: torch.Tensor, W: torch.Tensor, num_terms: int, low_rank: int) -> float:
    """E‖y_sketch − y_dense‖² over the sign matrices, exactly, for patches P and dense kernel W.

    With Wt = W.reshape(out, n)ᵀ and Eᵢ = U1ᵢᵀU1ᵢ − I, Fᵢ = U2ᵢU2ᵢᵀ − I (zero mean, off-diagonal
    entries of variance 1/k, E[E_ab E_cd] = [{a,b} = {c,d}]/k), y − y_dense = P·(1/2L)Σ(Wt·Eᵢ + Fᵢ·Wt)
    and, for M·E·N with G = MᵀM, H = NNᵀ: E‖M·E·N‖² = (tr G·tr H + ⟨G, H⟩ − 2·Σ_a G_aa·H_aa)/k.
    """
    Wt = W.detach().to(torch.float64).reshape(W.shape[0], -1).T

    def energy(M: torch.Tensor, N: torch.Tensor) -> float:
        G, H = M.T @ M, N @ N.T
        return float(G.trace() * H.trace() + (G * H).sum() - 2 * (G.diagonal() * H.diagonal()).sum()) / low_rank

    eye = torch.eye(Wt.shape[1], dtype=torch.float64)
    return (energy(P @ Wt, eye) + energy(P, Wt)) / (4 * num_terms)


# ---------------------------------------------------------------------------------------------
# The spec example
# ---------------------------------------------------------------------------------------------


def test_spec_example(capsys):
    import torch
    import panther as pr

    # Sketched 2D convolution layer
    conv_layer = pr.nn.SKConv2d(
        in_channels=64,
        out_channels=128,
        kernel_size=3,
        stride=1,
        padding=1,
        num_terms=1,
        low_rank=16
    )

    # Forward pass
    x = torch.randn(32, 64, 56, 56)  # (batch, channels, height, width)
    y = conv_layer(x)
    print(f"Output shape: {y.shape}")  # (32, 128, 56, 56)

    assert capsys.readouterr().out == "Output shape: torch.Size([32, 128, 56, 56])\n"
    assert torch.isfinite(y).all()
    corner = x[:1, :, :9, :9]  # the float64 im2col reference on a crop
    assert_close(conv_layer(corner), reference(conv_layer, corner))


# ---------------------------------------------------------------------------------------------
# Forward against the reference
# ---------------------------------------------------------------------------------------------

# (N, C, H, W, out, kernel, stride, padding, L, k)
CASES = [
    (2, 3, 7, 9, 4, 3, 1, 0, 1, 2),
    (2, 5, 7, 9, 6, (3, 5), 2, 1, 2, 3),
    (1, 3, 8, 8, 5, 3, (2, 1), (1, 2), 3, 2),
    (3, 5, 9, 7, 4, (3, 5), 1, "same", 1, 4),
    (2, 3, 7, 9, 4, (2, 4), 1, "same", 2, 2),
    (2, 3, 7, 9, 4, 5, 2, "valid", 1, 3),
    (2, 4, 6, 5, 3, 1, 1, 0, 2, 2),
    (2, 3, 3, 5, 4, (3, 5), 1, 0, 1, 5),
]


def _case_id(c) -> str:
    n, ch, h, w, o, ks, s, p, L, k = c
    return f"N{n}-C{ch}-{h}x{w}-out{o}-ks{ks}-s{s}-p{p}-L{L}-k{k}".replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")  # torch's, in F.conv2d
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_matches_reference(case, dtype):
    n, c, h, w, out, ks, stride, padding, L, k = case
    layer = pr.nn.SKConv2d(c, out, ks, stride=stride, padding=padding, num_terms=L, low_rank=k, dtype=dtype)
    x = torch.randn(n, c, h, w, dtype=dtype)
    y = layer(x)
    ref = reference(layer, x)
    assert y.dtype == dtype
    assert_close(y, ref)
    # The same function as nn.Conv2d semantics with the effective kernel (checks output size and
    # the placement of "same" padding independently of the im2col reference).
    dense = F.conv2d(x.double(), effective_kernel(layer), layer.bias.double(), stride=layer.stride, padding=padding)
    assert y.shape == dense.shape
    assert_close(y, dense)


def test_no_bias():
    layer = pr.nn.SKConv2d(3, 4, 3, padding=1, bias=False, num_terms=2, low_rank=3, dtype=torch.float64)
    assert layer.bias is None
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    assert_close(layer(x), reference(layer, x))


def test_batch_one_and_unbatched():
    layer = pr.nn.SKConv2d(5, 4, (3, 5), stride=2, padding=(1, 2), num_terms=2, low_rank=3)
    x = torch.randn(3, 5, 7, 9)
    y = layer(x)
    for i in range(3):
        y1 = layer(x[i : i + 1])
        assert y1.shape == (1, 4, 4, 5)
        assert_close(y1[0], y[i])
        yu = layer(x[i])
        assert yu.shape == (4, 4, 5)
        assert_close(yu, y[i])
        assert_close(yu, reference(layer, x[i]))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def _op_inputs(dtype=torch.float64, bias=True, requires_grad=True):
    g = torch.Generator().manual_seed(7)
    layer = pr.nn.SKConv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), bias=bias, num_terms=2, low_rank=3,
                           dtype=dtype, generator=g)
    x = torch.randn(2, 3, 5, 6, dtype=dtype, generator=g)
    S1s, S2s = layer.S1s.detach().clone(), layer.S2s.detach().clone()
    b = layer.bias.detach().clone() if bias else None
    if requires_grad:
        for t in (x, S1s, S2s, b):
            if t is not None:
                t.requires_grad_(True)
    return layer, (x, S1s, S2s, layer.U1s, layer.U2s, b, list(layer.stride), list(layer._op_padding))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(bias, one_thread):
    _, args = _op_inputs(bias=bias)
    x, S1s, S2s, U1s, U2s, b, stride, padding = args
    diff = (x, S1s, S2s) + ((b,) if bias else ())

    def fn(x, S1s, S2s, *rest):
        return torch.ops.panther.skconv2d(x, S1s, S2s, U1s, U2s, rest[0] if rest else None, stride, padding)

    assert torch.autograd.gradcheck(fn, diff)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(bias):
    _, args = _op_inputs(bias=bias)
    torch.library.opcheck(torch.ops.panther.skconv2d.default, args)


@pytest.mark.parametrize("need", [(True, True, True), (False, True, False)], ids=["all", "dS-only"])
def test_opcheck_backward(need):
    _, (x, S1s, S2s, U1s, U2s, b, stride, padding) = _op_inputs(requires_grad=False)
    grad = torch.randn_like(torch.ops.panther.skconv2d(x, S1s, S2s, U1s, U2s, b, stride, padding))
    torch.library.opcheck(
        torch.ops.panther.skconv2d_backward.default, (grad, x, S1s, S2s, U1s, U2s, stride, padding, *need)
    )


@pytest.mark.parametrize("which", ["all", "x", "params"])
def test_backward_matches_reference(which, poison):
    """Gradients of the layer match autograd through the float64 reference, for any subset asked."""
    layer = pr.nn.SKConv2d(5, 6, (3, 5), stride=2, padding=(2, 1), num_terms=2, low_rank=4, dtype=torch.float64)
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64, requires_grad=which in ("all", "x"))
    if which == "x":
        layer.requires_grad_(False)
    g = torch.randn_like(layer(x))
    (layer(x) * g).sum().backward()

    ref = pr.nn.SKConv2d(5, 6, (3, 5), stride=2, padding=(2, 1), num_terms=2, low_rank=4, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    ref.requires_grad_(which != "x")
    xr = x.detach().clone().requires_grad_(x.requires_grad)
    # Reference with autograd: the im2col formula written on live tensors.
    kh, kw = ref.kernel_size
    cols = F.unfold(F.pad(xr, (1, 1, 2, 2)), (kh, kw), stride=2).transpose(1, 2)  # (N, P, C·kh·kw)
    y = sum(
        cols @ ref.S1s[i].reshape(4, -1).T @ ref.U1s[i] + cols @ ref.U2s[i].reshape(4, -1).T @ ref.S2s[i]
        for i in range(2)
    ) / 4 + ref.bias
    (y.transpose(1, 2).reshape(g.shape) * g).sum().backward()

    if which in ("all", "x"):
        assert_close(x.grad, xr.grad, name="dx")
    else:
        assert x.grad is None
    for name in ("S1s", "S2s", "bias"):
        p, pr_ = getattr(layer, name), getattr(ref, name)
        if which == "x":
            assert p.grad is None
        else:
            assert_close(p.grad, pr_.grad, name=name)
    assert layer.U1s.grad is None and layer.U2s.grad is None
    assert not layer.U1s.requires_grad and not layer.U2s.requires_grad


# ---------------------------------------------------------------------------------------------
# Statistics of the sketch
# ---------------------------------------------------------------------------------------------


def _dense_setup(c=3, out=5, ks=3, stride=1, padding=1, n=2, h=7, w=9):
    g = torch.Generator().manual_seed(123)
    conv = nn.Conv2d(c, out, ks, stride=stride, padding=padding, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        conv.bias.copy_(torch.randn(out, generator=g, dtype=torch.float64))
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return conv, x, conv(x)


def sketched(conv: nn.Conv2d, num_terms: int, low_rank: int, seed: int) -> pr.nn.SKConv2d:
    return pr.nn.SKConv2d.from_conv2d(conv, num_terms, low_rank, generator=torch.Generator().manual_seed(seed))


def test_unbiased(one_thread):
    """The mean output over M independent sketches of one W converges to the dense conv.

    Each sketch's squared error has expectation E = ``sketch_error_energy``; the mean of M has
    E/M. A bias (e.g. a wrong 1/(2L) or ±1/√k scale) leaves an error that does not shrink.
    """
    conv, x, dense = _dense_setup()
    L, k, M = 1, 4, 100
    with torch.no_grad():
        outs = torch.stack([sketched(conv, L, k, seed)(x) for seed in range(M)])
        P, _ = patches_of(conv, x)
    E = sketch_error_energy(P, conv.weight, L, k)
    # The formula describes the single sketches (their energies vary by CV ≈ 0.3: σ ≈ 0.03 at M=100)...
    per_sketch = ((outs - dense) ** 2).flatten(1).sum(1)
    assert abs(per_sketch.mean().item() / E - 1) < 0.15
    # ...and their mean is within N_SIGMA standard deviations of the dense output,
    mean_err = float((outs.mean(0) - dense).norm())
    assert mean_err <= N_SIGMA * math.sqrt(E / M), (mean_err, math.sqrt(E / M))
    # a bound tight enough to catch a wrong overall scale (a 1/L instead of 1/(2L) doubles y − b).
    assert N_SIGMA * math.sqrt(E / M) < 0.5 * float((dense - conv.bias.detach()[:, None, None]).norm())


def test_error_shrinks_with_rank(one_thread):
    """Mean squared error over draws matches the predicted energy (∝ 1/k) at every k, so falls."""
    conv, x, dense = _dense_setup(c=4, out=6)
    draws = 16  # per-draw energies vary by CV <= 0.4: σ(mean/E) <= 0.1
    rms = []
    for k in (2, 8, 32, 128):
        with torch.no_grad():
            errs = [float(((sketched(conv, 1, k, seed)(x) - dense) ** 2).sum()) for seed in range(draws)]
            P, _ = patches_of(conv, x)
        mean = sum(errs) / draws
        assert 0.6 < mean / sketch_error_energy(P, conv.weight, 1, k) < 1.4, k
        rms.append(math.sqrt(mean))
    assert all(a > b for a, b in zip(rms, rms[1:])), rms
    assert rms[-1] / rms[0] < 0.25, rms  # 1/√64 = 0.125 expected


def test_from_conv2d_close_at_large_rank():
    """With Lk large the sketch is close to the dense conv: relative error within N_SIGMA·σ."""
    conv, x, dense = _dense_setup(c=4, out=6, ks=3, stride=2, padding=1, h=9, w=8)
    L, k = 8, 1024
    layer = sketched(conv, L, k, seed=0)
    assert layer.S1s.dtype == torch.float64 and layer.S1s.device == conv.weight.device
    assert torch.equal(layer.bias, conv.bias)
    assert layer.stride == (2, 2) and layer.padding == (1, 1)
    P, _ = patches_of(layer, x)
    sigma = math.sqrt(sketch_error_energy(P, conv.weight, L, k)) / float(dense.norm())
    assert sigma < 0.05  # the yardstick itself says "close"
    with torch.no_grad():
        err = rel_err(layer(x), dense)
    assert err <= N_SIGMA * sigma, (err, sigma)


@pytest.mark.parametrize("padding", ["same", "valid", (0, 2)], ids=str)
def test_from_conv2d_shapes_and_padding(padding):
    conv = nn.Conv2d(3, 5, (2, 3), padding=padding, bias=False)
    layer = pr.nn.SKConv2d.from_conv2d(conv, 1, 2)
    assert layer.bias is None and layer.padding == conv.padding and layer.kernel_size == (2, 3)
    x = torch.randn(2, 3, 7, 9)
    assert layer(x).shape == conv(x).shape
    assert_close(layer(x), reference(layer, x))


# ---------------------------------------------------------------------------------------------
# State, dtype, device, randomness
# ---------------------------------------------------------------------------------------------


def test_state_dict_roundtrip_bit_for_bit():
    kw = dict(stride=2, padding=(1, 2), num_terms=2, low_rank=3)
    a = pr.nn.SKConv2d(5, 4, (3, 5), **kw, generator=torch.Generator().manual_seed(1))
    b = pr.nn.SKConv2d(5, 4, (3, 5), **kw, generator=torch.Generator().manual_seed(2))
    assert set(a.state_dict()) == {"S1s", "S2s", "bias", "U1s", "U2s"}
    assert {n for n, _ in a.named_parameters()} == {"S1s", "S2s", "bias"}
    assert {n for n, _ in a.named_buffers()} == {"U1s", "U2s"}
    x = torch.randn(2, 5, 7, 9)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_float64_and_to():
    layer = pr.nn.SKConv2d(3, 4, 3, padding=1, num_terms=2, low_rank=3)
    assert all(t.dtype == torch.float32 for t in layer.state_dict().values())
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        layer(x)
    layer.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in layer.state_dict().values())
    y = layer(x)
    assert y.dtype == torch.float64
    assert_close(y, reference(layer, x))


def test_bfloat16():
    layer = pr.nn.SKConv2d(5, 6, (3, 5), stride=2, padding=1, num_terms=2, low_rank=8, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in layer.state_dict().values())
    x = torch.randn(2, 5, 9, 7, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference(layer, x))  # RTOL[bfloat16]: operand rounding only


def test_device(device):
    layer = pr.nn.SKConv2d(3, 4, 3, padding=1, num_terms=2, low_rank=3, device=device)
    # (device.type: torch.device("cuda") != the tensors' torch.device("cuda:0"))
    assert all(t.device.type == device.type for t in layer.state_dict().values())
    x = torch.randn(2, 3, 7, 9, device=device)
    assert_close(layer(x), reference(layer, x), rtol=RTOL[torch.float32] if device.type == "cpu" else RTOL_TF32)
    cpu = pr.nn.SKConv2d(3, 4, 3, padding=1, num_terms=2, low_rank=3).to(device)
    assert all(t.device.type == device.type for t in cpu.state_dict().values())
    assert cpu(x).device.type == device.type


def test_generator_reproducible():
    def make(seed):
        return pr.nn.SKConv2d(3, 4, (3, 5), num_terms=2, low_rank=3, generator=torch.Generator().manual_seed(seed))

    before = torch.get_rng_state()
    a, b, c = make(5), make(5), make(6)
    assert torch.equal(before, torch.get_rng_state())  # a generator leaves the global RNG alone
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert not torch.equal(a.U1s, c.U1s) and not torch.equal(a.S1s, c.S1s)


def test_global_rng_reproducible():
    torch.manual_seed(11)
    a = pr.nn.SKConv2d(3, 4, 3, num_terms=2, low_rank=3)
    torch.manual_seed(11)
    b = pr.nn.SKConv2d(3, 4, 3, num_terms=2, low_rank=3)
    c = pr.nn.SKConv2d(3, 4, 3, num_terms=2, low_rank=3)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert not torch.equal(a.U2s, c.U2s)


def test_sign_matrices_and_init():
    """U's are ±1/√k; S's are the sketches of W_init; the default init is nn.Conv2d's."""
    W = torch.randn(4, 3, 3, 5, dtype=torch.float64)
    layer = pr.nn.SKConv2d(3, 4, (3, 5), num_terms=2, low_rank=3, W_init=W, dtype=torch.float64)
    assert torch.equal(layer.U1s.abs(), torch.full_like(layer.U1s, 1 / math.sqrt(3)))
    assert torch.equal(layer.U2s.abs(), torch.full_like(layer.U2s, 1 / math.sqrt(3)))
    Wt = W.reshape(4, -1).T
    for S1, U1, U2, S2 in terms(layer):
        assert_close(S1, Wt @ U1.T)
        assert_close(S2, U2.T @ Wt)
    # Default init: |W| <= 1/√fan_in (kaiming_uniform a=√5), |b| <= 1/√fan_in; recover W from a
    # sketch with k >= out (then U1ᵢᵀ has full column rank and S1ᵢ = Wt·U1ᵢᵀ determines Wt).
    torch.manual_seed(3)
    big = pr.nn.SKConv2d(3, 4, 3, num_terms=1, low_rank=8, dtype=torch.float64)
    S1, U1, _, _ = terms(big)[0]
    Wt = S1 @ torch.linalg.pinv(U1.T)
    bound = 1 / math.sqrt(27)
    assert float(Wt.abs().max()) <= bound * (1 + 1e-9) and float(Wt.abs().max()) > 0.5 * bound
    assert float(big.bias.detach().abs().max()) <= bound


def test_extra_repr():
    layer = pr.nn.SKConv2d(3, 4, (3, 5), stride=2, padding="valid", bias=False, num_terms=2, low_rank=3)
    assert repr(layer) == (
        "SKConv2d(3, 4, kernel_size=(3, 5), stride=(2, 2), padding='valid', bias=False, num_terms=2, low_rank=3)"
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_channels=0), ValueError, "in_channels must be a positive integer, got 0"),
        (dict(out_channels=2.0), TypeError, "out_channels must be an int"),
        (dict(num_terms=0), ValueError, "num_terms must be a positive integer, got 0"),
        (dict(low_rank=-1), ValueError, "low_rank must be a positive integer, got -1"),
        (dict(low_rank=2.5), TypeError, "low_rank must be an int"),
        (dict(kernel_size=0), ValueError, "kernel_size must be a positive integer, got 0"),
        (dict(kernel_size=(3,)), ValueError, r"kernel_size must be an int or a pair of ints, got \(3,\)"),
        (dict(kernel_size=(3, 0)), ValueError, r"kernel_size\[1\] must be a positive integer, got 0"),
        (dict(kernel_size="3"), TypeError, "kernel_size must be an int"),
        (dict(stride=0), ValueError, "stride must be a positive integer, got 0"),
        (dict(stride=(1, 2, 3)), ValueError, "stride must be an int or a pair of ints"),
        (dict(padding=-1), ValueError, "padding must be an integer >= 0, got -1"),
        (dict(padding="full"), ValueError, r"padding must be one of \['same', 'valid'\], got 'full'"),
        (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1, got stride=\(2, 2\)"),
        (dict(bias=1), TypeError, "bias must be a bool"),
        (dict(W_init=torch.randn(4, 3, 3)), ValueError, r"W_init must have shape .* = \(4, 3, 3, 3\)"),
        (dict(W_init=torch.ones(4, 3, 3, 3, dtype=torch.int64)), TypeError, "W_init must be a floating-point"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point torch.dtype"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_constructor_errors(kwargs, exc, match):
    args = dict(in_channels=3, out_channels=4, kernel_size=3, num_terms=1, low_rank=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pr.nn.SKConv2d(**args)


def test_forward_errors():
    layer = pr.nn.SKConv2d(3, 4, (3, 5), num_terms=1, low_rank=2)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        layer([[1.0]])
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\) or \(C, H, W\), got shape \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\) or \(C, H, W\), got shape \(1, 1, 3, 7, 9\)"):
        layer(torch.randn(1, 1, 3, 7, 9))
    with pytest.raises(ValueError, match=r"input has 5 channels \(shape \(2, 5, 7, 9\)\), but the layer expects 3"):
        layer(torch.randn(2, 5, 7, 9))
    with pytest.raises(ValueError, match=r"input has 4 channels \(shape \(4, 7, 9\)\), but the layer expects 3"):
        layer(torch.randn(4, 7, 9))
    with pytest.raises(ValueError, match="input has dtype torch.float64, but the layer's parameters are torch.float32"):
        layer(torch.randn(2, 3, 7, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta, but the layer's parameters are on cpu"):
        layer(torch.randn(2, 3, 7, 9, device="meta"))
    with pytest.raises(ValueError, match=r"input width 4 \(\+ padding 0\) is smaller than the kernel \(5\)"):
        layer(torch.randn(2, 3, 7, 4))


@pytest.mark.parametrize(
    "conv, exc, match",
    [
        (nn.Conv2d(4, 4, 3, groups=2), ValueError, "needs groups=1, got groups=2"),
        (nn.Conv2d(4, 4, 3, dilation=2), ValueError, r"needs dilation=1, got dilation=\(2, 2\)"),
        (nn.Conv2d(4, 4, 3, padding_mode="reflect"), ValueError, "needs padding_mode='zeros', got 'reflect'"),
        (nn.Linear(4, 4), TypeError, "conv must be an nn.Conv2d, got Linear"),
    ],
    ids=["groups", "dilation", "padding_mode", "not-conv"],
)
def test_from_conv2d_errors(conv, exc, match):
    with pytest.raises(exc, match=match):
        pr.nn.SKConv2d.from_conv2d(conv, 1, 2)


def test_budget_warning():
    # 2·1·8·(27 + 4) = 496 >= 27·4 = 108
    with pytest.warns(UserWarning, match=r"SKConv2d: the sketch holds .* = 496 values \(trainable S and fixed U\), not fewer than .* 108"):
        pr.nn.SKConv2d(3, 4, 3, num_terms=1, low_rank=8)
    with pytest.warns(UserWarning, match="SKConv2d: the sketch holds"):
        pr.nn.SKConv2d.from_conv2d(nn.Conv2d(3, 4, 3), 1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.nn.SKConv2d(64, 128, 3, padding=1, num_terms=1, low_rank=16)  # the spec's layer: 22528 < 73728


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    layer = pr.nn.SKConv2d(5, 4, (3, 5), stride=2, padding=(1, 2), num_terms=2, low_rank=3)
    x = torch.randn(2, 5, 7, 9)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), layer(x))
    torch._dynamo.reset()
