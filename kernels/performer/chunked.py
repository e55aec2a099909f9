"""Chunk-parallel Performer kernels: one program per chunk, features in tiles (math in README.md).

The segment kernels of :mod:`.triton` carry a whole m×E fp32 state through a loop over chunks,
which at m = 256 fills a program's registers (255 with spills) and holds the causal chunk to 16
rows (mma.sync, no wgmma). Here the state is never carried by the chunk programs:

* a *scan* computes, for every chunk c, the exclusive prefix state S_{<c} = Σ_{j < c·C} φ(kⱼ)ᵀvⱼ
  and z_{<c} = Σ φ(kⱼ) (or the exclusive *suffix* over later chunks, for the backward's
  R = Σ φ(qᵢ)ᵀG'ᵢ), in feature tiles of BMT rows, parallel over (batch·head, feature tile, segment);
* the *chunk* kernels, one program per (chunk, batch·head), walk the feature tiles of their chunk
  and read S_{<c} tile by tile, so what a program holds is a few (C × BMT) and (C × E) tiles.

State layout (all contiguous; MP = feature rows padded to a multiple of BMT, BE = padded E):

* ``SL`` (BH, NC, MP, BE), state dtype (bf16 for bf16 inputs, the operand dtype of its products;
  fp32 otherwise): chunk c's exclusive prefix (suffix) *within its segment* of CPS chunks;
* ``ZL`` (BH, NC, MP) fp32: the same for z;
* ``SG`` (BH, P, MP, BE) and ``ZG`` (BH, P, MP), fp32: segment s's exclusive prefix (suffix) over
  the other segments.

The state of chunk c is SL[c] + SG[c // CPS] (:func:`_state_tile`).

Passes: :class:`ChunkScan` (``_scan_kernel``, grid (feature tiles, segments, B·H), then
``_segment_scan_kernel`` for SG/ZG); the forward :class:`ChunkedForwardPlan` runs the key scan and
``_fwd_chunk_kernel`` (grid (chunks, B·H)) when causal, and when not the key pass
``_key_pass_kernel`` (segment totals only, grid (feature tiles, segments, B·H)), triton.py's
``_reduce_kernel``, then the output pass: ``_out_pass_kernel`` (grid (query groups, B·H), the
head's feature tiles loaded once per program) where they fit in registers, else
``_fwd_chunk_kernel``. Shapes (:func:`chunked_supports`): the whole
padded head dim in one tile (≤ 128 for bf16, ≤ ``WHOLE_D_F32`` = 64 for fp16/fp32), padded E ≤
128, any m. Causal softmax keys are scaled by the running key max M. The forward finds it online,
with no pre-pass: the key scan keeps one stabilizer per (feature tile, segment) and stores it with
each state, and ``_fwd_chunk_kernel`` combines those with its chunk's own key maxima as it walks
the feature tiles (``ONLINE``; it writes M into the training stats). The backward reads M (the
training stats, else triton.py's pre-pass ``_Cfg.key_max``): states at the stabilizer of a chunk's
last position, queries at their own (:func:`_scan_kernel`, :func:`_chunk_attend`).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from .._launch import Launch as _Launch
from . import triton as _tri
from .triton import (
    MAX_TILE,
    WHOLE_D_F32,
    _bh_id,
    _cast,
    _Cfg,
    _chunk_end,
    _contiguous_strides,
    _decay,
    _dot,
    _f32,
    _key_valid,
    _load_rows,
    _logits,
    _max2,
    _mm,
    _omega_rows,
    _phi_key,
    _pow2,
    _row_max,
    _run,
    _scalars,
)

__all__ = [
    "ChunkScan",
    "ChunkedForwardPlan",
    "chunked_performer_attention",
    "chunked_supports",
    "stats_rows",
    "stats_scores",
]

# Positions per chunk (C = BN) of the chunk kernels and the scans; ``chunk_size`` overrides it.
# 64 rows give wgmma tiles on Hopper (the segment kernels' causal chunk of 16 could not).
CHUNK = 64
# Feature rows per tile (BMT), clamped to the padded m: the chunk programs hold a few (C × BMT)
# fp32 tiles, never a whole row of m features.
M_TILE = 64
# Warps of the chunk kernels and of the scan (per program: one (BMT × E) fp32 accumulator).
WARPS = 4
SCAN_WARPS = 4
# Scan programs to aim for per SM (they set the segments: fewer, longer segments write fewer
# segment totals). On the H200 (bf16, B=4, H=12, N=4096, d=64, m=256, causal) 2 per SM took
# 0.255 ms forward and 0.797 ms backward, against 0.300 / 0.896 at 4, 0.324 / 0.932 at 8 and
# 0.405 / 1.083 at 16 (8 scan warps were slower at each).
SCAN_PROGRAMS_PER_SM = 2
# Software-pipelining depth of the scans' chunk loop (a knob for probes; 3 as before it was one).
SCAN_STAGES = 3
# Programs of the non-causal key pass (_key_pass_kernel) resident per SM (4 warps, 122 registers,
# 49 KB of shared memory at d = 64: 4 fit). The segments per (batch·head, feature tile) are as
# many as keep the grid within one such wave: more programs than fit leave a tail (H200, bf16,
# B=4, H=12, N=4096, d=64, m=256: 384 programs 50.4 µs, 576 programs 59.1 µs), fewer leave SMs
# part idle (B=1, N=65536: 288 programs 236 µs, 528 programs 169 µs).
KEY_PROGRAMS_PER_SM = 4
# The non-causal output pass. _fwd_chunk_kernel reads the head's ω and state tiles again for
# every chunk of BN queries; _out_pass_kernel loads them once per program (up to 4 tiles, held in
# registers) and walks ~NC·B·H / (OUT_PROGRAMS_PER_SM · SMs) chunks. OUT_PERSIST None: that
# kernel where it was measured faster, else _fwd_chunk_kernel; True: that kernel wherever m takes
# ≤ min(OUT_MAX_TILES, 4) feature tiles (any dtype or width; for tests); False: never.
# H200, bf16, B = 4, H = 12, non-causal softmax, output pass µs (profiler), _fwd_chunk_kernel →
# _out_pass_kernel (4 warps, 2 programs an SM): d = 64, m = 128 (2 tiles): N = 4096 36.3 → 30.0
# (forward 71.2 → 65.1), N = 16384 138.6 → 108.5 (241.5 → 214.7), relu N = 4096 29.1 → 25.6;
# m = 64: 29.7 → 20.1. Slower: m = 256 (4 tiles: 255 registers and 38 spilled; 53.1 → 55.9–57.9
# at N = 4096), d = 32 (m = 128: 25.4 → 26.8–27.5), few chunks a program (N = 1024, m = 128,
# 4 a program: 9.9 → 10.8), and 8 warps everywhere (62.3 at d = 64, m = 128, N = 4096). Hence
# None takes it for bf16 features and state (bf16 inputs; fp16 and fp32 keep them fp32, twice
# the registers), padded D = 64, padded E ≤ 64, m in ≤ OUT_MAX_TILES tiles and ≥ OUT_MIN_CHUNKS
# chunks a program.
OUT_PERSIST: bool | None = None
OUT_MAX_TILES = 2
OUT_MIN_CHUNKS = 8
OUT_PROGRAMS_PER_SM = 2
OUT_WARPS = 4
# (The plans are cached per call signature with these knobs and triton.py's: changing any of them
# between calls takes effect at the next call.)


def chunked_supports(q: Tensor, v: Tensor, omega: Tensor) -> bool:
    """Whether the chunked kernels handle the shapes: the padded head dim D is one tile (≤ 128 for
    bf16 inputs, ≤ ``WHOLE_D_F32`` = 64 for fp16/fp32, whose features are fp32), and the padded
    value dim E is at least the padded D and ≤ 128. Any number of features m (they are tiled).
    Other shapes go to the segment kernels of :mod:`.triton` (or the reference).

    E below D is left out because on the H200 (triton 3.6), at the default chunk and tile of 64,
    the causal kernels gave wrong results there (D = 64, E = 32: forward and backward; D = 32,
    E = 16: backward with 8 warps), while every shape with E ≥ D that was run matched the float64
    reference (D = E = 32, 48, 64, 128; D = 32, E = 64). The cause was not found; the interpreter
    computes those shapes correctly."""
    whole = MAX_TILE if q.dtype == torch.bfloat16 else WHOLE_D_F32
    bd, be = _pow2(q.shape[-1]), _pow2(v.shape[-1])
    return bd <= whole and bd <= be <= MAX_TILE


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _state_tile_at(SL, ZL, SG, ZG, bh, c, CPS, NC, P, m0, MP, gl, gf, BMT: tl.constexpr, BE: tl.constexpr):
    """Chunk c's state as :func:`_state_tile`, with the local state too taken times a factor:
    SL·gl + SG·gf (the ONLINE scan's states, each at its own stabilizer, brought to a common one)."""
    s = c // CPS
    rows = m0 + tl.arange(0, BMT)
    cols = tl.arange(0, BE)
    tile = rows[:, None] * BE + cols[None, :]
    S = tl.load(SL + (bh * NC + c) * MP * BE + tile).to(tl.float32) * gl + tl.load(SG + (bh * P + s) * MP * BE + tile) * gf
    z = tl.load(ZL + (bh * NC + c) * MP + rows) * gl + tl.load(ZG + (bh * P + s) * MP + rows) * gf
    return S, z


@triton.jit
def _state_tile(SL, ZL, SG, ZG, bh, c, CPS, NC, P, m0, MP, gf, BMT: tl.constexpr, BE: tl.constexpr):
    """Chunk c's state, feature rows [m0, m0 + BMT): S (BMT, BE) and z (BMT,), both fp32, the
    chunk's local state within its segment plus the segment's times gf (causal softmax: the factor
    between their stabilizers, :func:`_segment_factor`; else 1) (layout: module docstring)."""
    return _state_tile_at(SL, ZL, SG, ZG, bh, c, CPS, NC, P, m0, MP, 1.0, gf, BMT, BE)


@triton.jit
def _operand(x, FEAT_F32: tl.constexpr, INTERP: tl.constexpr):
    """x in the operand dtype of the feature-side products (what _mm would cast it to, rounded the
    same way): held so across the feature loop, a bf16 tile takes half the registers."""
    if FEAT_F32:
        return x.to(tl.float32)
    else:
        return _cast(x, tl.bfloat16, INTERP)


@triton.jit
def _stats_at(STATS, bh, N, BN: tl.constexpr, FEAT_F32: tl.constexpr):
    """(base, scores) of (batch·head) bh in the training stats (layout: :func:`stats_rows`): base,
    fp32, holds mq, den and the causal key stabilizer at + row, + N + row, + 2N + row; scores, in
    the feature operand dtype (:func:`_operand`), the intra-chunk scores A[i, j] (query position i,
    key j of its chunk) at + i·BN + j."""
    if FEAT_F32:
        base = STATS + bh * (3 + BN) * N
        scores = base + 3 * N
    else:
        base = STATS + bh * (3 + BN // 2) * N
        scores = base.to(tl.pointer_type(tl.bfloat16)) + 6 * N
    return base, scores


@triton.jit
def _segment_factor(MX, bh, N, c, CPS, BN: tl.constexpr, REVERSE: tl.constexpr):
    """Causal softmax: the factor ≤ 1 that takes chunk c's segment state (SG) to the stabilizer
    of its local state (SL). Keys (forward): SL[c] is at E(c − 1), the chunk before c, and SG at
    E of the chunk before the segment. Queries (REVERSE, the backward's R): SL[c] is at E(c), SG at
    E of the segment's last chunk."""
    s0 = (c // CPS) * CPS
    if REVERSE:
        f = _decay(_chunk_end(MX, bh, N, c, BN), _chunk_end(MX, bh, N, tl.minimum(s0 + CPS, tl.cdiv(N, BN)) - 1, BN))
    else:
        f = _decay(_chunk_end(MX, bh, N, s0 - 1, BN), _chunk_end(MX, bh, N, c - 1, BN))
    return f


@triton.jit
def _phi_query(projq, mq, half, fvalid, a2, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX: tl.constexpr, EVEN_M: tl.constexpr):
    """Query features of one feature tile from its projection projq = xq·ωᵀ (BN, BMT) fp32:
    (φq, alpha, mq). Softmax: mq is the running row max of the logits lg = a2·projq − half
    (log2 units; half = ‖xs‖²/2 per row), updated by this tile, alpha = exp2(old − new mq) the
    factor by which what was accumulated from earlier tiles is rescaled, and φq = exp2(lg − mq −
    log2 √m). Relu: φq = max(projq·rs, 0)/√m + eps, alpha and mq unchanged. Padded features
    (fvalid false; none when EVEN_M) give φq = 0 and do not enter the max."""
    alpha = tl.zeros_like(mq) + 1.0
    if SOFTMAX:
        # The logits are a2·proj − half with a2 ≥ 0, so their row max is a2·max(proj) − half:
        # the max is taken on proj, and φ costs one FFMA and one exp2 per element.
        if EVEN_M:
            pmax = tl.max(projq, 1)
        else:
            pmax = tl.max(tl.where(fvalid[None, :], projq, float("-inf")), 1)
        mnew = tl.maximum(mq, pmax * a2 - half)
        alpha = tl.exp2(mq - mnew)
        mq = mnew
        phq = tl.exp2(projq * a2 - (mq + half + log2_sqrt_m)[:, None])
        if not EVEN_M:
            phq = tl.where(fvalid[None, :], phq, 0.0)
    elif EVEN_M:
        phq = tl.maximum(projq * rs, 0.0) * inv_sqrt_m + eps
    else:
        phq = tl.where(fvalid[None, :], tl.maximum(projq * rs, 0.0) * inv_sqrt_m + eps, 0.0)
    return phq, alpha, mq


@triton.jit
def _chunk_attend(
    Qb, Kb, Vb, W, MASK, SL, ZL, SG, ZG, b, h, bh, c, CPS, NC, P, MP, N, D, E, M,
    sqn, sqd, skn, skd, svn, sve, smb, smn, rs, log2_sqrt_m, inv_sqrt_m, eps, MX, EL, EG,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr,
    ONLINE: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Forward of chunk c (rows c·BN + arange(BN)) of one (batch b, head h; bh = b·H + h):
    returns (num (BN, BE) fp32, den (BN,) fp32, mq (BN,) fp32, mk (BN,) fp32, A (BN, BN) fp32),
    out = num / (den == 0 ? 1 : den); mk is the rows' causal key stabilizer Mᵢ (causal softmax;
    else 0); A the intra-chunk scores (causal; else 0): A[i, j] = φ(qᵢ)·φ(kⱼ) for keys j ≤ query
    i of the chunk (times exp2(Mⱼ − Mᵢ), softmax), 0 above the diagonal, the weights of vⱼ in numᵢ.

    Qb, Kb, Vb: the (b, h) base pointers of q (N, D), k (N, D), v (N, E) with row/column strides
    (sqn, sqd), (skn, skd), (svn, sve); MASK the key mask (B, N) with strides (smb, smn), read
    only with HAS_MASK (CAUSAL only). W: ω contiguous (H, M, D). The whole padded head dim is one
    tile (BD), E ≤ BE. rs = √scale, log2_sqrt_m = log2 √m, inv_sqrt_m = 1/√m, eps = RELU_EPS:
    fp32 scalars (pass them through ``_f32`` first). MX (B·H, N) fp32: the causal softmax key
    stabilizer (triton.py's ``_Cfg.key_max``; read for causal softmax only). EVEN_M: BMT divides
    M (no padded feature in any tile, so none is masked).

    * CAUSAL: the state of chunk c is SL[c] + SG[c // CPS] in the scan layout of the module
      docstring (:class:`ChunkScan`: NC chunks, P segments of CPS chunks, MP feature rows), and
      the intra-chunk masked quadratic part (keys j ≤ query i of this chunk) is added. Softmax
      keys are φ̃ⱼ = exp2(lⱼ − Mⱼ) at their own running max; query i takes the state (at E(c − 1),
      the chunk before) times exp2(E(c − 1) − Mᵢ) and key j of its chunk times exp2(Mⱼ − Mᵢ).
    * CAUSAL, SOFTMAX and ONLINE: MX is not read; the states come from the ONLINE scan, feature
      tile t of SL[c] at EL[bh, c, t] and of SG[c // CPS] at EG[bh, c // CPS, t] (EL (BH, NC, NT),
      EG (BH, P, NT) fp32, :func:`_scan_kernel`). The program finds the stabilizers itself, online
      over its feature tiles as it does the query's: the states are summed at g, the largest of
      their stabilizers so far (= E(c − 1) after the last tile), and key j of the chunk at κⱼ,
      its own largest logit so far (A's column j rescaled when κⱼ grows). After the loop
      Mᵢ = max(g, max_{j ≤ i} κⱼ), the same running max as MX, and query i takes the states
      times exp2(g − Mᵢ) and key j times exp2(κⱼ − Mᵢ): the same sums as above.
    * not CAUSAL: SL is the whole-sequence state S (BH, MP, BE) (bf16 or fp32) and ZL is z
      (BH, MP) fp32, as triton.py's ``_Cfg.run_state`` returns them (MP = its BM ≥ the padded
      feature rows); SG, ZG, CPS, NC, P, MX, Kb, Vb, MASK and their strides are not read (pass
      anything). N is the number of queries.

    mq is the query stabilizer φq = exp2(lg − mq) used (softmax): the row max over all M
    features of lg = (ω·xs − ‖xs‖²/2)·log2 e, plus log2 √m; 0 for relu. It is an online max over
    the feature tiles: when it grows, what was accumulated from φq is rescaled.
    Rows ≥ N hold unspecified finite values (the caller masks its stores).
    """
    DT = Qb.dtype.element_ty
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    rows = c * BN + offs_n
    xq = _load_rows(Qb, rows, offs_d, N, D, sqn, sqd)
    xf = xq.to(tl.float32)
    sqq = tl.sum(xf * xf, 1)
    a2 = rs * 1.4426950408889634
    half = (0.5 * rs * rs * 1.4426950408889634) * sqq  # ‖xs‖²/2 in log2 units, per row
    gf = 1.0
    if CAUSAL:
        xk = _load_rows(Kb, rows, offs_d, N, D, skn, skd)
        xf = xk.to(tl.float32)
        sqk = tl.sum(xf * xf, 1)
        rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
        kstab = 0.0
        if SOFTMAX:
            if ONLINE:
                NT = MP // BMT
                kk = tl.full((BN,), -1e30, tl.float32)  # κ: each key's largest logit so far
                g = tl.max(kk, 0)  # the states' stabilizer so far (NO_KEY)
                kvalid = rvalid[:, None]
            else:
                mrow = _row_max(MX, bh, rows, N)
                kstab = mrow[:, None]
                gf = _segment_factor(MX, bh, N, c, CPS, BN, False)
    num = tl.zeros((BN, BE), tl.float32)
    den = tl.zeros((BN,), tl.float32)
    A = tl.zeros((BN, BN), tl.float32)  # φq·φkᵀ over all features (causal), masked after the loop
    mq = tl.full((BN,), -1e30, tl.float32)  # running row max of lg (softmax)
    for m0 in range(0, M, BMT):
        # ω's tile is loaded here, inside the loop: hoisted, every tile would stay on chip.
        w = _omega_rows(W, h, D, M, m0, 0, BD, BMT, DT, INTERP)
        fvalid = (m0 + tl.arange(0, BMT)) < M
        projq = _dot(xq, tl.trans(w), PREC, INTERP)
        phq, alpha, mq = _phi_query(projq, mq, half, fvalid, a2, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX, EVEN_M)
        if SOFTMAX:
            num = num * alpha[:, None]
            den = den * alpha
            if CAUSAL:
                A = A * alpha[:, None]
        # The key tile first, so that its (C × BMT) tiles are dead before the state tile loads.
        if CAUSAL:
            projk = _dot(xk, tl.trans(w), PREC, INTERP)
            if SOFTMAX and ONLINE:
                if EVEN_M:
                    lgk = tl.where(kvalid, _logits(projk, sqk, rs), float("-inf"))
                else:
                    lgk = tl.where(kvalid & fvalid[None, :], _logits(projk, sqk, rs), float("-inf"))
                knew = tl.maximum(kk, tl.max(lgk, 1) + log2_sqrt_m)
                A = A * tl.exp2(kk - knew)[None, :]
                kk = knew
                phk = tl.exp2(lgk - knew[:, None])
            else:
                phk = _phi_key(projk, sqk, fvalid, rvalid, kstab, rs, inv_sqrt_m, eps, SOFTMAX)
            A += _mm(phq, tl.trans(phk), FEAT_F32, PREC, INTERP)
            if SOFTMAX and ONLINE:
                el = tl.load(EL + (bh * NC + c) * NT + m0 // BMT)
                eg = tl.load(EG + (bh * P + c // CPS) * NT + m0 // BMT)
                gnew = tl.maximum(g, tl.maximum(el, eg))
                num = num * tl.exp2(g - gnew)
                den = den * tl.exp2(g - gnew)
                g = gnew
                S, z = _state_tile_at(SL, ZL, SG, ZG, bh, c, CPS, NC, P, m0, MP, tl.exp2(el - g), tl.exp2(eg - g), BMT, BE)
            else:
                S, z = _state_tile(SL, ZL, SG, ZG, bh, c, CPS, NC, P, m0, MP, gf, BMT, BE)
        else:
            mrows = m0 + tl.arange(0, BMT)
            S = tl.load(SL + bh * MP * BE + mrows[:, None] * BE + offs_e[None, :])
            z = tl.load(ZL + bh * MP + mrows)
        num += _mm(phq, S, FEAT_F32, PREC, INTERP)
        den += tl.sum(phq * z[None, :], 1)
    mk = tl.zeros((BN,), tl.float32)
    if CAUSAL:  # the intra-chunk part, once: keys j ≤ query i
        if SOFTMAX:
            if ONLINE:
                mrow = tl.maximum(tl.associative_scan(kk, 0, _max2), g)
                fq = _decay(g, mrow)
                A = A * _decay(kk[None, :], mrow[:, None])
            else:
                fq = _decay(_chunk_end(MX, bh, N, c - 1, BN), mrow)
                A = A * _decay(mrow[None, :], mrow[:, None])
            num = num * fq[:, None]
            den = den * fq
            mk = mrow
        A = tl.where(offs_n[:, None] >= offs_n[None, :], A, 0.0)
        vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)  # here: not live across the loop
        num += _mm(A, vt, FEAT_F32, PREC, INTERP)
        den += tl.sum(A, 1)
    if SOFTMAX:
        mq = mq + log2_sqrt_m
    else:
        mq = tl.zeros((BN,), tl.float32)
    return num, den, mq, mk, A


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scan_kernel(
    X, VALS, W, MASK, STAB, ZW, SL, ZL, SG, ZG, MX, EL, EG,
    N, D, E, M, H,
    sxb, sxh, sxn, sxd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS, NC, MP,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr,
    SOFTMAX: tl.constexpr, QUERY: tl.constexpr, HAS_MASK: tl.constexpr, WEIGHTED: tl.constexpr,
    REVERSE: tl.constexpr, ONLINE: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Grid (MP / BMT feature tiles, P segments, B·H). Program (t, s, bh) walks the chunks of
    segment s (backward with REVERSE) for feature rows [t·BMT, (t+1)·BMT): before each chunk it
    stores the running sums into SL/ZL (the exclusive prefix/suffix within the segment), then adds
    the chunk's φᵀ·vals and Σ φ (·zw); the segment totals go to SG/ZG (made exclusive over
    segments by _segment_scan_kernel).

    Softmax features are scaled by the causal key stabilizer MX (B·H, N) fp32 (triton.py's
    ``_Cfg.key_max``), so that every factor is ≤ 1: the running sums are at E(c), the stabilizer of
    chunk c's last position, moving by exp2(E(c − 1) − E(c)) from chunk to chunk. Keys: chunk c
    adds φ(kⱼ) = exp2(lⱼ − E(c)) and SL[c] is at E(c − 1). Queries (the backward's R, REVERSE):
    chunk c adds φ(qᵢ)·exp2(E(c − 1) − Mᵢ) and SL[c] is at E(c). The segment totals are at the
    scale the walk ends at.

    ONLINE (softmax keys, prefix): MX is not read. The program keeps its own stabilizer instead,
    the running max e of its tile's key logits (log2 units, log2 √m folded in, as MX) over the
    segment's keys so far (NO_KEY before the first unmasked key): SL[c] is at e before chunk c,
    stored in EL (BH, NC, NT) fp32, and the segment total at the walk's end e, in EG (BH, P, NT).
    This spares the forward the key-max pre-pass; _segment_scan_kernel and _chunk_attend take the
    sums between these stabilizers. One per tile rather than one per feature row (a reduction
    inside each warp, as _key_pass_kernel's): per-row stabilizers kept this kernel at its MX
    speed, but the chunk kernel then took a vector of them and per-row factors on every state
    tile, and lost more than the scan won (H200, bf16, B = 4, H = 12, d = 64, m = 256, N = 16384:
    scan 280 → 249 µs, chunk kernel 664 → 845 µs)."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    bh = _bh_id(2, I64)
    NT = tl.num_programs(0)
    P = tl.num_programs(1)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    b = bh // H
    h = bh % H
    m0 = t * BMT
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    mrows = m0 + tl.arange(0, BMT)
    fvalid = mrows < M
    Xb = X + b * sxb + h * sxh
    Vb = VALS + b * svb + h * svh
    DT = X.dtype.element_ty
    # One feature tile per program: its ω tile is loop-invariant (and small), loaded once.
    w = _omega_rows(W, h, D, M, m0, 0, BD, BMT, DT, INTERP)
    tile = mrows[:, None] * BE + offs_e[None, :]
    acc = tl.zeros((BMT, BE), tl.float32)
    accz = tl.zeros((BMT,), tl.float32)
    run = tl.max(tl.full((BMT,), -1e30, tl.float32), 0)  # ONLINE: the stabilizer e (NO_KEY)
    c_lo = s * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for i in range(c_lo, c_hi):
        ci = c_hi - 1 - (i - c_lo) if REVERSE else i
        loc = (bh * NC + ci) * MP
        tl.store(SL + loc * BE + tile, _cast(acc, SL.dtype.element_ty, INTERP))
        tl.store(ZL + loc + mrows, accz)
        if ONLINE:
            tl.store(EL + (bh * NC + ci) * NT + t, run)
        elif SOFTMAX:  # the sums move from E(ci − 1) to E(ci) (keys) or back (queries)
            e_lo = _chunk_end(MX, bh, N, ci - 1, BN)
            e_hi = _chunk_end(MX, bh, N, ci, BN)
            acc = acc * _decay(e_lo, e_hi)
            accz = accz * _decay(e_lo, e_hi)
        rows = ci * BN + offs_n
        # Features transposed, (BMT, BN): φᵀ is then the A operand of φᵀ·vals as computed, with
        # no (C × BMT) transpose through shared memory.
        x = _load_rows(Xb, rows, offs_d, N, D, sxn, sxd)
        projT = _dot(w, tl.trans(x), PREC, INTERP)
        xf = x.to(tl.float32)
        sq = tl.sum(xf * xf, 1)
        if QUERY:
            rvalid = rows < N
        else:
            rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
        valid = fvalid[:, None] & rvalid[None, :]
        if SOFTMAX:
            lgT = projT * (rs * 1.4426950408889634) - ((0.5 * rs * rs * 1.4426950408889634) * sq)[None, :]
            if QUERY:
                stab = tl.load(STAB + bh * N + rows, mask=rvalid, other=0.0)
                stab += tl.maximum(_row_max(MX, bh, rows, N) - e_lo, 0.0)
                phiT = tl.exp2(tl.where(valid, lgT - stab[None, :], float("-inf")))
            elif ONLINE:
                lgT = tl.where(valid, lgT, float("-inf"))
                new = tl.maximum(run, tl.max(tl.max(lgT, 1), 0) + log2_sqrt_m)
                f = tl.exp2(run - new)
                acc = acc * f
                accz = accz * f
                run = new
                phiT = tl.exp2(lgT - new)
            else:
                phiT = tl.exp2(tl.where(valid, lgT - e_hi, float("-inf")))
        else:
            phiT = tl.where(valid, tl.maximum(projT * rs, 0.0) * inv_sqrt_m + eps, 0.0)
        vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)
        acc += _mm(phiT, vt, FEAT_F32, PREC, INTERP)
        if WEIGHTED:
            zw = tl.load(ZW + bh * N + rows, mask=rows < N, other=0.0)
            accz += tl.sum(phiT * zw[None, :], 1)
        else:
            accz += tl.sum(phiT, 1)
    seg = (bh * P + s) * MP
    tl.store(SG + seg * BE + tile, acc)
    tl.store(ZG + seg + mrows, accz)
    if ONLINE:
        tl.store(EG + (bh * P + s) * NT + t, run)


@triton.jit
def _key_step(
    acc, accz, run, w, Kb, Vb, MASK, b, ci, fvalid, N, D, E, skn, skd, svn, sve, smb, smn, a2, hb, rs, inv_sqrt_m, eps,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr,
    MASKED: tl.constexpr, EVEN_M: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """One chunk ci of _key_pass_kernel: (acc, accz, run) with the chunk's keys added. MASKED:
    some row may be ≥ N or masked out (else every row is a valid key and no element is masked);
    EVEN_M: no padded feature row."""
    offs_n = tl.arange(0, BN)
    rows = ci * BN + offs_n
    # Features transposed, (BMT, BN), as in _scan_kernel: φᵀ is the A operand of φᵀ·v.
    x = _load_rows(Kb, rows, tl.arange(0, BD), N, D, skn, skd)
    projT = _dot(w, tl.trans(x), PREC, INTERP)
    if MASKED:
        rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
        if EVEN_M:
            valid = rvalid[None, :]
        else:
            valid = fvalid[:, None] & rvalid[None, :]
    elif not EVEN_M:
        valid = fvalid[:, None]
    if SOFTMAX:
        xf = x.to(tl.float32)
        lgT = projT * a2 - (hb * tl.sum(xf * xf, 1))[None, :]
        if MASKED or not EVEN_M:
            lgT = tl.where(valid, lgT, float("-inf"))
        new = tl.maximum(run, tl.max(lgT, 1))
        alpha = tl.exp2(run - new)
        acc = acc * alpha[:, None]
        accz = accz * alpha
        run = new
        phiT = tl.exp2(lgT - new[:, None])
    else:
        phiT = tl.maximum(projT * rs, 0.0) * inv_sqrt_m + eps
        if MASKED or not EVEN_M:
            phiT = tl.where(valid, phiT, 0.0)
    vt = _load_rows(Vb, rows, tl.arange(0, BE), N, E, svn, sve)
    acc += _mm(phiT, vt, FEAT_F32, PREC, INTERP)
    accz += tl.sum(phiT, 1)
    return acc, accz, run


@triton.jit
def _key_pass_kernel(
    K, V, W, MASK, S_OUT, Z_OUT, C_OUT,
    N, D, E, M, H,
    skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS, NC, BM,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr, SOFTMAX: tl.constexpr,
    HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
    I64: tl.constexpr,
):  # fmt: skip
    """Non-causal key pass, grid (BM / BMT feature tiles, P segments, B·H). Program (t, s, bh)
    sums, over the keys of segment s (chunks [s·CPS, (s+1)·CPS)) and feature rows [t·BMT,
    (t+1)·BMT), S = Σ φ(k)ᵀv into S_OUT (BH, P, BM, BE) fp32 and z = Σ φ(k) into Z_OUT (BH, P, BM).

    Softmax keys are stabilized per feature row by the running max of its logits over the
    program's keys (log2 units; the row of S and z rescaled when it grows), stored in C_OUT
    (BH, P, BM): the reduce (triton.py's ``_reduce_kernel``, MODE 1 with one stabilizer per feature
    row) rescales every row of every partial to the largest, one constant per (batch, head), so
    the stabilizer still cancels in out. Per row rather than one per program: the row max is a
    reduction inside each warp, where a program-wide max put a cross-warp reduction (and barrier)
    into every step. Relu: max(ω·xs, 0)/√m + eps, C_OUT not written. Masked keys, rows ≥ N and
    padded features add nothing. EVEN_M: no padded feature row (M = BM; the grid covers all BM
    rows, whose padded ones must come out 0). Without a key mask the chunks whose rows
    are all < N run without any element mask; only the last chunk of the sequence may need one."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    bh = _bh_id(2, I64)
    P = tl.num_programs(1)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    a2 = rs * 1.4426950408889634
    hb = 0.5 * rs * rs * 1.4426950408889634
    b = bh // H
    h = bh % H
    m0 = t * BMT
    mrows = m0 + tl.arange(0, BMT)
    fvalid = mrows < M
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    w = _omega_rows(W, h, D, M, m0, 0, BD, BMT, K.dtype.element_ty, INTERP)
    acc = tl.zeros((BMT, BE), tl.float32)
    accz = tl.zeros((BMT,), tl.float32)
    run = tl.full((BMT,), -1e30, tl.float32)
    c_lo = s * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    c_full = c_lo  # chunks [c_lo, c_full) hold N rows and no mask
    if not HAS_MASK:
        c_full = tl.maximum(tl.minimum(c_hi, N // BN), c_lo)
    for ci in range(c_lo, c_full):
        acc, accz, run = _key_step(
            acc, accz, run, w, Kb, Vb, MASK, b, ci, fvalid, N, D, E, skn, skd, svn, sve, smb, smn, a2, hb, rs,
            inv_sqrt_m, eps, BN, BD, BE, SOFTMAX, HAS_MASK, False, EVEN_M, FEAT_F32, PREC, INTERP,
        )  # fmt: skip
    for ci in range(c_full, c_hi):
        acc, accz, run = _key_step(
            acc, accz, run, w, Kb, Vb, MASK, b, ci, fvalid, N, D, E, skn, skd, svn, sve, smb, smn, a2, hb, rs,
            inv_sqrt_m, eps, BN, BD, BE, SOFTMAX, HAS_MASK, True, EVEN_M, FEAT_F32, PREC, INTERP,
        )  # fmt: skip
    seg = bh * P + s
    offs_e = tl.arange(0, BE)
    tl.store(S_OUT + (seg * BM + mrows[:, None]) * BE + offs_e[None, :], acc)
    tl.store(Z_OUT + seg * BM + mrows, accz)
    if SOFTMAX:
        tl.store(C_OUT + seg * BM + mrows, run)


@triton.jit
def _segment_scan_kernel(
    SG, ZG, MX, EG, EX, P, MP, N, L,
    BMT: tl.constexpr, BE: tl.constexpr, REVERSE: tl.constexpr, RESCALE: tl.constexpr, ONLINE: tl.constexpr,
    I64: tl.constexpr,
):  # fmt: skip
    """Grid (MP / BMT, B·H): the P segment totals of one (batch·head, feature tile) replaced, in
    place, by their exclusive prefix (suffix with REVERSE) sums. RESCALE (softmax): segment s
    (positions [s·L, (s+1)·L) of N) holds its total at the key stabilizer MX of its last position
    (keys) or of the one before it (REVERSE); the running sum moves between them by exp2(Eb − Ee).
    ONLINE (keys, prefix; MX not read): segment s's total is at EG (BH, P, NT)[bh, s, t]
    (_scan_kernel's ONLINE stabilizer); the running sum is kept at the max of those seen, and
    each prefix's stabilizer goes to EX (BH, P, NT) (NO_KEY for the first segment). Not in place
    as the sums are: every thread reads and writes the same scalar, so a thread's store could land
    before another thread's load (it did on the H200)."""
    t = tl.program_id(0)
    bh = _bh_id(1, I64)
    NT = tl.num_programs(0)
    mrows = t * BMT + tl.arange(0, BMT)
    tile = mrows[:, None] * BE + tl.arange(0, BE)[None, :]
    acc = tl.zeros((BMT, BE), tl.float32)
    accz = tl.zeros((BMT,), tl.float32)
    run = tl.max(tl.full((BMT,), -1e30, tl.float32), 0)
    for i in range(P):
        p = (bh * P + (P - 1 - i if REVERSE else i)) * MP
        s = tl.load(SG + p * BE + tile)
        z = tl.load(ZG + p + mrows)
        tl.store(SG + p * BE + tile, acc)
        tl.store(ZG + p + mrows, accz)
        if ONLINE:
            es = tl.load(EG + (bh * P + i) * NT + t)
            tl.store(EX + (bh * P + i) * NT + t, run)
            new = tl.maximum(run, es)
            f = tl.exp2(run - new)
            fs = tl.exp2(es - new)
            acc = acc * f + s * fs
            accz = accz * f + z * fs
            run = new
        else:
            if RESCALE:
                sg = P - 1 - i if REVERSE else i
                f = _decay(_chunk_end(MX, bh, N, sg - 1, L), _chunk_end(MX, bh, N, sg, L))
                acc = acc * f
                accz = accz * f
            acc += s
            accz += z


@triton.jit
def _fwd_chunk_kernel(
    Q, K, V, W, MASK, SL, ZL, SG, ZG, O, STATS, EL, EG,
    N, D, E, M, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    sob, soh, son, soe,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS, NC, P, MP,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_STATS: tl.constexpr,
    EVEN_M: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Grid (chunks, B·H): out of one chunk of queries (see _chunk_attend). WRITE_STATS: also
    the rows' query stabilizer mq, normalizer den, (causal softmax) key stabilizer Mᵢ and (causal)
    intra-chunk scores A into STATS (layout: :func:`stats_rows`), which the backward reads instead
    of recomputing the forward. Causal softmax takes its stabilizers online (_chunk_attend's
    ONLINE): EL, EG are the ONLINE scan's (:class:`ChunkScan` with ``online``), read for causal
    softmax only."""
    c = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    b = bh // H
    h = bh % H
    num, den, mq, mk, A = _chunk_attend(
        Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, W, MASK, SL, ZL, SG, ZG,
        b, h, bh, c, CPS, NC, P, MP, N, D, E, M, sqn, sqd, skn, skd, svn, sve, smb, smn,
        rs, log2_sqrt_m, inv_sqrt_m, eps, EL, EL, EG,
        BN, BD, BE, BMT, SOFTMAX, CAUSAL, HAS_MASK, EVEN_M, True, FEAT_F32, PREC, INTERP,
    )  # fmt: skip
    out = num / tl.where(den == 0.0, 1.0, den)[:, None]
    rows = c * BN + tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    if WRITE_STATS:
        sb, sa = _stats_at(STATS, bh, N, BN, FEAT_F32)
        tl.store(sb + rows, mq, mask=rows < N)
        tl.store(sb + N + rows, den, mask=rows < N)
        if CAUSAL:
            if SOFTMAX:
                tl.store(sb + 2 * N + rows, mk, mask=rows < N)
            offs_n = tl.arange(0, BN)
            tl.store(sa + rows[:, None] * BN + offs_n[None, :], _operand(A, FEAT_F32, INTERP), mask=rows[:, None] < N)
    tl.store(
        O + b * sob + h * soh + rows[:, None] * son + offs_e[None, :] * soe,
        _cast(out, O.dtype.element_ty, INTERP),
        mask=(rows[:, None] < N) & (offs_e[None, :] < E),
    )


@triton.jit
def _out_tile(W, SL, ZL, h, bh, t, D, M, MP, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr, DT: tl.constexpr,
              INTERP: tl.constexpr):  # fmt: skip
    """Feature tile t (rows [t·BMT, (t+1)·BMT)) for _out_pass_kernel: head h's ω (BMT, BD) in DT,
    (batch·head) bh's whole-sequence state S (BMT, BE) as stored and z (BMT,) fp32, and which rows
    are real features (< M)."""
    mrows = t * BMT + tl.arange(0, BMT)
    w = _omega_rows(W, h, D, M, t * BMT, 0, BD, BMT, DT, INTERP)
    S = tl.load(SL + bh * MP * BE + mrows[:, None] * BE + tl.arange(0, BE)[None, :])
    z = tl.load(ZL + bh * MP + mrows)
    return w, S, z, mrows < M


@triton.jit
def _out_step(
    xq, w, S, z, fvalid, num, den, mq, half, a2, rs, log2_sqrt_m, inv_sqrt_m, eps,
    SOFTMAX: tl.constexpr, EVEN_M: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """(num, den, mq) of a chunk of queries xq with one feature tile (w, S, z) added: the
    non-causal step of _chunk_attend's feature loop."""
    projq = _dot(xq, tl.trans(w), PREC, INTERP)
    phq, alpha, mq = _phi_query(projq, mq, half, fvalid, a2, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX, EVEN_M)
    if SOFTMAX:
        num = num * alpha[:, None]
        den = den * alpha
    num += _mm(phq, S, FEAT_F32, PREC, INTERP)
    den += tl.sum(phq * z[None, :], 1)
    return num, den, mq


@triton.jit
def _out_pass_kernel(
    Q, W, SL, ZL, O,
    N, D, E, M, H,
    sqb, sqh, sqn, sqd, sob, soh, son, soe,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPP, NC, MP,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr, NT: tl.constexpr,
    SOFTMAX: tl.constexpr, EVEN_M: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
    I64: tl.constexpr,
):  # fmt: skip
    """Non-causal output pass with the head's features held on chip: grid (G, B·H). Program (g, bh)
    loads the NT ≤ 4 feature tiles of ω and of the whole-sequence state (SL (BH, MP, BE), ZL
    (BH, MP), as _fwd_chunk_kernel reads them when not CAUSAL) once, then computes out for the
    query chunks [g·CPP, min((g+1)·CPP, NC)) of bh, each as _chunk_attend does: _fwd_chunk_kernel
    reads every tile again for every chunk of BN queries (for d = 64, m = 256: 64 KB of ω and S
    against the chunk's 8 KB of queries). The arguments are _fwd_chunk_kernel's, less the causal
    ones; the tiles take registers, so the plan picks this kernel only where they fit."""
    g = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    b = bh // H
    h = bh % H
    DT = Q.dtype.element_ty
    a2 = rs * 1.4426950408889634
    hq = 0.5 * rs * rs * 1.4426950408889634
    w0, S0, z0, f0 = _out_tile(W, SL, ZL, h, bh, 0, D, M, MP, BD, BE, BMT, DT, INTERP)
    if NT > 1:
        w1, S1, z1, f1 = _out_tile(W, SL, ZL, h, bh, 1, D, M, MP, BD, BE, BMT, DT, INTERP)
    if NT > 2:
        w2, S2, z2, f2 = _out_tile(W, SL, ZL, h, bh, 2, D, M, MP, BD, BE, BMT, DT, INTERP)
    if NT > 3:
        w3, S3, z3, f3 = _out_tile(W, SL, ZL, h, bh, 3, D, M, MP, BD, BE, BMT, DT, INTERP)
    Qb = Q + b * sqb + h * sqh
    Ob = O + b * sob + h * soh
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    c_lo = g * CPP
    for c in range(c_lo, tl.minimum(c_lo + CPP, NC)):
        rows = c * BN + tl.arange(0, BN)
        xq = _load_rows(Qb, rows, offs_d, N, D, sqn, sqd)
        xf = xq.to(tl.float32)
        half = hq * tl.sum(xf * xf, 1)
        num = tl.zeros((BN, BE), tl.float32)
        den = tl.zeros((BN,), tl.float32)
        mq = tl.full((BN,), -1e30, tl.float32)
        num, den, mq = _out_step(
            xq, w0, S0, z0, f0, num, den, mq, half, a2, rs, log2_sqrt_m, inv_sqrt_m, eps,
            SOFTMAX, EVEN_M, FEAT_F32, PREC, INTERP,
        )  # fmt: skip
        if NT > 1:
            num, den, mq = _out_step(
                xq, w1, S1, z1, f1, num, den, mq, half, a2, rs, log2_sqrt_m, inv_sqrt_m, eps,
                SOFTMAX, EVEN_M, FEAT_F32, PREC, INTERP,
            )  # fmt: skip
        if NT > 2:
            num, den, mq = _out_step(
                xq, w2, S2, z2, f2, num, den, mq, half, a2, rs, log2_sqrt_m, inv_sqrt_m, eps,
                SOFTMAX, EVEN_M, FEAT_F32, PREC, INTERP,
            )  # fmt: skip
        if NT > 3:
            num, den, mq = _out_step(
                xq, w3, S3, z3, f3, num, den, mq, half, a2, rs, log2_sqrt_m, inv_sqrt_m, eps,
                SOFTMAX, EVEN_M, FEAT_F32, PREC, INTERP,
            )  # fmt: skip
        out = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(
            Ob + rows[:, None] * son + offs_e[None, :] * soe,
            _cast(out, O.dtype.element_ty, INTERP),
            mask=(rows[:, None] < N) & (offs_e[None, :] < E),
        )


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def stats_rows(feat_f32: bool, chunk: int | None = None) -> int:
    """Rows R of the causal training stats (B, H, R, N) fp32 that :class:`ChunkedForwardPlan`
    (``stats=True``) writes and :class:`.chunked_bwd.ChunkedBackwardPlan` reads, for chunks of
    ``chunk`` positions (None: ``CHUNK``) and features in fp32 (``feat_f32``: fp16/fp32 inputs) or
    bf16. Per (batch, head), contiguous:

    * rows 0, 1, 2: each query's stabilizer mq, normalizer den and (softmax) the causal key
      stabilizer M of each position;
    * then N·chunk scores in the feature operand dtype (fp32, or bf16 packed two to a row element):
      A[i, j] at i·chunk + j, the weight of key j of query i's chunk in numᵢ (:func:`_chunk_attend`,
      0 for j after i). The dk/dv pass reads them (Aᵀ·G') instead of forming φk·φqᵀ again.

    So R = 3 + chunk (fp32 features) or 3 + chunk / 2 (bf16)."""
    bn = CHUNK if chunk is None else chunk
    return 3 + (bn if feat_f32 else bn // 2)


def stats_scores(stats: Tensor, feat_f32: bool, chunk: int | None = None) -> Tensor:
    """The intra-chunk scores held in training stats (B, H, R, N) (:func:`stats_rows`), as a view
    (B, H, N, chunk) in fp32 or bf16: [b, h, i, j] is query i's weight on key j of its chunk."""
    B, H, _, N = stats.shape
    bn = CHUNK if chunk is None else chunk
    region = stats[:, :, 3:].reshape(B, H, -1)
    if not feat_f32:
        region = region.view(torch.bfloat16)
    return region.view(B, H, N, bn)


def _feature_tile(m: int, m_tile: int) -> int:
    """Feature rows per tile: the knob, clamped to the padded m (both powers of two ≥ 16), so the
    tiles never run past the padded rows of a non-causal whole-sequence state."""
    if m_tile < 16 or m_tile & (m_tile - 1):
        raise ValueError(f"m_tile must be a power of two >= 16, got {m_tile}")
    return min(m_tile, _pow2(m))


class ChunkScan:
    """Exclusive prefix (or suffix) sums of per-chunk feature states, parallel over (batch·head,
    feature tile, segment): the launches of one call signature.

    Built once per signature::

        ChunkScan(x, vals, omega, *, kernel_fn, scale, chunk, m_tile, e=None,
                  mask_strides=(0, 0), has_mask=False, query=False, weighted=False,
                  reverse=False, online=False, feat_f32, prec, fast=False, trace=False)

    and called with tensors of that signature::

        scan(x, vals, omega, mask, stab, zw, mx) -> (SL, ZL, SG, ZG)        # online=False
        scan(x, vals, omega, mask, None, None, None) -> (SL, ZL, SG, ZG, EL, EG)  # online=True

    Args:
        x: (B, H, N, D), any strides: the feature source (keys, or queries with ``query``).
        vals: what φ multiplies, any strides: (B, H, N, E') (e.g. v) or (B·H, N, E') (e.g. the
            backward's gs, contiguous (BH, N, BE) fp32). Strides are part of the signature.
        omega: (H, m, D) contiguous.
        kernel_fn: "softmax" or "relu". scale: the temperature (xs = √scale·x).
        chunk: positions per chunk (BN; power of two ≥ 16). m_tile: feature rows per tile (BMT;
            power of two ≥ 16, clamped to the padded m — read ``BMT`` back).
        e: columns of vals summed (default vals.shape[-1]); columns ≥ e are read as 0. BE =
            their padded count.
        mask_strides, has_mask: the key mask (B, N)'s strides, and whether it is read (keys only).
        query: False: key features φk = exp2(lg − E) for softmax, E the causal key stabilizer of
            the chunk's last position (``mx``), masked keys → 0. True: query features
            φq = exp2(lg − stab_i) with stab (BH, N) fp32 (the forward's mq: log2 √m folded in),
            times exp2(E(c − 1) − Mᵢ), no mask. relu: max(ω·xs, 0)/√m + eps either way. Rows ≥ N
            and padded features → 0. (The scales: :func:`_scan_kernel`.)
        weighted: z sums φ·zw with zw (BH, N) fp32; else z sums φ.
        reverse: exclusive suffixes (later chunks), chunks walked backward; else prefixes.
        online: softmax key prefixes only: each program finds its own stabilizer (the largest key
            logit of its feature tile so far) instead of reading ``mx``, and the call also returns
            them: EL (BH, NC, NT) fp32, SL[c]'s, and EG (BH, P, NT) fp32, SG[s]'s (NT feature
            tiles; :func:`_scan_kernel` ONLINE). The forward takes this, with no key-max pre-pass.
        feat_f32: fp32 operands (fp16/fp32 inputs) or bf16 (bf16 inputs); also the dtype of SL
            (fp32, else bf16). prec: "ieee" or "tf32" (the projection and fp32 products).
        fast, trace: as kernels._launch.Launch.

    Call arguments: mask the bool key mask (or None), stab (BH, N) fp32 (query softmax; else
    None), zw (BH, N) fp32 (weighted; else None), mx (BH, N) fp32 the causal key stabilizer
    (triton.py's ``_Cfg.key_max``; softmax scans that are not online; else None, never read).

    Returns (layout in the module docstring; chunk c's state is SL[c] + SG[c // CPS]):
        SL (BH, NC, MP, BE) state dtype, ZL (BH, NC, MP) fp32: within-segment exclusive sums;
        SG (BH, P, MP, BE) fp32, ZG (BH, P, MP) fp32: exclusive sums over segments (softmax: at
        the stabilizer of the position before the segment (keys) or of its last one (queries);
        the chunk kernels rescale them, :func:`_segment_factor`);
        online only: EL (BH, NC, NT) and EG (BH, P, NT) fp32, the stabilizers SL's and SG's
        feature tiles are at (SG: of the segments' exclusive sum).

    Attributes: NC (chunks), P (segments), CPS (chunks per segment), MP (padded feature rows, a
    multiple of BMT), NT (feature tiles, MP / BMT), BMT, BE, BN, state_dtype, online. P is chosen so that the grid holds about
    triton.py's ``_target_programs(device)`` programs.

    Raises:
        ValueError: kernel_fn not softmax/relu, chunk or m_tile not a power of two ≥ 16, a head
            dim wider than one tile (padded D > 128), vals of the wrong shape or rank, e past
            vals' columns or padded past 128, a softmax scan other than a key prefix or a query
            suffix, online for other than a softmax key prefix; at the call, a softmax scan that
            is not online without mx.
    """

    def __init__(
        self, x, vals, omega, *, kernel_fn, scale, chunk, m_tile, e=None, mask_strides=(0, 0), has_mask=False,
        query=False, weighted=False, reverse=False, online=False, feat_f32, prec, fast=False, trace=False,
    ):  # fmt: skip
        if kernel_fn not in ("softmax", "relu"):
            raise ValueError(f"kernel_fn must be one of ['softmax', 'relu'], got {kernel_fn!r}")
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
        if kernel_fn == "softmax" and query != reverse:
            # The stabilizer's scales are those of the key prefix and the query suffix only.
            raise ValueError(
                f"softmax scans are key prefixes (query=False, reverse=False) or query suffixes (query=True, "
                f"reverse=True), got query={query}, reverse={reverse}"
            )
        if online and not (kernel_fn == "softmax" and not query and not reverse):
            raise ValueError(
                f"online scans are softmax key prefixes, got kernel_fn={kernel_fn!r}, query={query}, reverse={reverse}"
            )
        B, H, N, D = x.shape
        m = omega.shape[1]
        if omega.shape != (H, m, D):
            raise ValueError(f"omega must have shape (H, m, D) = ({H}, m, {D}), got {tuple(omega.shape)}")
        if vals.dim() == 4 and vals.shape[:3] == (B, H, N):
            sv = tuple(vals.stride())
        elif vals.dim() == 3 and vals.shape[:2] == (B * H, N):
            sv = (H * vals.stride(0), vals.stride(0), vals.stride(1), vals.stride(2))
        else:
            raise ValueError(f"vals must have shape ({B}, {H}, {N}, E) or ({B * H}, {N}, E), got {tuple(vals.shape)}")
        E = vals.shape[-1] if e is None else e
        if not 1 <= E <= vals.shape[-1] or _pow2(E) > MAX_TILE:
            raise ValueError(f"e must be in [1, {min(vals.shape[-1], MAX_TILE)}], got {E}")
        self.BD = _pow2(D)
        if self.BD > MAX_TILE:
            raise ValueError(f"head dim {D} is wider than one tile ({MAX_TILE})")
        self.BN, self.BMT, self.BE = chunk, _feature_tile(m, m_tile), _pow2(E)
        self.NT = triton.cdiv(m, self.BMT)
        self.MP = self.NT * self.BMT
        self.BH = B * H
        self.NC = max(1, triton.cdiv(N, chunk))
        want = min(
            self.NC,
            max(1, triton.cdiv(_tri._target_programs(x.device, SCAN_PROGRAMS_PER_SM), self.BH * self.NT)),
        )
        self.CPS = triton.cdiv(self.NC, want)
        self.P = triton.cdiv(self.NC, self.CPS)
        self.state_dtype = torch.float32 if feat_f32 else torch.bfloat16
        # int64 offsets where the states (per chunk, per segment) or the inputs reach 2³¹ elements.
        states = self.BH * (self.NC + self.P) * self.MP * self.BE
        self.i64 = max(states, _tri._extent(x), _tri._extent(vals)) >= 2**31
        self.reverse = reverse
        self.device = x.device
        interp = x.device.type == "cpu"
        scal = _scalars(scale, m)
        meta = {
            "BN": chunk, "BD": self.BD, "BE": self.BE, "BMT": self.BMT, "SOFTMAX": kernel_fn == "softmax",
            "QUERY": query, "HAS_MASK": has_mask and not query, "WEIGHTED": weighted, "REVERSE": reverse,
            "ONLINE": online, "FEAT_F32": feat_f32, "PREC": prec, "INTERP": interp, "I64": self.i64,
        }  # fmt: skip
        self.meta = meta
        self.online = online
        self.scan = _Launch(
            _scan_kernel, (self.NT, self.P, self.BH), 13,
            (N, D, E, m, H, *x.stride(), *sv, *mask_strides, *scal, self.CPS, self.NC, self.MP),
            meta, {"num_warps": SCAN_WARPS, "num_stages": SCAN_STAGES}, fast, trace,
        )  # fmt: skip
        self.segment = _Launch(
            _segment_scan_kernel, (self.NT, self.BH), 5, (self.P, self.MP, N, self.CPS * chunk),
            {"BMT": self.BMT, "BE": self.BE, "REVERSE": reverse, "RESCALE": kernel_fn == "softmax", "ONLINE": online,
             "I64": self.i64},
            {"num_warps": 4}, fast, trace,
        )  # fmt: skip

    def __call__(self, x, vals, omega, mask, stab, zw, mx) -> tuple[Tensor, ...]:
        BH, NC, P, MP, BE = self.BH, self.NC, self.P, self.MP, self.BE
        dev = self.device
        if self.meta["SOFTMAX"] and not self.online and mx is None:
            raise ValueError("a softmax scan needs mx, the causal key stabilizer (triton.py's _Cfg.key_max)")
        SL = torch.empty(BH, NC, MP, BE, device=dev, dtype=self.state_dtype)
        ZL = torch.empty(BH, NC, MP, device=dev, dtype=torch.float32)
        SG = torch.empty(BH, P, MP, BE, device=dev, dtype=torch.float32)
        ZG = torch.empty(BH, P, MP, device=dev, dtype=torch.float32)
        # Pointers never read (no mask, no stabilizer, no weights, relu's mx) are given x.
        mask = x if mask is None else mask
        stab = x if stab is None else stab
        zw = x if zw is None else zw
        mx = x if mx is None else mx
        if self.online:
            EL = torch.empty(BH, NC, self.NT, device=dev, dtype=torch.float32)
            EG = torch.empty(BH, P, self.NT, device=dev, dtype=torch.float32)
            _run(self, "scan", x, vals, omega, mask, stab, zw, SL, ZL, SG, ZG, mx, EL, EG)
            EX = torch.empty_like(EG)
            _run(self, "segment", SG, ZG, mx, EG, EX)
            return SL, ZL, SG, ZG, EL, EX
        _run(self, "scan", x, vals, omega, mask, stab, zw, SL, ZL, SG, ZG, mx, x, x)
        _run(self, "segment", SG, ZG, mx, x, x)
        return SL, ZL, SG, ZG


def _check_tiles(c: _Cfg, dtype: torch.dtype) -> None:
    """ValueError unless the chunk kernels' tiles hold the shapes of ``c``: the whole head dim in
    one tile and E ≤ MAX_TILE. E below D is not refused here (the kernel tests run such small
    shapes); the dispatch keeps it off these kernels through :func:`chunked_supports`."""
    if c.ND != 1 or c.BE > MAX_TILE:
        raise ValueError(
            f"the chunked kernels need the whole head dim in one tile and E <= {MAX_TILE}, got D={c.D}, "
            f"E={c.E} for {dtype} (see chunked_supports)"
        )


def _stages(feat_f32: bool, BE: int) -> int:
    """Software-pipelining depth of the chunk kernels' feature loop, whose loads (ω tile, state
    tiles SL/SG) are multi-buffered: 3 stages of bf16 tiles or 2 of fp32 ones stay near 100 KB of
    shared memory at BMT = 64, D = E = 64. Value dims padded below 64 get 1: on the H200 (triton
    3.6) the causal forward at chunk 64, tile 64 and 3 stages wrote garbage at D = E = 32 and
    faulted (illegal address) at D = 64, E = 32, while 1 stage, or other chunk/tile/warp settings,
    matched the reference."""
    if BE < 64:
        return 1
    return 2 if feat_f32 else 3


class ChunkedForwardPlan:
    """The launches of one forward call signature of the chunked kernels.

    Same constructor as triton.py's ``_ForwardPlan``: (q, k, v, omega, key_mask, kernel_fn,
    causal, scale, chunk_size, fast, trace), shapes as :func:`chunked_performer_attention`;
    called as ``plan(q, k, v, omega, mptr) -> out`` (B, H, N, E) in v's dtype, with mptr the bool
    key mask or, without one, q (never read). Causal: the key scan (:class:`ChunkScan`), then
    ``_fwd_chunk_kernel``. Non-causal: ``_key_pass_kernel`` and triton.py's reduce (the
    whole-sequence state), then the output pass: ``_out_pass_kernel`` where its tiles fit
    (``OUT_PERSIST``; ``out_pass`` is then its launch), else ``_fwd_chunk_kernel``.

    With ``stats=True`` (causal only) the call returns ``(out, stats)``: stats (B, H, R, N) fp32
    (:func:`stats_rows`) holds each query row's stabilizer mq and normalizer den, (softmax;
    unspecified for relu) the causal key stabilizer of each position and the intra-chunk scores,
    which :class:`.chunked_bwd.ChunkedBackwardPlan` takes instead of recomputing them.

    Raises:
        ValueError: as triton.py's ``_Cfg`` (kernel_fn, shapes, dtypes, chunk_size, key_mask), for
            shapes whose head dim is not one tile or whose E exceeds MAX_TILE (E below D is
            gated by :func:`chunked_supports` in the dispatch, not here), and stats=True with
            causal=False.
    """

    def __init__(
        self, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast: bool, trace: bool, stats: bool = False
    ):  # fmt: skip
        if stats and not causal:
            raise ValueError("stats=True needs causal=True: the non-causal backward recomputes on triton.py's kernels")
        c = self.cfg = _Cfg(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast, trace)
        _check_tiles(c, q.dtype)
        self.stats = stats
        BN = self.chunk = CHUNK if chunk_size is None else chunk_size
        BMT = _feature_tile(c.m, M_TILE)
        self.causal = causal
        if causal:
            # Softmax: the scan and the chunk kernel find the key stabilizer online (no pre-pass).
            self.scan = ChunkScan(
                k, v, omega, kernel_fn=kernel_fn, scale=scale, chunk=BN, m_tile=BMT, mask_strides=c.mask_strides,
                has_mask=key_mask is not None, online=c.softmax, feat_f32=c.feat_f32, prec=c.meta["PREC"], fast=fast,
                trace=trace,
            )  # fmt: skip
            NC, P, CPS, MP = self.scan.NC, self.scan.P, self.scan.CPS, self.scan.MP
        else:
            # The key pass in feature tiles of BMT rows (BMT divides the padded m, BM: both powers
            # of two, BMT clamped to BM), then the reduce over its segments.
            NCK = max(1, triton.cdiv(c.Nk, BN))
            NT = c.BM // BMT
            want = min(NCK, max(1, _tri._target_programs(q.device, KEY_PROGRAMS_PER_SM) // (c.BH * NT)))
            cps = triton.cdiv(NCK, want)
            self.P_state = triton.cdiv(NCK, cps)
            key_meta = {
                "BN": BN, "BD": c.BD, "BE": c.BE, "BMT": BMT, "SOFTMAX": c.softmax, "HAS_MASK": key_mask is not None,
                "EVEN_M": c.m == c.BM, "FEAT_F32": c.feat_f32, "PREC": c.meta["PREC"], "INTERP": c.interp, "I64": c.i64,
            }  # fmt: skip
            self.state = _Launch(
                _key_pass_kernel, (NT, self.P_state, c.BH), 7,
                (c.Nk, c.D, c.E, c.m, c.H, *k.stride(), *v.stride(), *c.mask_strides, *c.scal, cps, NCK, c.BM),
                key_meta, {"num_warps": SCAN_WARPS, "num_stages": 3}, fast, trace,
            )  # fmt: skip
            self.state_reduce = c.reduce_launch(self.P_state, 1 if c.softmax else 0, c.BM)
            NC = max(1, triton.cdiv(c.N, BN))
            P, CPS, MP = 1, NC, c.BM  # SL/ZL: the (BH, BM, BE) / (BH, BM) whole-sequence state
        self.out_shape = (c.B, c.H, c.N, c.E)
        meta = {
            "BN": BN, "BD": c.BD, "BE": c.BE, "BMT": BMT, "SOFTMAX": c.softmax, "CAUSAL": causal,
            "HAS_MASK": key_mask is not None, "WRITE_STATS": stats, "EVEN_M": c.m % BMT == 0, "FEAT_F32": c.feat_f32,
            "PREC": c.meta["PREC"], "INTERP": c.interp, "I64": c.i64,
        }  # fmt: skip
        # The non-causal output pass: _out_pass_kernel where the plan takes it, else _fwd_chunk_kernel.
        self.out_pass = None if causal else self._out_pass(q, BMT, NC, meta, fast, trace)
        self.fwd = None
        if self.out_pass is None:
            self.fwd = _Launch(
                _fwd_chunk_kernel, (NC, c.BH), 13,
                (c.N, c.D, c.E, c.m, c.H, *q.stride(), *k.stride(), *v.stride(), *c.mask_strides,
                 *_contiguous_strides(*self.out_shape), *c.scal, CPS, NC, P, MP),
                meta, {"num_warps": WARPS, "num_stages": _stages(c.feat_f32, c.BE)}, fast, trace,
            )  # fmt: skip

    def _out_pass(self, q, BMT: int, NC: int, meta: dict, fast: bool, trace: bool) -> _Launch | None:
        """The _out_pass_kernel launch of a non-causal plan, where OUT_PERSIST takes it (else None):
        the NC query chunks of each (batch, head) shared out among ~OUT_PROGRAMS_PER_SM programs an
        SM, the m features in NT tiles of BMT."""
        c = self.cfg
        NT = triton.cdiv(c.m, BMT)
        G = max(1, min(NC, _tri._target_programs(q.device, OUT_PROGRAMS_PER_SM) // c.BH))
        cpp = triton.cdiv(NC, G)
        persist = OUT_PERSIST
        if persist is None:
            persist = not c.feat_f32 and c.BD == 64 and c.BE <= 64 and cpp >= OUT_MIN_CHUNKS
        if not persist or NT > min(OUT_MAX_TILES, 4):  # (the kernel holds at most 4)
            return None
        out_meta = {k_: meta[k_] for k_ in ("BN", "BD", "BE", "BMT", "SOFTMAX", "EVEN_M", "FEAT_F32", "PREC", "INTERP", "I64")}
        return _Launch(
            _out_pass_kernel, (triton.cdiv(NC, cpp), c.BH), 5,
            (c.N, c.D, c.E, c.m, c.H, *q.stride(), *_contiguous_strides(*self.out_shape), *c.scal, cpp, NC, c.BM),
            {**out_meta, "NT": NT}, {"num_warps": OUT_WARPS, "num_stages": _stages(c.feat_f32, c.BE)}, fast, trace,
        )  # fmt: skip

    def __call__(self, q, k, v, omega, mask) -> Tensor | tuple[Tensor, Tensor]:
        if self.causal and self.scan.online:
            SL, ZL, SG, ZG, EL, EG = self.scan(k, v, omega, mask, None, None, None)
        elif self.causal:
            SL, ZL, SG, ZG = self.scan(k, v, omega, mask, None, None, None)
            EL = EG = ZL  # not read (relu)
        else:
            SL, ZL, _ = self.cfg.run_state(self, k, v, omega, mask, self.cfg.BM)
            SG = ZG = EL = EG = ZL  # not read
        out = torch.empty(self.out_shape, device=q.device, dtype=v.dtype)
        c = self.cfg
        if self.out_pass is not None:
            _run(self, "out_pass", q, omega, SL, ZL, out)
            return out
        stats = out
        if self.stats:
            rows = stats_rows(c.feat_f32, self.chunk)
            stats = torch.empty(c.B, c.H, rows, c.N, device=q.device, dtype=torch.float32)
        _run(self, "fwd", q, k, v, omega, mask, SL, ZL, SG, ZG, out, stats, EL, EG)
        return (out, stats) if self.stats else out


def chunked_performer_attention(
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
    """Performer attention output (B, H, N, E) in v's dtype through the chunked kernels; the
    contract of :func:`.reference.performer_attention` (q (B, H, N, D), k (B, H, Nk, D),
    v (B, H, Nk, E), omega (H, m, D), key_mask (B, Nk) or None).

    ``chunk_size`` (a power of two ≥ 16) overrides ``CHUNK``. Plans are cached with triton.py's
    (:func:`.triton.performer_attention` picks these kernels by its ``PATH``).

    Raises:
        ValueError: bad kernel_fn, shapes, dtypes or chunk_size (as :mod:`.triton`), or shapes
            that :func:`chunked_supports` rejects.
    """
    if not chunked_supports(q, v, omega):
        raise ValueError(
            f"the chunked kernels do not support head dim {q.shape[-1]} / value dim {v.shape[-1]} for {q.dtype} "
            "(see chunked_supports)"
        )
    return _tri._forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, True)
