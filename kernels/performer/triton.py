"""Triton kernels for Performer (FAVOR+) attention, forward and backward (math in README.md).

Same functions and signatures as :mod:`.reference` (``chunk_size`` defaults to a tuned value).
Every kernel is launched through ``torch.library.wrap_triton`` so the panther ops can trace them.

Work is cut into chunks of ``BN`` positions; each program owns a *segment* of consecutive chunks
of one (batch, head) and walks it carrying an m×E state in registers. The feature map is fused
with the projection by ω, so φ(Q) and φ(K) never reach memory.

* ``_state_kernel``: per segment, S = Σ φ(k)ᵀv and z = Σ φ(k) over its keys. Non-causal softmax
  keys use an online running max (rescaling S and z when it grows); the host combines the segments
  with the global max, so the stabilizer costs no extra pass over K. Causal: the host turns the
  segment states into exclusive prefix sums.
* ``_fwd_kernel``: out = (φ(q)·S + intra-chunk masked quadratic part) / (φ(q)·z + …).
* ``_bwd_q_kernel``: recomputes out and den, forms G' = [g/den, −Σ g·out/den], writes dq, and
  sums R = Σ φ(q)ᵀG' per segment (causal: also stores G' for the key pass).
* ``_bwd_k_kernel``: dv = φ(k)·R and dφ(k) = V'·Rᵀ (causal: R is the suffix over later queries,
  chunks walked backward, plus the intra-chunk part), then dk through the feature map.

Extra memory: the per-segment states (B·H·P·m·E fp32, P ≈ 2·SMs/(B·H)) and, for causal backward,
G' (B·H·N·(E+1) fp32). Never N×N, never N×m.

Causal keys use the stabilizer c = maxⱼ‖ωⱼ‖²/2 − ``CAUSAL_KEY_SHIFT``: any per-head constant
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

from .reference import RELU_EPS

LOG2E = 1.4426950408889634
CAUSAL_KEY_SHIFT = 40.0
DEFAULT_CHUNK = 64
# Programs to aim for per launch, as a multiple of the SM count (CPU/interpreter: a small fixed
# number, so small test shapes still get several segments).
PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 3

__all__ = ["performer_attention", "performer_attention_backward"]


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
    K, V, W, MASK, CK, S_OUT, Z_OUT, C_OUT,
    Nk, D, E, M, H,
    skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = tl.program_id(1)
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
        c2 = tl.load(CK + h)
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
    Q, K, V, W, MASK, CK, S_IN, Z_IN, O,
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
    # Initial state: the whole-sequence state (non-causal) or this segment's exclusive prefix.
    st = bh * tl.num_programs(0) + seg if CAUSAL else bh
    S = tl.load(S_IN + st * BM * BE + offs_m[:, None] * BE + offs_e[None, :])
    z = tl.load(Z_IN + st * BM + offs_m)
    c2 = 0.0
    if SOFTMAX and CAUSAL:
        c2 = tl.load(CK + h)
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
    G, Q, K, V, W, MASK, CK, S_IN, Z_IN, DQ, R_OUT, RZ_OUT, GS, GD,
    N, D, E, M, H,
    sgb, sgh, sgn, sge, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = tl.program_id(1)
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
    st = bh * nseg + seg if CAUSAL else bh
    S = tl.load(S_IN + st * BM * BE + offs_m[:, None] * BE + offs_e[None, :])
    z = tl.load(Z_IN + st * BM + offs_m)
    c2 = 0.0
    if SOFTMAX and CAUSAL:
        c2 = tl.load(CK + h)
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
    st = bh * nseg + seg if CAUSAL else bh
    R = tl.load(R_IN + st * BM * BE + offs_m[:, None] * BE + offs_e[None, :])
    rz = tl.load(RZ_IN + st * BM + offs_m)
    c2 = tl.load(CK + (h if CAUSAL else bh)) if SOFTMAX else 0.0
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


class _Cfg:
    """Shapes, block sizes, launch constants and scalars shared by the kernels of one call."""

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
        bn = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
        if bn < 16 or bn & (bn - 1):
            raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
        self.B, self.H, self.N, self.Nk, self.D, self.E, self.m = B, H, N, Nk, D, E, m
        self.BH = B * H
        self.softmax = kernel_fn == "softmax"
        self.causal = causal
        self.device = q.device
        self.omega = omega.contiguous()
        self.key_mask = key_mask
        if key_mask is not None:
            if key_mask.shape != (B, Nk):
                raise ValueError(f"key_mask must have shape {(B, Nk)}, got {tuple(key_mask.shape)}")
            self.mask_arg = key_mask.to(torch.bool).view(torch.uint8)
            self.mask_strides = (self.mask_arg.stride(0), self.mask_arg.stride(1))
        else:
            self.mask_arg = q  # never read (HAS_MASK is false)
            self.mask_strides = (0, 0)
        self.consts = dict(
            BN=bn,
            BD=_pow2(D),
            BE=_pow2(E),
            BM=_pow2(m),
            SOFTMAX=self.softmax,
            CAUSAL=causal,
            HAS_MASK=key_mask is not None,
            FEAT_F32=q.dtype != torch.bfloat16,
            PREC="ieee" if q.dtype == torch.float32 else "tf32",
            INTERP=q.device.type == "cpu",
        )
        self.BM, self.BE = self.consts["BM"], self.consts["BE"]
        self.num_warps = 8 if self.BM * max(self.BE, self.consts["BD"]) >= 128 * 64 else 4
        self.scalars = dict(
            rs=math.sqrt(scale),
            log2_sqrt_m=0.5 * math.log2(m),
            inv_sqrt_m=1.0 / math.sqrt(m),
            eps=RELU_EPS,
        )
        if self.softmax and causal:
            # c = maxⱼ‖ωⱼ‖²/2 − shift (log2 units, with log2 √m folded in), one per head.
            sq = omega.detach().to(torch.float32).square().sum(-1).amax(-1)
            self.ck = ((0.5 * sq - CAUSAL_KEY_SHIFT) * LOG2E + self.scalars["log2_sqrt_m"]).contiguous()
        else:
            self.ck = None

    def key_state(self, k, v):
        """Run _state_kernel; returns per-segment (S, z, c) and the segment layout."""
        P, cps = _segments(self.Nk, self.consts["BN"], self.BH, self.device)
        f32 = dict(device=self.device, dtype=torch.float32)
        S = torch.empty(self.BH, P, self.BM, self.BE, **f32)
        z = torch.empty(self.BH, P, self.BM, **f32)
        c = torch.empty(self.BH, P, **f32)
        self.state_cps = cps
        torch.library.wrap_triton(_state_kernel)[(P, self.BH)](
            k, v, self.omega, self.mask_arg, self.ck if self.ck is not None else c, S, z, c,
            self.Nk, self.D, self.E, self.m, self.H,
            *k.stride(), *v.stride(), *self.mask_strides,
            self.scalars["rs"], self.scalars["log2_sqrt_m"], self.scalars["inv_sqrt_m"], self.scalars["eps"], cps,
            num_warps=self.num_warps, **self.consts,
        )
        return S, z, c

    def forward_state(self, k, v):
        """(S, z, c_key): the whole-sequence state per (batch, head) (non-causal, with the global
        key stabilizer c_key, log2 units incl. log2 √m) or per-segment exclusive prefixes (causal)."""
        S, z, c = self.key_state(k, v)
        if self.causal:
            return _exclusive_cumsum(S), _exclusive_cumsum(z), self.ck
        if not self.softmax:
            return S.sum(1), z.sum(1), c
        cmax = c.amax(1, keepdim=True)
        cmax = torch.where(cmax > -1e29, cmax, torch.zeros_like(cmax))  # every key masked: c = 0
        wgt = torch.exp2(c - cmax)
        S = (S * wgt[:, :, None, None]).sum(1)
        z = (z * wgt[:, :, None]).sum(1)
        ckey = cmax[:, 0] + self.scalars["log2_sqrt_m"]
        return S, z, ckey


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """Σ over earlier segments (dim 1)."""
    return torch.cat([torch.zeros_like(x[:, :1]), torch.cumsum(x[:, :-1], 1)], 1)


def _exclusive_revcumsum(x: Tensor) -> Tensor:
    """Σ over later segments (dim 1)."""
    return torch.cat([torch.cumsum(x[:, 1:].flip(1), 1).flip(1), torch.zeros_like(x[:, :1])], 1)


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
    """Performer attention output (B, H, N, E) in v's dtype; same contract as the reference."""
    cfg = _Cfg(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)
    S, z, _ = cfg.forward_state(k, v)
    out = torch.empty(cfg.B, cfg.H, cfg.N, cfg.E, device=q.device, dtype=v.dtype)
    P, cps = (S.shape[1], cfg.state_cps) if causal else _segments(cfg.N, cfg.consts["BN"], cfg.BH, cfg.device)
    torch.library.wrap_triton(_fwd_kernel)[(P, cfg.BH)](
        q, k, v, cfg.omega, cfg.mask_arg, cfg.ck if cfg.ck is not None else z, S, z, out,
        cfg.N, cfg.D, cfg.E, cfg.m, cfg.H,
        *q.stride(), *k.stride(), *v.stride(), *cfg.mask_strides, *out.stride(),
        cfg.scalars["rs"], cfg.scalars["log2_sqrt_m"], cfg.scalars["inv_sqrt_m"], cfg.scalars["eps"], cps,
        num_warps=cfg.num_warps, **cfg.consts,
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
    cfg = _Cfg(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)
    if grad.shape != (cfg.B, cfg.H, cfg.N, cfg.E):
        raise ValueError(f"grad must have shape {(cfg.B, cfg.H, cfg.N, cfg.E)}, got {tuple(grad.shape)}")
    S, z, ckey = cfg.forward_state(k, v)
    BN, BM, BE = cfg.consts["BN"], cfg.BM, cfg.BE
    f32 = dict(device=q.device, dtype=torch.float32)
    if causal:
        P, cps = S.shape[1], cfg.state_cps
        gs = torch.empty(cfg.BH, cfg.N, BE, **f32)
        gd = torch.empty(cfg.BH, cfg.N, **f32)
    else:
        P, cps = _segments(cfg.N, BN, cfg.BH, cfg.device)
        gs = gd = z  # unused
    R = torch.empty(cfg.BH, P, BM, BE, **f32)
    rz = torch.empty(cfg.BH, P, BM, **f32)
    dq = torch.empty(cfg.B, cfg.H, cfg.N, cfg.D, device=q.device, dtype=q.dtype)
    scal = (cfg.scalars["rs"], cfg.scalars["log2_sqrt_m"], cfg.scalars["inv_sqrt_m"], cfg.scalars["eps"])
    torch.library.wrap_triton(_bwd_q_kernel)[(P, cfg.BH)](
        grad, q, k, v, cfg.omega, cfg.mask_arg, cfg.ck if cfg.ck is not None else z, S, z, dq, R, rz, gs, gd,
        cfg.N, cfg.D, cfg.E, cfg.m, cfg.H,
        *grad.stride(), *q.stride(), *k.stride(), *v.stride(), *cfg.mask_strides,
        *scal, cps,
        num_warps=cfg.num_warps, **cfg.consts,
    )
    if causal:
        R, rz = _exclusive_revcumsum(R), _exclusive_revcumsum(rz)
        Pk, cpsk = P, cps
    else:
        R, rz = R.sum(1), rz.sum(1)
        Pk, cpsk = _segments(cfg.Nk, BN, cfg.BH, cfg.device)
    dk = torch.empty(cfg.B, cfg.H, cfg.Nk, cfg.D, device=q.device, dtype=k.dtype)
    dv = torch.empty(cfg.B, cfg.H, cfg.Nk, cfg.E, device=q.device, dtype=v.dtype)
    ck = ckey if ckey is not None else z
    torch.library.wrap_triton(_bwd_k_kernel)[(Pk, cfg.BH)](
        q, k, v, cfg.omega, cfg.mask_arg, ck.contiguous(), R, rz, gs, gd, dk, dv,
        cfg.N, cfg.Nk, cfg.D, cfg.E, cfg.m, cfg.H,
        *q.stride(), *k.stride(), *v.stride(), *cfg.mask_strides,
        *scal, cpsk,
        num_warps=cfg.num_warps, **cfg.consts,
    )
    return dq, dk, dv
