"""Causal backward of the chunk-parallel Performer kernels (design in :mod:`.chunked`).

With G'ᵢ = [gsᵢ, gdᵢ] = [gᵢ/denᵢ, −Σₑ gᵢₑ·outᵢₑ/denᵢ] (the gradient of [num, den]) and
V'ⱼ = [vⱼ, 1], chunk c of C = BN positions gets (tril: query row i ≥ key column j)

    dφq_c = gs_c·S_{<c}ᵀ + gd_c ⊗ z_{<c} + P_c·φk_c,     P_c = tril(gs_c·v_cᵀ + gd_c ⊗ 1)
    dφk_c = v_c·R_{>c}ᵀ + 1 ⊗ rz_{>c} + P_cᵀ·φq_c
    dv_c  = φk_c·R_{>c} + tril(A_c)ᵀ·gs_c,               A_c = φq_c·φk_cᵀ (all features)

where S_{<c}, z_{<c} are the keys' exclusive prefix state (the forward's key scan) and R_{>c}, rz_{>c}
= Σ_{queries i after chunk c} φ(qᵢ)ᵀgsᵢ, φ(qᵢ)·gdᵢ the queries' exclusive suffix (the reverse query
scan). dq and dk follow through the feature map, tile by tile: with t = dφ·φ (softmax) or
dφ·1[ω·xs > 0]/√m (relu), dx = √s·(Σ_t t_t·ω_t − Σt·xs) (softmax; relu without the last term).

Passes (``ChunkedBackwardPlan``): key scan → ``_chunk_bwd_q_kernel`` (reads the training
forward's stats or recomputes the chunk's forward, stores G' and the query stabilizer mq, writes
dq) → reverse query scan over G' → ``_chunk_bwd_k_kernel`` (writes dk, dv; its intra-chunk
tril(A)ᵀ·gs reads the scores A = φq·φkᵀ the forward, or the dq pass's recompute, stored:
:func:`.chunked.stats_rows`). Both chunk kernels run on a grid (NC, B·H), one program
per chunk, and walk the feature tiles of BMT rows: on chip are a few (C × BMT), (C × C) and
(C × E) fp32 tiles, never the m × E state.

The query stabilizer mq (row max of the logits over all m features, log2 √m folded in) is a
constant in the gradient (it cancels in num/den), but φq must be the same numbers in every pass:
the recompute stores it and the later passes read it. Softmax keys are scaled by the causal key
stabilizer M (the forward's, from the training stats; else triton.py's ``_Cfg.key_max``): every
term above takes the factor exp2(−|Mᵢ − Mⱼ|) of its (query i, key j), applied as in the forward
(:func:`.chunked._chunk_attend`): on the states per row, inside the chunk per element.
Extra memory: G' and mq, B·H·N·(BE + 2) fp32, and M, B·H·N fp32, besides the scans' states;
without the training stats, a workspace of their size (B·H·N·(3 + C/2) fp32 for bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._launch import Launch as _Launch
from . import chunked
from . import triton as _tri
from .chunked import _chunk_attend, _operand, _segment_factor, _state_tile, _stats_at
from .triton import (
    _bh_id,
    _cast,
    _Cfg,
    _chunk_end,
    _decay,
    _dot,
    _dphi_t,
    _f32,
    _inv_den,
    _key_valid,
    _load_rows,
    _logits,
    _mm,
    _omega_rows,
    _phi_key,
    _row_max,
    _run,
)

__all__ = ["ChunkedBackwardPlan", "chunked_performer_attention_backward"]

# Warps and pipelining depth of the dk/dv kernel (None: chunked.WARPS; for the stages, 1 with
# bf16 features, else chunked._stages). The kernel is past the register file (255 registers, ~100
# values spilled since it rescales by the causal key stabilizer); on the H200 (bf16, B = 4, H = 12,
# N = 4096, d = 64, m = 256, causal) 1 stage took 301.8 µs against 328.7 at 3 stages and 355.4 at 2;
# 8 warps spilled less (48–68 values) but took 474–498 µs.
BWD_K_WARPS: int | None = None
BWD_K_STAGES: int | None = None


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _phi_query_tile(proj, sq, mq, fvalid, rs, inv_sqrt_m, eps, SOFTMAX: tl.constexpr):
    """φ(q) of one feature tile (BN, BMT) fp32 with a given stabilizer: softmax exp2(lg − mq)
    (mq per row, log2 √m folded in); relu max(ω·xs, 0)/√m + eps. Zero on padded features."""
    if SOFTMAX:
        phi = tl.where(fvalid[None, :], tl.exp2(_logits(proj, sq, rs) - mq[:, None]), 0.0)
    else:
        phi = tl.where(fvalid[None, :], tl.maximum(proj * rs, 0.0) * inv_sqrt_m + eps, 0.0)
    return phi


@triton.jit
def _dx_final(acc, tsum, x, rs, SOFTMAX: tl.constexpr):
    """dx (BN, BD) fp32 from acc = Σ_t t_t·ω_t and tsum = Σ t over all features (see _dx_block):
    softmax √s·(acc − Σt·xs), relu √s·acc."""
    if SOFTMAX:
        dxs = acc - (tsum * rs)[:, None] * x.to(tl.float32)
    else:
        dxs = acc
    return dxs * rs


@triton.jit
def _sq_rows(x):
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, 1)


# ---------------------------------------------------------------------------------------------
# kernels (grid: (NC, B·H); program (c, bh) owns positions [c·BN, (c+1)·BN) of one (batch, head))
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chunk_bwd_q_kernel(
    G, Q, K, V, W, MASK, SL, ZL, SG, ZG, DQ, GS, GD, MQ, O, STATS, MX, N, D, E, M, H, NC, CPS, P, MP,
    sgb, sgh, sgn, sge, sob, soh, son, soe,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn, rs, log2_sqrt_m, inv_sqrt_m, eps,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr, SOFTMAX: tl.constexpr,
    HAS_MASK: tl.constexpr, SAVED: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
    I64: tl.constexpr,
):  # fmt: skip
    """dq of chunk c, and G' = [gs, gd] (GS (BH, N, BE), GD (BH, N)) and the query stabilizer
    (MQ (BH, N)) for the reverse query scan and the key pass. S, z: the key scan's exclusive
    prefix (layout in :mod:`.chunked`); DQ (B, H, N, D) contiguous.

    SAVED: the forward's output O (B, H, N, E), strides (sob, soh, son, soe), and its STATS
    (:func:`.chunked.stats_rows`: mq, den, ...; :class:`.chunked.ChunkedForwardPlan` with stats)
    give gs = g/den and gd = −Σ gs·out, and the chunk's forward is not recomputed. Else O is not
    read, and the recomputed forward's intra-chunk scores are written into STATS (a workspace of
    that layout) for the dk/dv pass."""
    c = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    offs_d = tl.arange(0, BD)
    Gb = G + b * sgb + h * sgh
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    DT = Q.dtype.element_ty
    rows = c * BN + offs_n
    qvalid = rows < N
    g = _load_rows(Gb, rows, offs_e, N, E, sgn, sge).to(tl.float32)
    sb, sa = _stats_at(STATS, bh, N, BN, FEAT_F32)
    if SAVED:
        mq = tl.load(sb + rows, mask=qvalid, other=0.0)
        den = tl.load(sb + N + rows, mask=qvalid, other=0.0)
        inv = _inv_den(den)
        gs = g * inv[:, None]
        out = _load_rows(O + b * sob + h * soh, rows, offs_e, N, E, son, soe).to(tl.float32)
        gd = -tl.sum(gs * out, 1)  # −Σ g·out / den
    else:
        # The chunk's forward, recomputed: num (BN, BE), den (BN,) and the stabilizer its φq used.
        num, den, mq, _, A = _chunk_attend(
            Qb, Kb, Vb, W, MASK, SL, ZL, SG, ZG, b, h, bh, c, CPS, NC, P, MP, N, D, E, M,
            sqn, sqd, skn, skd, svn, sve, smb, smn, rs, log2_sqrt_m, inv_sqrt_m, eps, MX, MX, MX,
            BN, BD, BE, BMT, SOFTMAX, True, HAS_MASK, False, False, FEAT_F32, PREC, INTERP,
        )  # fmt: skip
        tl.store(sa + rows[:, None] * BN + offs_n[None, :], _operand(A, FEAT_F32, INTERP), mask=qvalid[:, None])
        inv = _inv_den(den)
        gs = g * inv[:, None]
        gd = -tl.sum(gs * num, 1) * inv  # −Σ g·out / den
    # Rows past N are 0 in gs and gd (g loads 0 there): they add nothing below.
    tl.store(
        GS + bh * N * BE + rows[:, None] * BE + offs_e[None, :],
        gs,
        mask=qvalid[:, None],
    )
    tl.store(GD + bh * N + rows, gd, mask=qvalid)
    tl.store(MQ + bh * N + rows, mq, mask=qvalid)
    xq = _load_rows(Qb, rows, offs_d, N, D, sqn, sqd)
    xk = _load_rows(Kb, rows, offs_d, N, D, skn, skd)
    sqq = _sq_rows(xq)
    sqk = _sq_rows(xk)
    rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
    vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)
    # P = tril(gs·vᵀ + gd ⊗ 1), the same for every feature tile: formed once.
    p = _mm(gs, tl.trans(vt), FEAT_F32, PREC, INTERP) + gd[:, None]
    kstab = 0.0
    gf = 1.0
    if SOFTMAX:
        # Key j of the chunk enters query i's gradient times exp2(Mⱼ − Mᵢ), the state times
        # exp2(E(c − 1) − Mᵢ): on P, and on gs and gd where they meet the state.
        mrow = _row_max(MX, bh, rows, N)
        kstab = mrow[:, None]
        gf = _segment_factor(MX, bh, N, c, CPS, BN, False)
        p = p * _decay(mrow[None, :], mrow[:, None])
        fq = _decay(_chunk_end(MX, bh, N, c - 1, BN), mrow)
        gs = gs * fq[:, None]
        gd = gd * fq
    p = _operand(tl.where(offs_n[:, None] >= offs_n[None, :], p, 0.0), FEAT_F32, INTERP)
    gs = _operand(gs, FEAT_F32, INTERP)
    acc = tl.zeros((BN, BD), tl.float32)  # Σ_t t_t·ω_t
    tsum = tl.zeros((BN,), tl.float32)  # Σ t over all features (softmax's −Σt·xs term)
    for m0 in range(0, MP, BMT):
        w = _omega_rows(W, h, D, M, m0, 0, BD, BMT, DT, INTERP)
        fvalid = m0 + tl.arange(0, BMT) < M
        projq = _dot(xq, tl.trans(w), PREC, INTERP)
        phq = _phi_query_tile(projq, sqq, mq, fvalid, rs, inv_sqrt_m, eps, SOFTMAX)
        projk = _dot(xk, tl.trans(w), PREC, INTERP)
        phk = _phi_key(projk, sqk, fvalid, rvalid, kstab, rs, inv_sqrt_m, eps, SOFTMAX)
        S, z = _state_tile(SL, ZL, SG, ZG, bh, c, CPS, NC, P, m0, MP, gf, BMT, BE)
        dphi = _mm(gs, tl.trans(S), FEAT_F32, PREC, INTERP) + gd[:, None] * z[None, :]
        dphi += _mm(p, phk, FEAT_F32, PREC, INTERP)
        t = _dphi_t(dphi, phq, projq, qvalid, inv_sqrt_m, SOFTMAX)
        acc += _mm(t, w, FEAT_F32, PREC, INTERP)
        tsum += tl.sum(t, 1)
    dq = _dx_final(acc, tsum, xq, rs, SOFTMAX)
    tl.store(
        DQ + bh * N * D + rows[:, None] * D + offs_d[None, :],
        _cast(dq, DQ.dtype.element_ty, INTERP),
        mask=qvalid[:, None] & (offs_d[None, :] < D),
    )


@triton.jit
def _chunk_bwd_k_kernel(
    Q, K, V, W, MASK, RL, RZL, RG, RZG, GS, GD, MQ, DK, DV, MX, STATS, N, D, E, M, H, NC, CPS, P, MP, sqb, sqh, sqn, sqd,
    skb, skh, skn, skd, svb, svh, svn, sve, smb, smn, rs, log2_sqrt_m, inv_sqrt_m, eps,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr, SOFTMAX: tl.constexpr,
    HAS_MASK: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """dk and dv of chunk c. R, rz: the reverse query scan's exclusive suffix over later chunks
    (the state layout of :mod:`.chunked`); GS, GD, MQ as the dq pass stored them; STATS the
    intra-chunk scores A (:func:`.chunked.stats_rows`: the training forward's, or the dq pass's
    recompute); DK (B, H, N, D) and DV (B, H, N, E) contiguous."""
    c = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    offs_d = tl.arange(0, BD)
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    DT = K.dtype.element_ty
    rows = c * BN + offs_n
    kvalid = rows < N
    rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
    xq = _load_rows(Qb, rows, offs_d, N, D, sqn, sqd)
    xk = _load_rows(Kb, rows, offs_d, N, D, skn, skd)
    sqq = _sq_rows(xq)
    sqk = _sq_rows(xk)
    vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)
    # G' rows past N load 0: those queries add nothing (their φq is finite: mq loads 0, x is 0).
    gs = tl.load(
        GS + bh * N * BE + rows[:, None] * BE + offs_e[None, :],
        mask=kvalid[:, None],
        other=0.0,
    )
    gd = tl.load(GD + bh * N + rows, mask=kvalid, other=0.0)
    mq = tl.load(MQ + bh * N + rows, mask=kvalid, other=0.0)
    # (key j, query i) with i ≥ j: Pᵀ = that part of v·gsᵀ + 1 ⊗ gd, formed once.
    upper = offs_n[:, None] <= offs_n[None, :]
    pt = _mm(vt, tl.trans(gs), FEAT_F32, PREC, INTERP) + gd[None, :]
    kstab = 0.0
    gf = 1.0
    if SOFTMAX:
        # (key j, query i ≥ j) takes exp2(Mⱼ − Mᵢ); the later chunks' R (at E(c)) reaches key j
        # times exp2(Mⱼ − E(c)) (fk: on v and rz here, on dv after the loop).
        mrow = _row_max(MX, bh, rows, N)
        kstab = mrow[:, None]
        gf = _segment_factor(MX, bh, N, c, CPS, BN, True)
        pt = pt * _decay(mrow[:, None], mrow[None, :])
        fk = _decay(mrow, _chunk_end(MX, bh, N, c, BN))
        # (in the operand dtype, as _mm would cast it in every step of the loop)
        vt = _operand(vt * fk[:, None], FEAT_F32, INTERP)
    pt = _operand(tl.where(upper, pt, 0.0), FEAT_F32, INTERP)
    dv = tl.zeros((BN, BE), tl.float32)
    acc = tl.zeros((BN, BD), tl.float32)
    tsum = tl.zeros((BN,), tl.float32)
    for m0 in range(0, MP, BMT):
        w = _omega_rows(W, h, D, M, m0, 0, BD, BMT, DT, INTERP)
        fvalid = m0 + tl.arange(0, BMT) < M
        projq = _dot(xq, tl.trans(w), PREC, INTERP)
        phq = _phi_query_tile(projq, sqq, mq, fvalid, rs, inv_sqrt_m, eps, SOFTMAX)
        projk = _dot(xk, tl.trans(w), PREC, INTERP)
        phk = _phi_key(projk, sqk, fvalid, rvalid, kstab, rs, inv_sqrt_m, eps, SOFTMAX)
        R, rz = _state_tile(RL, RZL, RG, RZG, bh, c, CPS, NC, P, m0, MP, gf, BMT, BE)
        dv += _mm(phk, R, FEAT_F32, PREC, INTERP)
        if SOFTMAX:
            dphi = _mm(vt, tl.trans(R), FEAT_F32, PREC, INTERP) + fk[:, None] * rz[None, :]
        else:
            dphi = _mm(vt, tl.trans(R), FEAT_F32, PREC, INTERP) + rz[None, :]
        dphi += _mm(pt, phq, FEAT_F32, PREC, INTERP)
        t = _dphi_t(dphi, phk, projk, rvalid, inv_sqrt_m, SOFTMAX)
        acc += _mm(t, w, FEAT_F32, PREC, INTERP)
        tsum += tl.sum(t, 1)
    # gs again (an L2 hit) rather than held in registers through the loop.
    gs = tl.load(
        GS + bh * N * BE + rows[:, None] * BE + offs_e[None, :],
        mask=kvalid[:, None],
        other=0.0,
    )
    if SOFTMAX:
        dv = dv * fk[:, None]
    # The chunk's own queries: dvⱼ += Σ_{i ≥ j} A[i, j]·gsᵢ, with A as stored (masked and scaled),
    # rather than φk·φqᵀ formed again over every feature tile (a (C × C) fp32 tile held through the
    # loop, and the kernel's 7th product).
    _, sa = _stats_at(STATS, bh, N, BN, FEAT_F32)
    at = tl.load(sa + rows[None, :] * BN + offs_n[:, None], mask=kvalid[None, :], other=0.0)  # [j, i] = A[i, j]
    dv += _mm(at, gs, FEAT_F32, PREC, INTERP)
    dk = _dx_final(acc, tsum, xk, rs, SOFTMAX)
    tl.store(
        DK + bh * N * D + rows[:, None] * D + offs_d[None, :],
        _cast(dk, DK.dtype.element_ty, INTERP),
        mask=kvalid[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV + bh * N * E + rows[:, None] * E + offs_e[None, :],
        _cast(dv, DV.dtype.element_ty, INTERP),
        mask=kvalid[:, None] & (offs_e[None, :] < E),
    )


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _chunk_launches(cfg: _Cfg, grad, out, q, k, v, BN: int, BMT: int, warps: int, NC: int, CPS: int, P: int, MP: int):
    """(bwd_q, bwd_k) launches, grid (NC, B·H), for states of NC chunks of BN positions in P
    segments of CPS chunks, MP feature rows in tiles of BMT (the layout of :mod:`.chunked`).
    ``out``: the forward's output (its strides; the dq pass reads it and the stats), or None."""
    meta = {
        "BN": BN, "BD": cfg.BD, "BE": cfg.BE, "BMT": BMT, "SOFTMAX": cfg.softmax, "HAS_MASK": cfg.meta["HAS_MASK"],
        "FEAT_F32": cfg.feat_f32, "PREC": cfg.meta["PREC"], "INTERP": cfg.interp, "I64": cfg.i64,
    }  # fmt: skip
    opts = {"num_warps": warps, "num_stages": chunked._stages(cfg.feat_f32, cfg.BE)}
    dims = (cfg.N, cfg.D, cfg.E, cfg.m, cfg.H, NC, CPS, P, MP)
    strides = (*q.stride(), *k.stride(), *v.stride(), *cfg.mask_strides)
    grid = (NC, cfg.BH)
    so = tuple(out.stride()) if out is not None else (0, 0, 0, 0)
    bwd_q = _Launch(
        _chunk_bwd_q_kernel, grid, 17, (*dims, *grad.stride(), *so, *strides, *cfg.scal),
        {**meta, "SAVED": out is not None}, opts, cfg.fast, cfg.trace,
    )  # fmt: skip
    opts_k = {
        "num_warps": BWD_K_WARPS or warps,
        "num_stages": BWD_K_STAGES or (opts["num_stages"] if cfg.feat_f32 else 1),
    }
    bwd_k = _Launch(_chunk_bwd_k_kernel, grid, 16, (*dims, *strides, *cfg.scal), meta, opts_k, cfg.fast, cfg.trace)
    return bwd_q, bwd_k


class ChunkedBackwardPlan:
    """The launches of one causal backward call signature of the chunked kernels.

    Same constructor as triton.py's ``_BackwardPlan``: (grad, q, k, v, omega, key_mask, kernel_fn,
    causal, scale, chunk_size, fast, trace) with grad (B, H, N, E), q, k (B, H, N, D), v (B, H, N, E)
    (any strides), omega (H, m, D) contiguous, key_mask (B, N) bool or None; called as
    ``plan(grad, q, k, v, omega, mptr) -> (dq, dk, dv)`` in the inputs' shapes and dtypes, with mptr
    the bool key mask or, without one, q (never read).

    Built with ``out`` (the forward's output, (B, H, N, E) in v's dtype: its strides are part of
    the plan), it is called as ``plan(grad, q, k, v, omega, mptr, out, stats)`` with stats (B, H,
    R, N) fp32 contiguous from :class:`.chunked.ChunkedForwardPlan` (stats=True;
    :func:`.chunked.stats_rows`), and the dq pass takes gs, gd and mq from them instead of
    recomputing the chunk's forward, the dk/dv pass the intra-chunk scores, and (softmax) both the
    key stabilizer instead of computing it again. Without them the dq pass recomputes the forward
    and writes the scores into a workspace of that layout.

    Passes: the key scan (S_{<c}, z_{<c}), ``_chunk_bwd_q_kernel`` (dq, and G' and mq stored), the
    reverse query scan over G' (R_{>c}, rz_{>c}), ``_chunk_bwd_k_kernel`` (dk, dv). Chunk
    ``chunk_size`` (default :data:`.chunked.CHUNK`), feature tile :data:`.chunked.M_TILE`, warps
    :data:`.chunked.WARPS`, read when the plan is built.

    Raises:
        ValueError: causal=False (the non-causal backward runs on triton.py's kernels); as
            triton.py's ``_Cfg`` (kernel_fn, shapes, dtypes, chunk_size, key_mask); grad or out of
            another shape; a head dim that is not one tile or E above MAX_TILE (E below D is
            gated by :func:`.chunked.chunked_supports` in the dispatch).
    """

    def __init__(
        self, grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast: bool, trace: bool, out=None
    ):  # fmt: skip
        if not causal:
            raise ValueError(
                "ChunkedBackwardPlan computes the causal backward only (causal=True), got causal=False: "
                "the non-causal backward runs on triton.py's kernels"
            )
        c = self.cfg = _Cfg(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast, trace)
        if grad.shape != (c.B, c.H, c.N, c.E):
            raise ValueError(f"grad must have shape {(c.B, c.H, c.N, c.E)}, got {tuple(grad.shape)}")
        if out is not None and out.shape != grad.shape:
            raise ValueError(f"out must have shape {(c.B, c.H, c.N, c.E)}, got {tuple(out.shape)}")
        chunked._check_tiles(c, q.dtype)
        BN = self.chunk = chunked.CHUNK if chunk_size is None else chunk_size
        BMT = chunked._feature_tile(c.m, chunked.M_TILE)
        common = {
            "kernel_fn": kernel_fn, "scale": scale, "chunk": BN, "m_tile": BMT, "feat_f32": c.feat_f32,
            "prec": c.meta["PREC"], "fast": fast, "trace": trace,
        }  # fmt: skip
        self.key_scan = chunked.ChunkScan(
            k, v, omega, mask_strides=c.mask_strides, has_mask=key_mask is not None, **common
        )
        # G' = [gs, gd] as the dq pass stores them: gs (BH, N, BE) fp32, gd (BH, N) the z weights.
        # (shape and strides only: a meta tensor).
        gs = torch.empty(c.BH, c.N, c.BE, device="meta", dtype=torch.float32)
        self.query_scan = chunked.ChunkScan(q, gs, omega, e=c.E, query=True, weighted=True, reverse=True, **common)
        ks, qs = self.key_scan, self.query_scan
        # The chunk kernels read both states with one set of layout numbers.
        assert (ks.NC, ks.CPS, ks.P, ks.MP, qs.BE) == (qs.NC, qs.CPS, qs.P, qs.MP, c.BE)
        self.bwd_q, self.bwd_k = _chunk_launches(
            c, grad, out, q, k, v, BN, BMT, chunked.WARPS, ks.NC, ks.CPS, ks.P, ks.MP
        )
        self.key_max = c.key_max_launch(k)

    def __call__(self, grad, q, k, v, omega, mptr, out=None, stats=None) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        B, H, N, D, E, BH = c.B, c.H, c.N, c.D, c.E, c.BH
        mask = mptr if c.meta["HAS_MASK"] else None
        if stats is not None and c.softmax:
            mx = stats[:, :, 2].reshape(BH, N).contiguous()  # the forward's (a copy: kernels index it densely)
        else:
            mx = c.key_max(self, k, omega, mptr)  # (relu: a placeholder, not read)
        SL, ZL, SG, ZG = self.key_scan(k, v, omega, mask, None, None, mx)
        gs, gd, mq = c.f32(BH, N, c.BE), c.f32(BH, N), c.f32(BH, N)
        dq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
        if out is None:  # O is not read; the dq pass writes the intra-chunk scores into stats
            out = grad
            rows = chunked.stats_rows(c.feat_f32, self.chunk)
            stats = torch.empty(B, H, rows, N, device=q.device, dtype=torch.float32)
        _run(self, "bwd_q", grad, q, k, v, omega, mptr, SL, ZL, SG, ZG, dq, gs, gd, mq, out, stats, mx)
        RL, RZL, RG, RZG = self.query_scan(q, gs, omega, None, mq if c.softmax else None, gd, mx)
        dk = torch.empty(B, H, N, D, device=q.device, dtype=k.dtype)
        dv = torch.empty(B, H, N, E, device=q.device, dtype=v.dtype)
        _run(self, "bwd_k", q, k, v, omega, mptr, RL, RZL, RG, RZG, gs, gd, mq, dk, dv, mx, stats)
        return dq, dk, dv


def chunked_performer_attention_backward(
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
    """(dq, dk, dv) of causal Performer attention through the chunked kernels, given
    grad = ∂loss/∂out (B, H, N, E); the contract of :func:`.reference.performer_attention_backward`
    (q, k (B, H, N, D), v (B, H, N, E), omega (H, m, D), key_mask (B, N) or None). Plans are cached
    per call signature with triton.py's (whose knobs and chunked.py's clear the cache).

    ``chunk_size`` (a power of two ≥ 16) overrides :data:`.chunked.CHUNK`.

    Raises:
        ValueError: causal=False, and as :class:`ChunkedBackwardPlan`.
    """
    if not chunked.chunked_supports(q, v, omega):
        raise ValueError(
            f"the chunked kernels do not support head dim {q.shape[-1]} / value dim {v.shape[-1]} for {q.dtype} "
            "(see chunked_supports)"
        )
    return _tri._backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, True)
