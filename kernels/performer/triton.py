"""Triton kernels for Performer (FAVOR+) attention, forward and backward (math in README.md).

Same functions and signatures as :mod:`.reference` (``chunk_size`` defaults to a tuned value).
Every kernel is launched through ``torch.library.wrap_triton`` so the panther ops can trace them.

Work is cut into chunks of ``BN`` positions; each program owns a *segment* of consecutive chunks
of one (batch, head) and walks it carrying an m×E state in registers. The feature map is fused
with the projection by ω, so φ(Q) and φ(K) never reach memory.

* ``_state_kernel``: per segment, S = Σ φ(k)ᵀv and z = Σ φ(k) over its keys. Non-causal softmax
  keys use an online running max (rescaling S and z when it grows), so the stabilizer costs no
  extra pass over K.
* ``_reduce_kernel``: combines the segments of each (batch, head): a sum (rescaled to the global
  key max for softmax keys), or exclusive prefix (causal forward) / suffix (causal backward) sums.
* ``_fwd_kernel``: out = (φ(q)·S + intra-chunk masked quadratic part) / (φ(q)·z + …).
* ``_bwd_q_kernel``: recomputes out and den, forms G' = [g/den, −Σ g·out/den], writes dq, and
  sums R = Σ φ(q)ᵀG' per segment (causal: also stores G' for the key pass).
* ``_bwd_k_kernel``: dv = φ(k)·R and dφ(k) = V'·Rᵀ (causal: R is the suffix over later queries,
  chunks walked backward, plus the intra-chunk part), then dk through the feature map.

Shapes: padded head dim D and value dim E up to ``MAX_TILE`` = 128 and m ≤ 256 (``supports``):
ω and the state are held whole on chip, so wider codes (e.g. sinSRPE with R = 256) go to the
reference through the op's dispatch. Tiling over D would lift that.

Extra memory: the per-segment states (B·H·P·m·E fp32, P ≈ 4·SMs/(B·H)) and, for the causal
backward, G' (B·H·N·(E+1) fp32). Never N×N, never N×m.

Operands of the products: bf16 for bf16 inputs; fp32 (TF32 for fp16 inputs, full fp32 for fp32
ones) otherwise, because causal φ(k) can fall below fp16's range. Accumulation is fp32 throughout.

Causal keys use the stabilizer c = maxⱼ‖ωⱼ‖²/2 − 40 (``_causal_c2``): any per-head constant
cancels in the num/den ratio, and the shift keeps φ(k) = exp(−‖ωⱼ − k‖²/2 + …) out of the fp32
subnormal range (flushed to zero on the GPU) for head dims ≥ 128, while φ(k) ≤ e^40/√m still
leaves the sums far from overflow.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .reference import RELU_EPS

# (chunk, warps) per kernel group: "fwd" (the key pass and the output pass) and "bwd" (the backward
# passes; a causal backward also runs its own key pass with it, so that both cut the sequence into
# the same segments). TUNED is the best of `python -m panther bench attention --sweep` on an H200
# (bf16, B=4, H=12, N=16384, d=64, m=256; docs/benchmarks.md) and serves bf16 with head and value
# dims ≤ 64 and m ≤ 256. Larger tiles (fp16/fp32 state, d = 128, m > 256) use SAFE, whose settings
# passed the GPU tests at every dtype and head dim (a 128-row chunk there overflows shared memory).
TUNED = {
    ("noncausal", "fwd"): (128, 8),
    ("noncausal", "bwd"): (32, 8),
    ("causal", "fwd"): (16, 8),
    ("causal", "bwd"): (16, 8),
}
SAFE = {
    ("noncausal", "fwd"): (64, 4),
    ("noncausal", "bwd"): (32, 8),
    ("causal", "fwd"): (16, 8),
    ("causal", "bwd"): (16, 8),
}
# Warps override for every kernel (the benchmark's --sweep sets it); None: TUNED, or 4 for small
# tiles (m·max(E, D) < 128·64).
NUM_WARPS: int | None = None
# Programs to aim for per launch, as a multiple of the SM count (CPU/interpreter: a small fixed
# number, so small test shapes still get several segments).
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3

__all__ = ["MAX_TILE", "performer_attention", "performer_attention_backward", "supports"]

# Each program keeps a (m × D) tile of ω and an (m × E) fp32 state on chip, without tiling over D
# or E: past 128 (padded) either would overflow Hopper's 227 KB of shared memory at m = 256
# (seen: the spec's sinSRPE example, D = R = 256, fp32, asked for more than the limit).
MAX_TILE = 128


def supports(q: torch.Tensor, v: torch.Tensor, omega: torch.Tensor) -> bool:
    """Whether these kernels handle the shapes: padded head dim D and value dim E ≤ MAX_TILE,
    m ≤ 256. Callers use the reference elsewhere."""
    return _pow2(q.shape[-1]) <= MAX_TILE and _pow2(v.shape[-1]) <= MAX_TILE and _pow2(omega.shape[-2]) <= 256


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b with fp32 accumulation. The interpreter multiplies bf16 as raw bits (triton 3.9), so
    there bf16 operands go through fp32 (exact: bf16 products are exact in fp32)."""
    if INTERP and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _rne_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32. The interpreter's own
    fp32→bf16 cast truncates; the GPU's rounds to nearest: this makes the two agree."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """x.to(DT), rounding to nearest also under the interpreter."""
    if INTERP and DT == tl.bfloat16:
        return _rne_bf16(x.to(tl.float32)).to(DT)
    else:
        return x.to(DT)


@triton.jit
def _mm(a, b, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """Feature-side product: operands in fp32 (fp32/fp16 inputs) or bf16 (bf16 inputs)."""
    if FEAT_F32:
        return _dot(a.to(tl.float32), b.to(tl.float32), PREC, INTERP)
    elif INTERP:
        return tl.dot(_rne_bf16(a.to(tl.float32)), _rne_bf16(b.to(tl.float32)))
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _f32(a, b, c, d):
    """Scalar arguments as fp32 (Inductor's launcher may type Python floats as fp64)."""
    return tl.cast(a, tl.float32), tl.cast(b, tl.float32), tl.cast(c, tl.float32), tl.cast(d, tl.float32)


@triton.jit
def _load_rows(base, rows, cols, n_rows, n_cols, s_row, s_col):
    """(len(rows), len(cols)) tile, zero outside [0, n_rows) × [0, n_cols)."""
    return tl.load(
        base + rows[:, None] * s_row + cols[None, :] * s_col,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _logits(x, w, rs, PREC: tl.constexpr, INTERP: tl.constexpr):
    """(ω·xs − ‖xs‖²/2)·log2(e) of shape (BN, BM), and ω·x (unscaled projection)."""
    proj = _dot(x, tl.trans(w), PREC, INTERP)
    xf = x.to(tl.float32)
    half = (0.5 * rs * rs * 1.4426950408889634) * tl.sum(xf * xf, 1)
    return proj * (rs * 1.4426950408889634) - half[:, None], proj


@triton.jit
def _phi_query(x, w, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """φ(q) (BN, BM) fp32, zero on padded features; and the projection ω·x for the relu backward."""
    if SOFTMAX:
        lg, proj = _logits(x, w, rs, PREC, INTERP)
        lg = tl.where(fvalid[None, :], lg, float("-inf"))
        mx = tl.max(lg, 1)
        phi = tl.exp2(lg - (mx + log2_sqrt_m)[:, None])
    else:
        proj = _dot(x, tl.trans(w), PREC, INTERP)
        phi = tl.where(fvalid[None, :], tl.maximum(proj * rs, 0.0) * inv_sqrt_m + eps, 0.0)
    return phi, proj


@triton.jit
def _phi_key(x, w, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """φ(k) (BN, BM) fp32 with a given stabilizer c2 (log2 units, includes log2 √m); zero on
    masked or padded keys and padded features."""
    valid = rvalid[:, None] & fvalid[None, :]
    if SOFTMAX:
        lg, proj = _logits(x, w, rs, PREC, INTERP)
        phi = tl.where(valid, tl.exp2(lg - c2), 0.0)
    else:
        proj = _dot(x, tl.trans(w), PREC, INTERP)
        phi = tl.where(valid, tl.maximum(proj * rs, 0.0) * inv_sqrt_m + eps, 0.0)
    return phi, proj


@triton.jit
def _phi_backward(dphi, phi, proj, x, w, rvalid, rs, inv_sqrt_m, SOFTMAX: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """dx (BN, BD) fp32 from dφ: softmax dxs = (dφ·φ)·ω − Σ(dφ·φ)·xs, relu dxs = (dφ·1[ω·xs>0]/√m)·ω."""
    if SOFTMAX:
        t = dphi * phi
        dxs = _mm(t, w, FEAT_F32, PREC, INTERP) - (tl.sum(t, 1) * rs)[:, None] * x.to(tl.float32)
    else:
        t = tl.where(rvalid[:, None] & (proj > 0), dphi * inv_sqrt_m, 0.0)
        dxs = _mm(t, w, FEAT_F32, PREC, INTERP)
    return dxs * rs


@triton.jit
def _load_omega(W, h, D, M, BD: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr):
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    w = tl.load(
        W + h * M * D + offs_m[:, None] * D + offs_d[None, :],
        mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
        other=0.0,
    )
    return _cast(w, DT, INTERP)


@triton.jit
def _causal_c2(W, h, D, M, log2_sqrt_m, BD: tl.constexpr, BM: tl.constexpr):
    """Causal key stabilizer of head h in log2 units, log2 √m folded in:
    (maxⱼ‖ωⱼ‖²/2 − 40)·log2(e) + log2 √m (the shift of 40: see the module docstring)."""
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    w = tl.load(
        W + h * M * D + offs_m[:, None] * D + offs_d[None, :],
        mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    return (0.5 * tl.max(tl.sum(w * w, 1), 0) - 40.0) * 1.4426950408889634 + log2_sqrt_m


@triton.jit
def _key_valid(MASK, b, rows, Nk, smb, smn, HAS_MASK: tl.constexpr):
    rvalid = rows < Nk
    if HAS_MASK:
        km = tl.load(MASK + b * smb + rows * smn, mask=rvalid, other=0)
        rvalid = rvalid & (km != 0)
    return rvalid


# ---------------------------------------------------------------------------------------------
# kernels (grid: (segments, B·H); program (s, bh) walks chunks [s·CPS, (s+1)·CPS) )
# ---------------------------------------------------------------------------------------------


@triton.jit
def _state_kernel(
    K, V, W, MASK, S_OUT, Z_OUT, C_OUT,
    Nk, D, E, M, H,
    skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = tl.program_id(1)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    nseg = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    c2 = 0.0
    if SOFTMAX and CAUSAL:
        c2 = _causal_c2(W, h, D, M, log2_sqrt_m, BD, BM)
    S = tl.zeros((BM, BE), tl.float32)
    z = tl.zeros((BM,), tl.float32)
    run = tl.max(tl.full((BN,), -1e30, tl.float32), 0)  # running max (log2 units), non-causal softmax
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(Nk, BN))
    for ci in range(c_start, c_end):
        w = _load_omega(W, h, D, M, BD, BM, K.dtype.element_ty, INTERP)
        rows = ci * BN + offs_n
        rvalid = _key_valid(MASK, b, rows, Nk, smb, smn, HAS_MASK)
        x = _load_rows(Kb, rows, offs_d, Nk, D, skn, skd)
        vt = _load_rows(Vb, rows, offs_e, Nk, E, svn, sve)
        if SOFTMAX and not CAUSAL:
            lg, proj = _logits(x, w, rs, PREC, INTERP)
            lg = tl.where(rvalid[:, None] & fvalid[None, :], lg, float("-inf"))
            new = tl.maximum(run, tl.max(lg))
            alpha = tl.exp2(run - new)
            S = S * alpha
            z = z * alpha
            run = new
            phi = tl.exp2(lg - (new + log2_sqrt_m))
        else:
            phi, proj = _phi_key(x, w, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX, PREC, INTERP)
        S += _mm(tl.trans(phi), vt, FEAT_F32, PREC, INTERP)
        z += tl.sum(phi, 0)
    out = bh * nseg + seg
    tl.store(S_OUT + out * BM * BE + offs_m[:, None] * BE + offs_e[None, :], S)
    tl.store(Z_OUT + out * BM + offs_m, z)
    if SOFTMAX and not CAUSAL:
        tl.store(C_OUT + out, run)


@triton.jit
def _fwd_kernel(
    Q, K, V, W, MASK, S_IN, Z_IN, O,
    N, D, E, M, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    sob, soh, son, soe,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = tl.program_id(1)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    Ob = O + b * sob + h * soh
    tile = offs_m[:, None] * BE + offs_e[None, :]
    # The whole-sequence state (non-causal; bf16 for bf16 inputs) or, carried from chunk to chunk,
    # this segment's exclusive prefix (causal; fp32).
    st = bh * tl.num_programs(0) + seg if CAUSAL else bh
    S = tl.load(S_IN + st * BM * BE + tile)
    z = tl.load(Z_IN + st * BM + offs_m)
    c2 = 0.0
    if SOFTMAX and CAUSAL:
        c2 = _causal_c2(W, h, D, M, log2_sqrt_m, BD, BM)
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(N, BN))
    for ci in range(c_start, c_end):
        w = _load_omega(W, h, D, M, BD, BM, Q.dtype.element_ty, INTERP)
        rows = ci * BN + offs_n
        x = _load_rows(Qb, rows, offs_d, N, D, sqn, sqd)
        phq, _ = _phi_query(x, w, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX, PREC, INTERP)
        num = _mm(phq, S, FEAT_F32, PREC, INTERP)
        den = tl.sum(phq * z[None, :], 1)
        if CAUSAL:
            rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
            xk = _load_rows(Kb, rows, offs_d, N, D, skn, skd)
            vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)
            phk, _ = _phi_key(xk, w, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX, PREC, INTERP)
            sc = _mm(phq, tl.trans(phk), FEAT_F32, PREC, INTERP)
            sc = tl.where(offs_n[:, None] >= offs_n[None, :], sc, 0.0)
            num += _mm(sc, vt, FEAT_F32, PREC, INTERP)
            den += tl.sum(sc, 1)
            S += _mm(tl.trans(phk), vt, FEAT_F32, PREC, INTERP)
            z += tl.sum(phk, 0)
        out = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(
            Ob + rows[:, None] * son + offs_e[None, :] * soe,
            _cast(out, O.dtype.element_ty, INTERP),
            mask=(rows[:, None] < N) & (offs_e[None, :] < E),
        )


@triton.jit
def _bwd_q_kernel(
    G, Q, K, V, W, MASK, S_IN, Z_IN, DQ, R_OUT, RZ_OUT, GS, GD,
    N, D, E, M, H,
    sgb, sgh, sgn, sge, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = tl.program_id(1)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    nseg = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Gb = G + b * sgb + h * sgh
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    tile = offs_m[:, None] * BE + offs_e[None, :]
    st = bh * nseg + seg if CAUSAL else bh  # as in _fwd_kernel
    S = tl.load(S_IN + st * BM * BE + tile)
    z = tl.load(Z_IN + st * BM + offs_m)
    c2 = 0.0
    if SOFTMAX and CAUSAL:
        c2 = _causal_c2(W, h, D, M, log2_sqrt_m, BD, BM)
    R = tl.zeros((BM, BE), tl.float32)  # Σ φ(q)ᵀ g/den over this segment
    rz = tl.zeros((BM,), tl.float32)  # Σ φ(q)ᵀ gden
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(N, BN))
    for ci in range(c_start, c_end):
        w = _load_omega(W, h, D, M, BD, BM, Q.dtype.element_ty, INTERP)
        rows = ci * BN + offs_n
        x = _load_rows(Qb, rows, offs_d, N, D, sqn, sqd)
        phq, projq = _phi_query(x, w, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX, PREC, INTERP)
        num = _mm(phq, S, FEAT_F32, PREC, INTERP)
        den = tl.sum(phq * z[None, :], 1)
        if CAUSAL:
            rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
            xk = _load_rows(Kb, rows, offs_d, N, D, skn, skd)
            vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)
            phk, _ = _phi_key(xk, w, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX, PREC, INTERP)
            sc = _mm(phq, tl.trans(phk), FEAT_F32, PREC, INTERP)
            sc = tl.where(offs_n[:, None] >= offs_n[None, :], sc, 0.0)
            num += _mm(sc, vt, FEAT_F32, PREC, INTERP)
            den += tl.sum(sc, 1)
        inv = 1.0 / tl.where(den == 0.0, 1.0, den)
        g = _load_rows(Gb, rows, offs_e, N, E, sgn, sge).to(tl.float32)
        gs = g * inv[:, None]
        gd = -tl.sum(gs * num, 1) * inv  # −Σ g·out / den
        # dφ(q) = G'·[S; z]ᵀ (+ intra-chunk (G'·V'ᵀ masked)·φ(k))
        dphi = _mm(gs, tl.trans(S), FEAT_F32, PREC, INTERP) + gd[:, None] * z[None, :]
        if CAUSAL:
            p = _mm(gs, tl.trans(vt), FEAT_F32, PREC, INTERP) + gd[:, None]
            p = tl.where(offs_n[:, None] >= offs_n[None, :], p, 0.0)
            dphi += _mm(p, phk, FEAT_F32, PREC, INTERP)
            S += _mm(tl.trans(phk), vt, FEAT_F32, PREC, INTERP)
            z += tl.sum(phk, 0)
            tl.store(GS + bh * N * BE + rows[:, None] * BE + offs_e[None, :], gs, mask=rows[:, None] < N)
            tl.store(GD + bh * N + rows, gd, mask=rows < N)
        qvalid = rows < N
        dx = _phi_backward(dphi, phq, projq, x, w, qvalid, rs, inv_sqrt_m, SOFTMAX, FEAT_F32, PREC, INTERP)
        tl.store(
            DQ + bh * N * D + rows[:, None] * D + offs_d[None, :],
            _cast(dx, DQ.dtype.element_ty, INTERP),
            mask=qvalid[:, None] & (offs_d[None, :] < D),
        )
        phq = tl.where(qvalid[:, None], phq, 0.0)
        R += _mm(tl.trans(phq), gs, FEAT_F32, PREC, INTERP)
        rz += tl.sum(phq * gd[:, None], 0)
    out = bh * nseg + seg
    tl.store(R_OUT + out * BM * BE + offs_m[:, None] * BE + offs_e[None, :], R)
    tl.store(RZ_OUT + out * BM + offs_m, rz)


@triton.jit
def _bwd_k_kernel(
    Q, K, V, W, MASK, CK, R_IN, RZ_IN, GS, GD, DK, DV,
    N, Nk, D, E, M, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = tl.program_id(1)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    nseg = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    # R = Σ φ(q)ᵀG' over the queries that see these keys: all (non-causal), or the later segments.
    tile = offs_m[:, None] * BE + offs_e[None, :]
    # R = Σ φ(q)ᵀG' over the queries that see these keys: all (non-causal; bf16 for bf16 inputs),
    # or, carried backward from chunk to chunk, the later segments' (causal; fp32).
    st = bh * nseg + seg if CAUSAL else bh
    R = tl.load(R_IN + st * BM * BE + tile)
    rz = tl.load(RZ_IN + st * BM + offs_m)
    c2 = 0.0
    if SOFTMAX:
        if CAUSAL:
            c2 = _causal_c2(W, h, D, M, log2_sqrt_m, BD, BM)
        else:
            c2 = tl.load(CK + bh)  # the global key max of the forward pass
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(Nk, BN))
    for i in range(c_start, c_end):
        ci = c_end - 1 - (i - c_start) if CAUSAL else i  # causal: walk the chunks backward
        w = _load_omega(W, h, D, M, BD, BM, K.dtype.element_ty, INTERP)
        rows = ci * BN + offs_n
        rvalid = _key_valid(MASK, b, rows, Nk, smb, smn, HAS_MASK)
        x = _load_rows(Kb, rows, offs_d, Nk, D, skn, skd)
        vt = _load_rows(Vb, rows, offs_e, Nk, E, svn, sve)
        phk, projk = _phi_key(x, w, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX, PREC, INTERP)
        dphi = _mm(vt, tl.trans(R), FEAT_F32, PREC, INTERP) + rz[None, :]
        dv = _mm(phk, R, FEAT_F32, PREC, INTERP)
        if CAUSAL:
            xq = _load_rows(Qb, rows, offs_d, N, D, sqn, sqd)
            phq, _ = _phi_query(xq, w, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX, PREC, INTERP)
            gs = tl.load(GS + bh * N * BE + rows[:, None] * BE + offs_e[None, :], mask=rows[:, None] < N, other=0.0)
            gd = tl.load(GD + bh * N + rows, mask=rows < N, other=0.0)
            upper = offs_n[:, None] <= offs_n[None, :]  # (key j, query i): i ≥ j
            p = _mm(vt, tl.trans(gs), FEAT_F32, PREC, INTERP) + gd[None, :]
            dphi += _mm(tl.where(upper, p, 0.0), phq, FEAT_F32, PREC, INTERP)
            sc = _mm(phk, tl.trans(phq), FEAT_F32, PREC, INTERP)
            dv += _mm(tl.where(upper, sc, 0.0), gs, FEAT_F32, PREC, INTERP)
            R += _mm(tl.trans(phq), gs, FEAT_F32, PREC, INTERP)
            rz += tl.sum(phq * gd[:, None], 0)
        dx = _phi_backward(dphi, phk, projk, x, w, rvalid, rs, inv_sqrt_m, SOFTMAX, FEAT_F32, PREC, INTERP)
        kvalid = rows < Nk
        tl.store(
            DK + bh * Nk * D + rows[:, None] * D + offs_d[None, :],
            _cast(dx, DK.dtype.element_ty, INTERP),
            mask=kvalid[:, None] & (offs_d[None, :] < D),
        )
        tl.store(
            DV + bh * Nk * E + rows[:, None] * E + offs_e[None, :],
            _cast(dv, DV.dtype.element_ty, INTERP),
            mask=kvalid[:, None] & (offs_e[None, :] < E),
        )


@triton.jit
def _reduce_kernel(
    S, Z, C, S_OUT, Z_OUT, C_OUT, P, log2_sqrt_m,
    BM: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr, MODE: tl.constexpr, INTERP: tl.constexpr,
):
    """Combine the P segment states (S, z) of one (batch, head), grid (B·H,):
    MODE 0: sum; 1: sum rescaled to the largest segment max C (also written, as the key
    stabilizer with log2 √m folded in); 2/3: exclusive prefix / suffix sums, in place.
    Modes 0/1 write S in S_OUT's dtype (bf16 for bf16 inputs: the operand dtype of its products)."""
    bh = tl.program_id(0)
    offs_m = tl.arange(0, BM)
    tile = offs_m[:, None] * BE + tl.arange(0, BE)[None, :]
    cmax = 0.0
    if MODE == 1:
        offs_p = tl.arange(0, BP)
        cmax = tl.max(tl.load(C + bh * P + offs_p, mask=offs_p < P, other=-1e30), 0)
        cmax = tl.where(cmax > -1e29, cmax, 0.0)  # every key masked: c = 0
    acc = tl.zeros((BM, BE), tl.float32)
    accz = tl.zeros((BM,), tl.float32)
    for i in range(0, P):
        p = bh * P + (P - 1 - i if MODE == 3 else i)
        s = tl.load(S + p * BM * BE + tile)
        z = tl.load(Z + p * BM + offs_m)
        if MODE >= 2:
            tl.store(S + p * BM * BE + tile, acc)
            tl.store(Z + p * BM + offs_m, accz)
        if MODE == 1:
            wgt = tl.exp2(tl.load(C + p) - cmax)
            s = s * wgt
            z = z * wgt
        acc += s
        accz += z
    if MODE < 2:
        tl.store(S_OUT + bh * BM * BE + tile, _cast(acc, S_OUT.dtype.element_ty, INTERP))
        tl.store(Z_OUT + bh * BM + offs_m, accz)
    if MODE == 1:
        tl.store(C_OUT + bh, cmax + tl.cast(log2_sqrt_m, tl.float32))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------




def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return PROGRAMS_PER_SM * _SM_COUNT[idx]


def _segments(n: int, bn: int, bh: int, device: torch.device) -> tuple[int, int]:
    """(segments, chunks per segment) for n positions in chunks of bn, over bh (batch, head)s."""
    chunks = max(1, triton.cdiv(n, bn))
    want = min(chunks, max(1, triton.cdiv(_target_programs(device), bh)))
    cps = triton.cdiv(chunks, want)
    return triton.cdiv(chunks, cps), cps


class _Plan:
    """Validated shapes, block sizes and launch settings of one call; launches the kernels."""

    def __init__(self, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size):
        if kernel_fn not in ("softmax", "relu"):
            raise ValueError(f"kernel_fn must be one of ['softmax', 'relu'], got {kernel_fn!r}")
        B, H, N, D = q.shape
        Nk, E, m = k.shape[2], v.shape[3], omega.shape[1]
        if k.shape != (B, H, Nk, D) or v.shape[:3] != (B, H, Nk) or omega.shape != (H, m, D):
            raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, omega {tuple(omega.shape)}")
        if causal and N != Nk:
            raise ValueError(f"causal attention needs as many queries as keys, got {N} and {Nk}")
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
        if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
            raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
        self.B, self.H, self.N, self.Nk, self.D, self.E, self.m = B, H, N, Nk, D, E, m
        self.BH = B * H
        self.softmax, self.causal, self.device = kernel_fn == "softmax", causal, q.device
        self.chunk_size = chunk_size
        self.omega = omega.contiguous()
        if key_mask is not None:
            if key_mask.shape != (B, Nk):
                raise ValueError(f"key_mask must have shape {(B, Nk)}, got {tuple(key_mask.shape)}")
            self.mask = key_mask if key_mask.dtype == torch.bool else key_mask != 0
            self.mask_strides = (self.mask.stride(0), self.mask.stride(1))
        else:
            self.mask, self.mask_strides = q, (0, 0)  # never read (HAS_MASK is false)
        self.BD, self.BE, self.BM = _pow2(D), _pow2(E), _pow2(m)
        feat_f32 = q.dtype != torch.bfloat16
        self.common = dict(
            BD=self.BD, BE=self.BE, BM=self.BM, SOFTMAX=self.softmax, CAUSAL=causal, HAS_MASK=key_mask is not None,
            FEAT_F32=feat_f32, PREC="ieee" if q.dtype == torch.float32 else "tf32", INTERP=q.device.type == "cpu",
        )
        self.scal = (math.sqrt(scale), 0.5 * math.log2(m), 1.0 / math.sqrt(m), RELU_EPS)
        self.small = self.BM * max(self.BE, self.BD) < 128 * 64
        self.settings = TUNED if not feat_f32 and max(self.BD, self.BE) <= 64 and self.BM <= 256 else SAFE
        # Software-pipelining depth: the loop's loads (ω, q/k, v tiles) are multi-buffered in shared
        # memory beside the state; deep pipelines of large tiles overflow it (227 KB on Hopper).
        big = (4 if feat_f32 else 2) * self.BM * self.BE + q.element_size() * self.BM * self.BD
        self.num_stages = 3 if big <= 64 * 1024 else 2 if big <= 96 * 1024 and not feat_f32 else 1
        self.f32 = dict(device=q.device, dtype=torch.float32)

    def tiles(self, group: str) -> tuple[int, int]:
        """(chunk, warps) of a kernel group: "fwd" (state and output passes) or "bwd"."""
        bn, warps = self.settings[("causal" if self.causal else "noncausal", group)]
        if self.chunk_size is not None:
            bn = self.chunk_size
        return bn, NUM_WARPS or (4 if self.small else warps)

    def launch(self, kernel, grid, args, group: str) -> None:
        bn, warps = self.tiles(group)
        kw = dict(BN=bn, num_warps=warps, num_stages=self.num_stages, **self.common)
        try:
            torch.library.wrap_triton(kernel)[grid](*args, **kw)
        except OutOfResources:
            if kw["num_stages"] == 1:
                raise
            kw["num_stages"] = 1  # a shape the heuristic above misjudged
            torch.library.wrap_triton(kernel)[grid](*args, **kw)

    def reduce(self, S, z, c, mode: int):
        """_reduce_kernel over dim 1 of S (BH, P, BM, BE) and z (BH, P, BM); see its docstring."""
        P = S.shape[1]
        sdt = torch.float32 if self.common["FEAT_F32"] else torch.bfloat16
        out = (torch.empty(self.BH, self.BM, self.BE, device=self.device, dtype=sdt), torch.empty(self.BH, self.BM, **self.f32)) if mode < 2 else (S, z)
        cout = torch.empty(self.BH, **self.f32) if mode == 1 else z
        torch.library.wrap_triton(_reduce_kernel)[(self.BH,)](
            S, z, c if c is not None else z, *out, cout, P, self.scal[1],
            BM=self.BM, BE=self.BE, BP=triton.next_power_of_2(P), MODE=mode, INTERP=self.common["INTERP"],
            num_warps=4 if self.small else 8,
        )
        return out[0], out[1], cout if mode == 1 else None

    def forward_state(self, k, v, group: str):
        """Key pass: (S, z, c_key, segments, chunks per segment). Non-causal: the whole-sequence
        state per (batch, head) and (softmax) the global key stabilizer; causal: per-segment
        exclusive prefix states."""
        bn, _ = self.tiles(group)
        P, cps = _segments(self.Nk, bn, self.BH, self.device)
        S = torch.empty(self.BH, P, self.BM, self.BE, **self.f32)
        z = torch.empty(self.BH, P, self.BM, **self.f32)
        c = torch.empty(self.BH, P, **self.f32)
        self.launch(
            _state_kernel, (P, self.BH),
            (k, v, self.omega, self.mask, S, z, c, self.Nk, self.D, self.E, self.m, self.H,
             *k.stride(), *v.stride(), *self.mask_strides, *self.scal, cps),
            group,
        )
        if self.causal:
            S, z, _ = self.reduce(S, z, None, 2)
            return S, z, None, P, cps
        S, z, ckey = self.reduce(S, z, c, 1 if self.softmax else 0)
        return S, z, ckey, P, cps


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
    chunk_size: int | None = None,
) -> Tensor:
    """Performer attention output (B, H, N, E) in v's dtype; same contract as the reference.

    ``chunk_size`` (a power of two ≥ 16) overrides the tuned chunk of every kernel.
    """
    plan = _Plan(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)
    S, z, _, P, cps = plan.forward_state(k, v, "fwd")
    if not causal:
        P, cps = _segments(plan.N, plan.tiles("fwd")[0], plan.BH, plan.device)
    out = torch.empty(plan.B, plan.H, plan.N, plan.E, device=q.device, dtype=v.dtype)
    plan.launch(
        _fwd_kernel, (P, plan.BH),
        (q, k, v, plan.omega, plan.mask, S, z, out, plan.N, plan.D, plan.E, plan.m, plan.H,
         *q.stride(), *k.stride(), *v.stride(), *plan.mask_strides, *out.stride(), *plan.scal, cps),
        "fwd",
    )
    return out


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
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`performer_attention` given grad = ∂loss/∂out; omega gets no gradient."""
    plan = _Plan(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)
    B, H, N, Nk, D, E, BH = plan.B, plan.H, plan.N, plan.Nk, plan.D, plan.E, plan.BH
    if grad.shape != (B, H, N, E):
        raise ValueError(f"grad must have shape {(B, H, N, E)}, got {tuple(grad.shape)}")
    # Causal: the key pass must cut the same segments as the backward passes.
    S, z, ckey, P, cps = plan.forward_state(k, v, "bwd" if causal else "fwd")
    bn = plan.tiles("bwd")[0]
    if causal:
        gs = torch.empty(BH, N, plan.BE, **plan.f32)  # G' = [g/den, −Σ g·out/den] for the key pass
        gd = torch.empty(BH, N, **plan.f32)
    else:
        P, cps = _segments(N, bn, BH, plan.device)
        gs = gd = z  # unused
    R = torch.empty(BH, P, plan.BM, plan.BE, **plan.f32)
    rz = torch.empty(BH, P, plan.BM, **plan.f32)
    dq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    plan.launch(
        _bwd_q_kernel, (P, BH),
        (grad, q, k, v, plan.omega, plan.mask, S, z, dq, R, rz, gs, gd, N, D, E, plan.m, H,
         *grad.stride(), *q.stride(), *k.stride(), *v.stride(), *plan.mask_strides, *plan.scal, cps),
        "bwd",
    )
    if causal:
        R, rz, _ = plan.reduce(R, rz, None, 3)
    else:
        R, rz, _ = plan.reduce(R, rz, None, 0)
        P, cps = _segments(Nk, bn, BH, plan.device)
    dk = torch.empty(B, H, Nk, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, H, Nk, E, device=q.device, dtype=v.dtype)
    plan.launch(
        _bwd_k_kernel, (P, BH),
        (q, k, v, plan.omega, plan.mask, ckey if ckey is not None else z, R, rz, gs, gd, dk, dv, N, Nk, D, E, plan.m, H,
         *q.stride(), *k.stride(), *v.stride(), *plan.mask_strides, *plan.scal, cps),
        "bwd",
    )
    return dq, dk, dv
