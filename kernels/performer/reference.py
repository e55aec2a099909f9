"""Plain-PyTorch reference of Performer attention, forward and backward (math in README.md).

Shapes: q (B, H, N, D); k (B, H, Nk, D); v (B, H, Nk, E); omega (H, m, D);
key_mask (B, Nk) bool (True = attend) or None. Low-precision inputs are computed in fp32 and the
result is cast back to v's dtype. Everything here is vectorized: no loop over positions or chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

RELU_EPS = 1e-3
DEFAULT_CHUNK = 64


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def feature_map(
    x: Tensor,
    omega: Tensor,
    kernel_fn: str,
    scale: float,
    is_query: bool,
    causal: bool,
    key_mask: Tensor | None = None,
) -> Tensor:
    """φ(x) of shape (B, H, N, m), in fp32 (fp64 for fp64 input). See README.md for the stabilizers."""
    dt = _compute_dtype(x)
    m = omega.shape[-2]
    xs = x.to(dt) * math.sqrt(scale)
    w = omega.to(dt)
    proj = torch.einsum("bhnd,hmd->bhnm", xs, w)
    if kernel_fn == "relu":
        phi = torch.relu(proj) / math.sqrt(m) + RELU_EPS
    elif kernel_fn == "softmax":
        logits = proj - 0.5 * (xs * xs).sum(-1, keepdim=True)
        if is_query:
            c = logits.amax(-1, keepdim=True)
        elif causal:
            c = causal_key_shift(w).view(1, -1, 1, 1)
        else:
            masked = logits if key_mask is None else logits.masked_fill(~key_mask[:, None, :, None], float("-inf"))
            if masked.shape[-2] == 0:  # no keys: nothing to stabilize (amax has no identity)
                c = masked.new_zeros(*masked.shape[:-2], 1, 1)
            else:
                c = masked.amax(dim=(-2, -1), keepdim=True)
                c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # every key masked
        phi = torch.exp(logits - c.detach()) / math.sqrt(m)
    else:
        raise ValueError(f"kernel_fn must be one of ['softmax', 'relu'], got {kernel_fn!r}")
    if key_mask is not None and not is_query:
        phi = phi * key_mask[:, None, :, None].to(dt)
    return phi


# The causal key stabilizer sits this far below its bound maxⱼ‖ωⱼ‖²/2 (see causal_key_shift).
CAUSAL_SHIFT = 40.0
# Largest stabilizer the causal softmax features stand in 32-bit exponents (fp32, bf16): a key
# whose logit is near 0 gets φ = exp(−c)/√m, which flushes to zero past ~87 (fp32's smallest normal
# is e^−87.3, and the GPU flushes subnormals), with some room for logits below 0.
CAUSAL_SHIFT_LIMIT = {torch.float64: 700.0, torch.float32: 80.0}


def causal_shift_limit(dtype: torch.dtype) -> float:
    """CAUSAL_SHIFT_LIMIT for features computed from ``dtype`` (fp64 alone has 64-bit exponents)."""
    return CAUSAL_SHIFT_LIMIT[torch.float64 if dtype == torch.float64 else torch.float32]


def causal_key_shift(omega: Tensor) -> Tensor:
    """Per-head causal key stabilizer c = maxⱼ‖ωⱼ‖²/2 − CAUSAL_SHIFT, shape (H,) for ω (H, m, D).

    ω·x − ‖x‖²/2 ≤ ‖ω‖²/2 for every x (complete the square), so φ(k) = exp(ω·k − ‖k‖²/2 − c)/√m
    ≤ e^40/√m without looking at any key: no output can depend on a later key. The bound is loose
    by about D/2 for typical keys, which is what limits the head dim (CAUSAL_SHIFT_LIMIT)."""
    w = omega.to(torch.float64 if omega.dtype == torch.float64 else torch.float32)
    return 0.5 * (w * w).sum(-1).amax(-1) - CAUSAL_SHIFT


def feature_map_backward(
    dphi: Tensor,
    x: Tensor,
    phi: Tensor,
    omega: Tensor,
    kernel_fn: str,
    scale: float,
    key_mask: Tensor | None = None,
) -> Tensor:
    """dx (shape of x, compute dtype) given dphi = ∂loss/∂φ(x) and φ(x) from :func:`feature_map`."""
    dt = phi.dtype
    m = omega.shape[-2]
    w = omega.to(dt)
    rs = math.sqrt(scale)
    if key_mask is not None:
        dphi = dphi * key_mask[:, None, :, None].to(dt)
    if kernel_fn == "relu":
        proj = torch.einsum("bhnd,hmd->bhnm", x.to(dt) * rs, w)
        dproj = dphi * (proj > 0).to(dt) / math.sqrt(m)
        dxs = torch.einsum("bhnm,hmd->bhnd", dproj, w)
    else:
        t = dphi * phi
        dxs = torch.einsum("bhnm,hmd->bhnd", t, w) - t.sum(-1, keepdim=True) * (x.to(dt) * rs)
    return dxs * rs


def _chunk(x: Tensor, C: int) -> Tensor:
    """(B, H, N, F) -> (B, H, N/C, C, F), zero-padding N up to a multiple of C."""
    B, H, N, Fd = x.shape
    pad = (-N) % C
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B, H, (N + pad) // C, C, Fd)  # (no -1: B = 0 would leave it ambiguous)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, reverse: bool = False, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """oᵢ = Σⱼ (qᵢ·kⱼ) vⱼ over all j, j ≤ i (causal), or j ≥ i (causal and reverse).

    q (B, H, N, F), k (B, H, Nk, F), v (B, H, Nk, E) -> (B, H, N, E). Causal needs N == Nk and is
    computed in chunks (see README.md).
    """
    if not causal:
        return q @ (k.transpose(-1, -2) @ v)
    if reverse:
        return linear_attention(q.flip(2), k.flip(2), v.flip(2), True, False, chunk_size).flip(2)
    N = q.shape[2]
    C = chunk_size
    qc, kc, vc = _chunk(q, C), _chunk(k, C), _chunk(v, C)
    state = kc.transpose(-1, -2) @ vc  # (B, H, nc, F, E): per-chunk φ(K_c)ᵀ V_c
    # Exclusive prefix over chunks: chunk c sees the states of chunks < c.
    prefix = torch.cumsum(F.pad(state[:, :, :-1], (0, 0, 0, 0, 1, 0)), dim=2)
    scores = (qc @ kc.transpose(-1, -2)).tril()  # (B, H, nc, C, C)
    out = qc @ prefix + scores @ vc
    return out.reshape(q.shape[0], q.shape[1], qc.shape[2] * C, v.shape[-1])[:, :, :N]


def _augment(v: Tensor) -> Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size):
    """φ(q), φ(k), V' = [V, 1], and out = num/den with den = 0 replaced by 1 (all in fp32+)."""
    phiq = feature_map(q, omega, kernel_fn, scale, True, causal)
    phik = feature_map(k, omega, kernel_fn, scale, False, causal, key_mask)
    v1 = _augment(v.to(phiq.dtype))
    nd = linear_attention(phiq, phik, v1, causal, chunk_size=chunk_size)
    num, den = nd[..., :-1], nd[..., -1:]
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return phiq, phik, v1, num / safe, safe


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Performer attention output (B, H, N, E) in v's dtype. See module docstring for shapes."""
    return _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)[3].to(v.dtype)


def performer_attention_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`performer_attention` given grad = ∂loss/∂out; omega gets no gradient."""
    phiq, phik, v1, out, safe = _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)
    g = grad.to(out.dtype)
    # [num, den] = lin(φq, φk, V'): its upstream gradient G' = [g/den, −Σ g·out / den].
    gaug = torch.cat([g / safe, -(g * out).sum(-1, keepdim=True) / safe], dim=-1)
    dphiq = linear_attention(gaug, v1, phik, causal, chunk_size=chunk_size)
    dphik = linear_attention(v1, gaug, phiq, causal, reverse=True, chunk_size=chunk_size)
    dv1 = linear_attention(phik, phiq, gaug, causal, reverse=True, chunk_size=chunk_size)
    dq = feature_map_backward(dphiq, q, phiq, omega, kernel_fn, scale)
    dk = feature_map_backward(dphik, k, phik, omega, kernel_fn, scale, key_mask)
    return dq.to(q.dtype), dk.to(k.dtype), dv1[..., :-1].to(v.dtype)
