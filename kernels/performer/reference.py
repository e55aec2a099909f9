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
# Below this normalizer a query passes no gradient (fp32 compute; float64: DEN_MIN_F64): its
# 1/den, times the sums of the backward, would overflow fp32 to inf and then inf·0 = NaN. Such a
# den means the query's features and the keys' barely overlap (their stabilizers are separate).
DEN_MIN = 1e-30
DEN_MIN_F64 = 1e-300


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _logits(x: Tensor, omega: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(ω·xs, ω·xs − ‖xs‖²/2) of shape (B, H, N, m) in the compute dtype, xs = √scale·x."""
    dt = _compute_dtype(x)
    xs = x.to(dt) * math.sqrt(scale)
    proj = torch.einsum("bhnd,hmd->bhnm", xs, omega.to(dt))
    return proj, proj - 0.5 * (xs * xs).sum(-1, keepdim=True)


# Stand-in for the running max of a position that sees no unmasked key yet (cummax gives −inf
# there): finite, so that every difference of two stabilizers stays finite, and below any logit.
NO_KEY = -1e30


def causal_key_max(k: Tensor, omega: Tensor, scale: float, key_mask: Tensor | None = None) -> Tensor:
    """The causal softmax key stabilizer M (B, H, N), compute dtype: Mⱼ = the largest key logit
    ω_f·ks_{j'} − ‖ks_{j'}‖²/2 over features f and unmasked keys j' ≤ j (``NO_KEY`` where there is
    none yet). Nondecreasing in j, and it depends on no later key. Not differentiated: it
    cancels in out (README.md)."""
    logits = _logits(k, omega, scale)[1]
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :, None], float("-inf"))
    if logits.shape[-2] == 0:
        return logits.new_zeros(logits.shape[:-1])
    return torch.cummax(logits.amax(-1), dim=-1).values.clamp_min(NO_KEY).detach()


def feature_map(
    x: Tensor,
    omega: Tensor,
    kernel_fn: str,
    scale: float,
    is_query: bool,
    causal: bool,
    key_mask: Tensor | None = None,
    key_max: Tensor | None = None,
) -> Tensor:
    """φ(x) of shape (B, H, N, m), in fp32 (fp64 for fp64 input). See README.md for the stabilizers.

    Causal softmax keys are φ̃ⱼ = exp(lⱼ − Mⱼ)/√m, each at its own running max Mⱼ
    (:func:`causal_key_max`, computed here unless ``key_max`` gives it): query i weighs key j ≤ i
    by φ(qᵢ)·φ̃ⱼ·exp(Mⱼ − Mᵢ) (:func:`linear_attention` with ``key_max``)."""
    if kernel_fn not in ("softmax", "relu"):
        raise ValueError(f"kernel_fn must be one of ['softmax', 'relu'], got {kernel_fn!r}")
    m = omega.shape[-2]
    proj, logits = _logits(x, omega, scale)
    if kernel_fn == "relu":
        phi = torch.relu(proj) / math.sqrt(m) + RELU_EPS
    else:
        if is_query:
            c = logits.amax(-1, keepdim=True)
        elif causal:
            c = (causal_key_max(x, omega, scale, key_mask) if key_max is None else key_max).unsqueeze(-1)
            if key_mask is not None:  # (a masked key past NO_KEY would give exp(+inf))
                logits = logits.masked_fill(~key_mask[:, None, :, None], float("-inf"))
        else:
            masked = logits if key_mask is None else logits.masked_fill(~key_mask[:, None, :, None], float("-inf"))
            if masked.shape[-2] == 0:  # no keys: nothing to stabilize (amax has no identity)
                c = masked.new_zeros(*masked.shape[:-2], 1, 1)
            else:
                c = masked.amax(dim=(-2, -1), keepdim=True)
                c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # every key masked
        phi = torch.exp(logits - c.detach()) / math.sqrt(m)
    if key_mask is not None and not is_query:
        phi = phi * key_mask[:, None, :, None].to(phi.dtype)
    return phi


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


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    reverse: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    key_max: Tensor | None = None,
) -> Tensor:
    """oᵢ = Σⱼ (qᵢ·kⱼ) vⱼ over all j, j ≤ i (causal), or j ≥ i (causal and reverse).

    q (B, H, N, F), k (B, H, Nk, F), v (B, H, Nk, E) -> (B, H, N, E). Causal needs N == Nk and is
    computed in chunks (see README.md). ``key_max`` (B, H, N), causal only: the running key max M
    of :func:`causal_key_max`; each term then takes the factor exp(−|Mᵢ − Mⱼ|) ≤ 1, i.e.
    exp(Mⱼ − Mᵢ) for j ≤ i, as the causal softmax features need.
    """
    if not causal:
        return q @ (k.transpose(-1, -2) @ v)
    if reverse:
        # oᵢ = Σ_{j ≥ i} (qᵢ·kⱼ)·exp(Mᵢ − Mⱼ) vⱼ: the forward sum over the flipped positions with
        # the stabilizer −M (flipped, again nondecreasing).
        km = None if key_max is None else -key_max.flip(2)
        return linear_attention(q.flip(2), k.flip(2), v.flip(2), True, False, chunk_size, km).flip(2)
    B, H, N = q.shape[:3]
    C = chunk_size
    qc, kc, vc = _chunk(q, C), _chunk(k, C), _chunk(v, C)
    nc = qc.shape[2]
    if key_max is None:
        state = kc.transpose(-1, -2) @ vc  # (B, H, nc, F, E): per-chunk φ(K_c)ᵀ V_c
        # Exclusive prefix over chunks: chunk c sees the states of chunks < c.
        prefix = torch.cumsum(F.pad(state[:, :, :-1], (0, 0, 0, 0, 1, 0)), dim=2)
        scores = (qc @ kc.transpose(-1, -2)).tril()  # (B, H, nc, C, C)
        out = qc @ prefix + scores @ vc
    else:
        if N == 0:
            return q.new_zeros(B, H, 0, v.shape[-1])
        pad = nc * C - N
        mx = torch.cat([key_max, key_max[..., -1:].expand(B, H, pad)], dim=-1).reshape(B, H, nc, C)
        end = mx[..., -1]  # Eᶜ: the stabilizer at the chunk's last position, the largest in it
        before = torch.cat([mx[..., :1, 0], end[..., :-1]], dim=-1)  # Eᶜ⁻¹ (chunk 0: M₀, its state is 0)
        # Chunk c's state at scale Eᶜ: Σⱼ kⱼ·exp(Mⱼ − Eᶜ) ⊗ vⱼ.
        state = (kc * torch.exp(mx - end[..., None])[..., None]).transpose(-1, -2) @ vc
        # Chunk c's exclusive prefix at scale Eᶜ⁻¹: Σ_{c' < c} state_{c'}·exp(E^{c'} − Eᶜ⁻¹), every
        # exponent ≤ 0. A (nc × nc) weight matrix keeps it one batched product, with no loop over
        # chunks (cumsum cannot rescale): nc²·F·E FLOPs per head.
        lower = torch.ones(nc, nc, dtype=torch.bool, device=q.device).tril(-1)
        wgt = torch.exp((end[..., None, :] - before[..., :, None]).masked_fill(~lower, float("-inf")))
        prefix = (wgt @ state.flatten(3)).view(state.shape)
        # Query i of chunk c reads it at scale Mᵢ: exp(Eᶜ⁻¹ − Mᵢ); keys j ≤ i of its own chunk
        # take exp(Mⱼ − Mᵢ).
        rel = (mx[..., None, :] - mx[..., :, None]).clamp_max(0.0)
        scores = ((qc @ kc.transpose(-1, -2)) * torch.exp(rel)).tril()
        out = (qc @ prefix) * torch.exp(before[..., None] - mx)[..., None] + scores @ vc
    return out.reshape(B, H, nc * C, v.shape[-1])[:, :, :N]


def _augment(v: Tensor) -> Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size):
    """φ(q), φ(k), V' = [V, 1], out = num/den, den with 0 replaced by 1 (all in fp32+), and the
    causal softmax key stabilizer M (:func:`causal_key_max`; else None)."""
    km = causal_key_max(k, omega, scale, key_mask) if causal and kernel_fn == "softmax" else None
    phiq = feature_map(q, omega, kernel_fn, scale, True, causal)
    phik = feature_map(k, omega, kernel_fn, scale, False, causal, key_mask, km)
    v1 = _augment(v.to(phiq.dtype))
    nd = linear_attention(phiq, phik, v1, causal, chunk_size=chunk_size, key_max=km)
    num, den = nd[..., :-1], nd[..., -1:]
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return phiq, phik, v1, num / safe, safe, km


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
    phiq, phik, v1, out, safe, km = _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)
    g = grad.to(out.dtype)
    # [num, den] = lin(φq, φk, V'): its upstream gradient G' = [g/den, −Σ g·out / den] (0 where
    # den < DEN_MIN; den = 0 has safe = 1).
    tiny = DEN_MIN_F64 if out.dtype == torch.float64 else DEN_MIN
    inv = torch.where(safe < tiny, torch.zeros_like(safe), 1.0 / safe)
    gaug = torch.cat([g * inv, -(g * out).sum(-1, keepdim=True) * inv], dim=-1)
    dphiq = linear_attention(gaug, v1, phik, causal, chunk_size=chunk_size, key_max=km)
    dphik = linear_attention(v1, gaug, phiq, causal, reverse=True, chunk_size=chunk_size, key_max=km)
    dv1 = linear_attention(phik, phiq, gaug, causal, reverse=True, chunk_size=chunk_size, key_max=km)
    dq = feature_map_backward(dphiq, q, phiq, omega, kernel_fn, scale)
    dk = feature_map_backward(dphik, k, phik, omega, kernel_fn, scale, key_mask)
    return dq.to(q.dtype), dk.to(k.dtype), dv1[..., :-1].to(v.dtype)
