"""Float64 helpers shared by the chunked Performer kernel tests: logits and the causal key
stabilizer in the kernels' units (log2, with log2 √m folded in), and the stabilizer at chunk ends."""

from __future__ import annotations

import math

import torch
from panther.kernels.performer import reference as ref

LOG2E = 1.4426950408889634


def logits2(x, omega, scale):
    """(ω·xs − ‖xs‖²/2)·log2 e in float64, (B, H, N, m)."""
    xs = x.double() * math.sqrt(scale)
    proj = torch.einsum("bhnd,hmd->bhnm", xs, omega.double())
    return (proj - 0.5 * (xs * xs).sum(-1, keepdim=True)) * LOG2E


def key_max2(k, omega, scale, mask=None):
    """The causal softmax key stabilizer MX (B, H, N) in float64, in the kernels' units: each key's
    largest logit over the features plus log2 √m (masked keys −inf), its running max over
    positions, clamped at NO_KEY where no unmasked key came yet."""
    top = logits2(k, omega, scale).amax(-1) + 0.5 * math.log2(omega.shape[1])
    if mask is not None:
        top = top.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.cummax(top, -1).values.clamp_min(ref.NO_KEY)


def chunk_ends(mx, C):
    """E(c) for c = −1 … NC − 1, (..., NC + 1) with E(c) at index c + 1: mx (..., N) at the last
    position of chunk c (positions [c·C, (c+1)·C) clipped to N); E(−1) = mx at position 0."""
    N = mx.shape[-1]
    NC = -(-N // C)
    idx = ((torch.arange(NC + 1, device=mx.device) * C).clamp(max=N) - 1).clamp(min=0)
    return mx[..., idx]
