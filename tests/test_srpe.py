"""sinSRPE: the relative-position kernel in expectation, its two evaluation orders, module behavior."""

from __future__ import annotations

import math

import pytest
import torch

from panther.nn.pawXimpl import sinSRPE

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomized(H=2, D=4, S=3, R=4096, seed=0) -> sinSRPE:
    """A sinSRPE whose learnable parameters are moved off their init (nonzero phases included)."""
    spe = sinSRPE(H, D, S, R, dtype=F64, generator=gen(seed))
    g = gen(seed + 1)
    with torch.no_grad():
        spe.frequencies.mul_(torch.rand(H, D, S, generator=g, dtype=F64) + 0.5)
        spe.phases.copy_(2 * math.pi * torch.rand(H, D, S, generator=g, dtype=F64))
        spe.gains.mul_(torch.rand(H, D, S, generator=g, dtype=F64) + 0.5)
    return spe


# (m, n) position pairs: negative lags (the phases make P asymmetric), and the same lag 3 at
# positions ~400 and ~1200 (the expectation depends on m − n only).
PAIRS = [(0, 0), (5, 2), (2, 5), (400, 397), (1200, 1197), (1200, 10)]


def test_expected_code_product_is_the_relative_position_kernel():
    H, D, R, redraws = 2, 4, 2048, 8
    spe = randomized(H=H, D=D, R=R)
    N = 1201
    g = gen(5)
    qv = torch.randn(H, D, generator=g, dtype=F64)
    kv = torch.randn(H, D, generator=g, dtype=F64)
    q = torch.zeros(1, H, N, D, dtype=F64)
    k = torch.zeros(1, H, N, D, dtype=F64)
    pos = sorted({p for pair in PAIRS for p in pair})
    q[0, :, pos] = qv[:, None]
    k[0, :, pos] = kv[:, None]
    samples = []  # R·q̂_r(m)·k̂_r(n): i.i.d. over r and redraws, with mean E[q̂(m)·k̂(n)]
    with torch.no_grad():
        for i in range(redraws):
            spe.redraw(gen(100 + i))
            qh, kh = spe(q, k)
            samples.append(torch.stack([R * qh[0, :, m] * kh[0, :, n] for m, n in PAIRS], -1))  # (H, R, pairs)
        samples = torch.cat(samples, 1)
        mean = samples.mean(1)
        sem = samples.std(1) / math.sqrt(samples.shape[1])
        lags = torch.tensor([m - n for m, n in PAIRS])
        want = torch.einsum("hd,hd,hdl->hl", qv, kv, spe.kernel(lags))  # Σ_d q_d k_d P_d(m − n)
    scale = (qv.norm(dim=1) * kv.norm(dim=1))[:, None]
    assert (sem < 0.02 * scale).all(), "the Monte Carlo estimate is too noisy to test anything"
    assert ((mean - want).abs() <= 5 * sem).all(), f"estimate {mean} vs kernel {want} (sem {sem})"
    # lag 3 at positions 400 and 1200: the same expectation
    assert torch.equal(want[:, 3], want[:, 4])
    assert ((mean[:, 3] - mean[:, 4]).abs() <= 5 * math.sqrt(2) * sem[:, 3:5].max(1).values).all()


def test_kernel_matches_its_formula_and_init():
    spe = randomized()
    lags = torch.tensor([-7, 0, 3, 2500])
    P = spe.kernel(lags)
    f, th, lam = spe.frequencies, spe.phases, spe.gains
    for i, t in enumerate(lags.tolist()):
        direct = (lam**2 * torch.cos(2 * math.pi * f * t + th)).sum(-1)
        assert torch.allclose(P[..., i], direct, rtol=0, atol=1e-12)
    fresh = sinSRPE(2, 64, 16, 8, dtype=F64)
    P = fresh.kernel(torch.arange(0, 4097))
    assert torch.allclose(P[..., 0], torch.ones(2, 64, dtype=F64))  # P_d(0) = Σ λ² = 1
    # Positions up to a few thousand stay distinguishable: P < 0.9 away from lag 0, and the
    # kernel has decayed (in the mean over dimensions) by lags of a few thousand.
    assert P[..., 1:].max() < 0.9
    assert P[..., 2000:].mean(1).abs().max() < 0.2
    assert fresh.frequencies.min() > 0 and fresh.frequencies.max() <= 0.5


def test_codes_equal_the_explicit_sum():
    # q̂(t) = Σ_d q_d(t)·Q̄_d(t), Q̄_d(t) = R^(-1/2) Σ_s λ[cos(2πft + θ) Z1 + sin(2πft + θ) Z2];
    # k̂ the same without θ. Checked for batch sizes that take each evaluation order.
    H, D, S, R = 2, 3, 2, 5
    spe = randomized(H, D, S, R)

    def explicit(x, phase):
        t = torch.arange(x.shape[-2], dtype=F64)
        ang = 2 * math.pi * t[:, None, None] * spe.frequencies[:, None] + (spe.phases[:, None] if phase else 0)
        bar = (spe.gains[:, None, ..., None] * (torch.cos(ang)[..., None] * spe.Z1[:, None]
               + torch.sin(ang)[..., None] * spe.Z2[:, None])).sum(-2) / math.sqrt(R)  # (H, N, D, R)
        return torch.einsum("...hnd,hndr->...hnr", x, bar)

    with torch.no_grad():
        for lead in [(), (1,), (4,), (2, 3)]:  # R ≤ 2·S·batch from batch 2 on: the codebook order
            q = torch.randn(*lead, H, 6, D, generator=gen(1), dtype=F64)
            k = torch.randn(*lead, H, 9, D, generator=gen(2), dtype=F64)
            qh, kh = spe(q, k)
            assert qh.shape == (*lead, H, 6, R) and kh.shape == (*lead, H, 9, R)
            assert torch.allclose(qh, explicit(q, True), rtol=0, atol=1e-13)
            assert torch.allclose(kh, explicit(k, False), rtol=0, atol=1e-13)


def test_is_a_proper_module():
    spe = sinSRPE(2, 4, 3, 8, generator=gen(0))
    assert {n for n, _ in spe.named_parameters()} == {"frequencies", "phases", "gains"}
    assert {n for n, _ in spe.named_buffers()} == {"Z1", "Z2"}
    assert spe.Z1.shape == (2, 4, 3, 8)
    q = torch.randn(3, 2, 7, 4)
    other = sinSRPE(2, 4, 3, 8, generator=gen(1))
    assert not torch.equal(other(q, q)[0], spe(q, q)[0])
    other.load_state_dict(spe.state_dict())
    assert torch.equal(other(q, q)[0], spe(q, q)[0])
    spe.to(F64)
    assert all(t.dtype == F64 for t in list(spe.parameters()) + list(spe.buffers()))
    assert spe(q.double(), q.double())[0].dtype == F64
    qh, _ = spe(q.double(), q.double())
    qh.sum().backward()
    assert all(p.grad is not None for p in spe.parameters())


def test_device(device):
    spe = sinSRPE(2, 4, 3, 8, device=device, dtype=torch.float32)
    assert spe.Z1.device.type == device.type and spe.frequencies.device.type == device.type
    q = torch.randn(2, 2, 5, 4, device=device)
    assert spe(q, q)[1].device.type == device.type


def test_rng_generator_and_global():
    state = torch.random.get_rng_state()
    a = sinSRPE(2, 4, 3, 8, generator=gen(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = sinSRPE(2, 4, 3, 8, generator=gen(3))
    assert torch.equal(a.Z1, b.Z1) and torch.equal(a.Z2, b.Z2)
    torch.manual_seed(4)
    c = sinSRPE(2, 4, 3, 8)
    torch.manual_seed(4)
    d = sinSRPE(2, 4, 3, 8)
    assert torch.equal(c.Z1, d.Z1) and not torch.equal(a.Z1, c.Z1)
    old = c.Z2.clone()
    c.redraw()
    assert not torch.equal(c.Z2, old)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((0, 4, 3, 8), ValueError, "num_heads must be a positive integer"),
        ((2, 0, 3, 8), ValueError, "perHead_in must be a positive integer"),
        ((2, 4, -1, 8), ValueError, "sines must be a positive integer"),
        ((2, 4, 3, 0), ValueError, "num_realizations must be a positive integer"),
        ((2, 4.0, 3, 8), TypeError, "perHead_in must be an int"),
        ((2, 4, 3, 8, None, torch.int64), TypeError, "dtype must be a floating-point torch.dtype.*got torch.int64"),
    ],
    ids=["heads", "perHead_in", "sines", "realizations", "float", "int-dtype"],
)
def test_constructor_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        sinSRPE(*args)


@pytest.mark.parametrize(
    "q_shape,k_shape,dtype,exc,match",
    [
        ((2, 3, 5, 4), (2, 2, 5, 4), torch.float32, ValueError, r"sinSRPE expects q of shape \(\.\.\., num_heads=2"),
        ((2, 2, 5, 4), (2, 2, 5, 6), torch.float32, ValueError, "perHead_in=4"),
        ((5, 4), (5, 4), torch.float32, ValueError, "q must have at least 3 dimension"),
        ((2, 2, 5, 4), (2, 2, 5, 4), F64, ValueError, "q has dtype torch.float64"),
    ],
    ids=["heads", "dim", "rank", "dtype"],
)
def test_forward_validation(q_shape, k_shape, dtype, exc, match):
    spe = sinSRPE(2, 4, 3, 8)
    with pytest.raises(exc, match=match):
        spe(torch.randn(q_shape, dtype=dtype), torch.randn(k_shape, dtype=torch.float32))
