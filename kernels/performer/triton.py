"""Triton kernels for Performer (FAVOR+) attention, forward and backward (math in README.md).

Same functions and signatures as :mod:`.reference` (``chunk_size`` defaults to a tuned value).

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

Shapes (``supports``): value dim E ≤ ``MAX_TILE`` = 128 and m ≤ ``MAX_FEATURES`` = 256 (padded
to powers of two; the m×E state and a whole row of features are held on chip), head dim
D ≤ ``MAX_HEAD_DIM`` = 512. A padded D ≤ 128 (≤ 64 for fp16/fp32 inputs, whose features are fp32,
sliced 32 columns wide past it) is held whole (one block, ``ND`` = 1); wider heads
(e.g. sinSRPE codes with R = 256) are cut into ``ND`` blocks of ``D_BLOCK`` = 64 columns: the
projection ω·x and ‖x‖² accumulate over the blocks, and dx = dφ·ω (− Σ(dφ·φ)·x) is formed and
stored block by block, so at most an m × 64 tile of ω is on chip at once.

Launches: the validated shapes, grids, scalars and constexprs of one call signature (shapes,
strides, dtypes, device, flags, scale, chunk and the module knobs) form a cached plan of
:class:`kernels._launch.Launch` objects; the first call of a plan goes through ``kernel[grid]``
(and falls back to ``num_stages=1`` on OutOfResources), later calls launch the compiled kernels
directly. Under tracing (FakeTensors inside ``torch.compile``) a fresh plan launches through
``torch.library.wrap_triton``, so Inductor sees the kernels.

Extra memory: the per-segment states (B·H·P·m·E fp32, P ≈ 4·SMs/(B·H)) and, for the causal
backward, G' (B·H·N·(E+1) fp32). Never N×N, never N×m.

Operands of the products: bf16 for bf16 inputs; fp32 (TF32 for fp16 inputs, full fp32 for fp32
ones) otherwise, because causal φ(k) can fall below fp16's range. Accumulation is fp32 throughout.

Causal softmax keys use their running max over earlier positions (README.md): here a pre-pass
(``_key_max_kernel``, ``_key_max_carry_kernel``; ``_Cfg.key_max``) computes it, states are kept
at the stabilizer of their last position and every factor between stabilizers is ≤ 1
(``_chunk_end``, ``_row_max``, ``_decay``). The chunked forward finds it online instead
(chunked.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .._launch import Launch as _Launch
from .._launch import compile_ahead as _compile_ahead
from .._launch import f32_bits as _f32_bits
from .._launch import f32_of
from .._launch import traced as _traced
from .reference import NO_KEY, RELU_EPS

# (chunk, warps) per kernel group: "fwd" (the key pass and the output pass) and "bwd" (the backward
# passes; a causal backward also runs its own key pass with it, so that both cut the sequence into
# the same segments). TUNED is the best of `python -m panther bench attention --sweep` on an H200
# (bf16, B=4, H=12, N=16384, d=64, m=256; docs/benchmarks.md) and serves bf16 with head and value
# dims ≤ 64 and m ≤ 256. Larger tiles (fp16/fp32 state, d ≥ 128, m > 256) use SAFE, whose settings
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
# Columns of ω and x per block where the padded head dim exceeds MAX_TILE. An m × 64 block of ω
# is no larger than the whole ω of a d = 64 head, the shape TUNED/SAFE were measured at.
D_BLOCK = 64
# The same for fp32 features (fp16/fp32 inputs): the widest padded head dim held whole, and the
# slice width past it. Their fp32 tiles double the shared memory: on the H200 (triton 3.6) the
# non-causal dq pass at D = 128 needed 233–344 KB whole or in 64-column slices (the limit is
# 227 KB), and ran in 32-column slices.
WHOLE_D_F32 = 64
D_BLOCK_F32 = 32
# Which kernels run a call. "auto": the chunk-parallel kernels of chunked.py (one program per
# chunk, features in tiles) for the non-causal output pass, and for causal calls of at most
# CHUNKED_MAX_N positions; the segment kernels here for the rest. "chunked" / "segments": those
# wherever they apply (chunked.py takes the whole head dim in one tile, chunked_supports; its
# backward is causal only). On the H200 (bf16, B=4, H=12, d=64, m=256) the chunked causal kernels
# took 0.30 ms forward and 0.90 ms backward at N = 4096, against 0.68 and 2.39 here. They keep an
# m×E state per chunk of 64, as many bytes as q, k, v and out together: past CHUNKED_MAX_N the
# segment kernels (states per segment only) hold peak memory near the inputs' size.
PATH = "auto"
CHUNKED_MAX_N = 16384
# Feature rows per program of the segment reduction (a power of two; clipped to the padded m).
REDUCE_ROWS = 32
# The causal softmax key stabilizer's pre-pass (_key_max_kernel): keys per program, feature rows
# per tile of ω (clipped to the padded m) and warps. H200, bf16, B = 4, H = 12, N = 4096, d = 64,
# m = 256, the two calls of a training step: (128, 64, 4) 51.2 µs; (64, 64, 4) 54.6,
# (64, 128, 4) 56.7, (128, 128, 8) 63.7, (64, 256, 4) 82.1, (32, 256, 4) 110.1. One forward call,
# with stages: (128, 64, 4) 24.9–25.5 µs at 2–3 stages, 28.0 at 1; (256, 64, 4 or 8) 27.3–27.8;
# (128, 32, 4) 27.6; (64, 64, 2) 35.2. Every setting sits at 25–28 µs (25 MB of keys, 6.4 GFLOP).
KEY_MAX_ROWS = 128
KEY_MAX_FEATURES = 64
KEY_MAX_WARPS = 4
KEY_MAX_STAGES = 2
# (The plans below are cached per call signature, these knobs included: changing any of them
# between calls takes effect at the next call.)

__all__ = [
    "MAX_FEATURES",
    "MAX_HEAD_DIM",
    "MAX_TILE",
    "performer_attention",
    "performer_attention_backward",
    "performer_attention_train",
    "supports",
]

# Widest padded value dim E (and widest head dim D held whole, without blocks): each program keeps
# an (m × E) fp32 state on chip, which past 128 overflows Hopper's 227 KB of shared memory at m = 256.
MAX_TILE = 128
# Widest padded head dim: wider ones are cut into ⌈D / D_BLOCK⌉ blocks, looped over in the kernels.
MAX_HEAD_DIM = 512
# Most (padded) random features: a whole row of m features is held per position.
MAX_FEATURES = 256


def supports(q: torch.Tensor, v: torch.Tensor, omega: torch.Tensor) -> bool:
    """Whether these kernels handle the shapes: padded head dim D ≤ MAX_HEAD_DIM, value dim
    E ≤ MAX_TILE, m ≤ MAX_FEATURES. Callers use the reference elsewhere."""
    return (
        _pow2(q.shape[-1]) <= MAX_HEAD_DIM and _pow2(v.shape[-1]) <= MAX_TILE and _pow2(omega.shape[-2]) <= MAX_FEATURES
    )


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
def _bh_id(axis: tl.constexpr, I64: tl.constexpr):
    """tl.program_id(axis), the (batch·head) index every offset is built from, as int64 when I64
    (``_Cfg.i64``: some buffer the kernels index reaches 2³¹ elements, e.g. the chunked scan's
    per-chunk states (B·H, N/C, m, E) from B·H = 512 at N = 16384, m = 256, E = 64, where int32
    offsets wrap). Only then: the int64 index and what derives from it cost registers, and the
    chunked dq kernel, at its register limit, took 8% longer with them (H200, docs/benchmarks.md)."""
    if I64:
        return tl.program_id(axis).to(tl.int64)
    else:
        return tl.program_id(axis)


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


def _scalars(scale: float, m: int) -> tuple[int, int, int, int]:
    """The four float scalars every kernel takes (√scale, log2 √m, 1/√m, RELU_EPS), as the fp32 bits
    ``_f32`` decodes."""
    return tuple(_f32_bits(v) for v in (math.sqrt(scale), 0.5 * math.log2(m), 1.0 / math.sqrt(m), RELU_EPS))


@triton.jit
def _f32(a, b, c, d):
    """The four float scalars a kernel takes as fp32 bits (``_launch.f32_bits``: Inductor would type
    Python floats fp64, and compile a binary of its own)."""
    return f32_of(a), f32_of(b), f32_of(c), f32_of(d)


@triton.jit
def _load_rows(base, rows, cols, n_rows, n_cols, s_row, s_col):
    """(len(rows), len(cols)) tile, zero outside [0, n_rows) × [0, n_cols)."""
    return tl.load(
        base + rows[:, None] * s_row + cols[None, :] * s_col,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _load_omega(W, h, D, M, d0, BD: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr):
    """Columns [d0, d0 + BD) of head h's ω (BM, BD) in DT, zero outside (M, D): every feature row."""
    return _omega_rows(W, h, D, M, 0, d0, BD, BM, DT, INTERP)


@triton.jit
def _omega0(W, h, D, M, BD: tl.constexpr, BM: tl.constexpr, ND: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr):
    """ω whole (BM, BD) when it is one block (ND = 1); else a placeholder (_proj and _store_dx then
    load ω block by block)."""
    if ND == 1:
        w = _load_omega(W, h, D, M, 0, BD, BM, DT, INTERP)
    else:
        w = 0.0
    return w


@triton.jit
def _proj(
    Xb, rows, n_rows, s_row, s_col, w, W, h, D, M,
    BD: tl.constexpr, BM: tl.constexpr, ND: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """ω·x (BN, BM) fp32 (the unscaled projection) and ‖x‖² (BN,) fp32 for the given rows of X,
    and the x tile (BN, BD). ND = 1: one tile of x against w, ω whole. ND > 1: summed over ND blocks
    of BD columns, each block of x and of ω loaded here (the x returned is the first block)."""
    offs_d = tl.arange(0, BD)
    x = _load_rows(Xb, rows, offs_d, n_rows, D, s_row, s_col)
    if ND == 1:
        proj = _dot(x, tl.trans(w), PREC, INTERP)
    else:
        proj = _dot(x, tl.trans(_load_omega(W, h, D, M, 0, BD, BM, DT, INTERP)), PREC, INTERP)
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1)
    # A loop (not unrolled): ω's blocks are then not loop-invariant loads of the caller's chunk
    # loop, which the compiler would hoist out of it and keep on chip all together.
    for j in range(1, ND):
        xj = _load_rows(Xb, rows, j * BD + offs_d, n_rows, D, s_row, s_col)
        proj += _dot(xj, tl.trans(_load_omega(W, h, D, M, j * BD, BD, BM, DT, INTERP)), PREC, INTERP)
        xf = xj.to(tl.float32)
        sq += tl.sum(xf * xf, 1)
    return proj, sq, x


@triton.jit
def _logits(proj, sq, rs):
    """(ω·xs − ‖xs‖²/2)·log2(e) of shape (BN, BM) from the unscaled ω·x and ‖x‖²."""
    half = (0.5 * rs * rs * 1.4426950408889634) * sq
    return proj * (rs * 1.4426950408889634) - half[:, None]


@triton.jit
def _phi_query(proj, sq, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX: tl.constexpr):
    """φ(q) (BN, BM) fp32, zero on padded features."""
    if SOFTMAX:
        lg = _logits(proj, sq, rs)
        lg = tl.where(fvalid[None, :], lg, float("-inf"))
        mx = tl.max(lg, 1)
        phi = tl.exp2(lg - (mx + log2_sqrt_m)[:, None])
    else:
        phi = tl.where(fvalid[None, :], tl.maximum(proj * rs, 0.0) * inv_sqrt_m + eps, 0.0)
    return phi


@triton.jit
def _phi_key(proj, sq, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX: tl.constexpr):
    """φ(k) (BN, BM) fp32 with a given stabilizer c2 (log2 units, includes log2 √m): a scalar, or
    (BN, 1) for one per key (the causal running max); zero on masked or padded keys and padded
    features."""
    valid = rvalid[:, None] & fvalid[None, :]
    if SOFTMAX:
        # (masked before exp2: a masked key's logit minus the stabilizer NO_KEY would overflow)
        phi = tl.exp2(tl.where(valid, _logits(proj, sq, rs) - c2, float("-inf")))
    else:
        phi = tl.where(valid, tl.maximum(proj * rs, 0.0) * inv_sqrt_m + eps, 0.0)
    return phi


@triton.jit
def _dphi_t(dphi, phi, proj, rvalid, inv_sqrt_m, SOFTMAX: tl.constexpr):
    """The (BN, BM) factor t of dxs = t·ω (− Σt·xs): softmax t = dφ·φ, relu t = dφ·1[ω·xs>0]/√m."""
    if SOFTMAX:
        t = dphi * phi
    else:
        t = tl.where(rvalid[:, None] & (proj > 0), dphi * inv_sqrt_m, 0.0)
    return t


@triton.jit
def _dx_block(t, tsum, x, w, rs, SOFTMAX: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """Columns of dx (BN, BD) fp32 for the matching columns x of the input and w of ω:
    softmax dxs = t·ω − Σt·xs (tsum = Σt over features), relu dxs = t·ω; dx = dxs·√scale."""
    if SOFTMAX:
        dxs = _mm(t, w, FEAT_F32, PREC, INTERP) - (tsum * rs)[:, None] * x.to(tl.float32)
    else:
        dxs = _mm(t, w, FEAT_F32, PREC, INTERP)
    return dxs * rs


@triton.jit
def _store_dx(
    DX, rows, valid, t, x, w, Xb, n_rows, s_row, s_col, W, h, D, M, rs,
    BD: tl.constexpr, BM: tl.constexpr, ND: tl.constexpr, DT: tl.constexpr,
    SOFTMAX: tl.constexpr, FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
):
    """dx of the given rows from t (see _dphi_t) into DX (rows of D, contiguous), valid rows only.
    ND = 1: from the tiles x and ω (w) the projection used; else block by block, reloading them."""
    offs_d = tl.arange(0, BD)
    tsum = tl.sum(t, 1)
    if ND == 1:
        dx = _dx_block(t, tsum, x, w, rs, SOFTMAX, FEAT_F32, PREC, INTERP)
        tl.store(
            DX + rows[:, None] * D + offs_d[None, :],
            _cast(dx, DX.dtype.element_ty, INTERP),
            mask=valid[:, None] & (offs_d[None, :] < D),
        )
    else:
        for j in range(ND):  # a loop, as in _proj
            cols = j * BD + offs_d
            xj = _load_rows(Xb, rows, cols, n_rows, D, s_row, s_col)
            wj = _load_omega(W, h, D, M, j * BD, BD, BM, DT, INTERP)
            dx = _dx_block(t, tsum, xj, wj, rs, SOFTMAX, FEAT_F32, PREC, INTERP)
            tl.store(
                DX + rows[:, None] * D + cols[None, :],
                _cast(dx, DX.dtype.element_ty, INTERP),
                mask=valid[:, None] & (cols[None, :] < D),
            )


@triton.jit
def _chunk_end(MX, bh, N, c, BN):
    """The causal key stabilizer E at the last position of chunk c (positions [c·BN, (c+1)·BN)
    clipped to N): the largest in the chunk, the running max being nondecreasing. c = −1 gives the
    first position's (no state is at that scale; any value ≤ every later one serves). MX (BH, N)."""
    p = tl.maximum(tl.minimum((c + 1) * BN, N) - 1, 0)
    return tl.load(MX + bh * N + p)


@triton.jit
def _row_max(MX, bh, rows, N):
    """The causal key stabilizer of the given positions (BN,), fp32; rows ≥ N read position N − 1's
    (the largest: those rows are masked out, and every factor stays finite)."""
    return tl.load(MX + bh * N + tl.minimum(rows, N - 1))


@triton.jit
def _decay(lo, hi):
    """exp2(lo − hi) clipped to ≤ 1: the factor that takes a term from one stabilizer to another
    no smaller. Broadcasting (lo[:, None], hi[None, :]) gives the intra-chunk factors."""
    return tl.exp2(tl.minimum(lo - hi, 0.0))


@triton.jit
def _omega_rows(W, h, D, M, m0, d0, BD: tl.constexpr, BMT: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr):
    """Rows [m0, m0 + BMT) and columns [d0, d0 + BD) of head h's ω (contiguous (H, M, D)) in DT,
    zero outside (M, D)."""
    offs_m = m0 + tl.arange(0, BMT)
    offs_d = d0 + tl.arange(0, BD)
    w = tl.load(
        W + h * M * D + offs_m[:, None] * D + offs_d[None, :],
        mask=(offs_m[:, None] < M) & (offs_d[None, :] < D),
        other=0.0,
    )
    return _cast(w, DT, INTERP)


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _key_max_kernel(
    K, W, MASK, OUT, CM, N, D, M, H, NCK, skb, skh, skn, skd, smb, smn, rs, log2_sqrt_m,
    BN: tl.constexpr, BD: tl.constexpr, BMT: tl.constexpr, ND: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Grid (NCK = ⌈N / BN⌉, B·H), first half of the causal softmax key stabilizer
    (:meth:`_Cfg.key_max`): each key's largest logit over the M features,
    (ω·ks − ‖ks‖²/2)·log2(e) + log2 √m (−inf for a masked key), its running max within the
    program's chunk of BN keys into OUT (B·H, N) fp32, and the chunk's max into CM (B·H, NCK).
    ω is read in tiles of BMT rows and, for wide heads (ND > 1), BD columns, as the kernels that
    use the stabilizer read it."""
    c = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs = f32_of(rs)
    log2_sqrt_m = f32_of(log2_sqrt_m)
    b = bh // H
    h = bh % H
    DT = K.dtype.element_ty
    Kb = K + b * skb + h * skh
    rows = c * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    x = _load_rows(Kb, rows, offs_d, N, D, skn, skd)
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1)
    for j in range(1, ND):
        xf = _load_rows(Kb, rows, j * BD + offs_d, N, D, skn, skd).to(tl.float32)
        sq += tl.sum(xf * xf, 1)
    half = (0.5 * rs * rs * 1.4426950408889634) * sq
    a2 = rs * 1.4426950408889634
    mx = tl.full((BN,), float("-inf"), tl.float32)
    for m0 in range(0, M, BMT):
        offs_m = m0 + tl.arange(0, BMT)
        proj = _dot(x, tl.trans(_omega_rows(W, h, D, M, m0, 0, BD, BMT, DT, INTERP)), PREC, INTERP)
        for j in range(1, ND):
            xj = _load_rows(Kb, rows, j * BD + offs_d, N, D, skn, skd)
            proj += _dot(xj, tl.trans(_omega_rows(W, h, D, M, m0, j * BD, BD, BMT, DT, INTERP)), PREC, INTERP)
        lg = tl.where((offs_m < M)[None, :], proj * a2 - half[:, None], float("-inf"))
        mx = tl.maximum(mx, tl.max(lg, 1))
    valid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
    r = tl.where(valid, mx + log2_sqrt_m, float("-inf"))
    tl.store(OUT + bh * N + rows, tl.associative_scan(r, 0, _max2), mask=rows < N)
    tl.store(CM + bh * NCK + c, tl.max(r, 0))


@triton.jit
def _key_max_carry_kernel(OUT, CM, N, NCK, floor, BN: tl.constexpr, BC: tl.constexpr):
    """Grid (NCK, B·H), second half: chunk c's running maxima (OUT, in place) raised to the max
    of the earlier chunks (CM, read BC at a time), and floored at ``floor`` (NO_KEY: finite
    where no key is visible yet)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)  # (its buffers are (B·H, N) and (B·H, NCK): int32 offsets suffice)
    prev = tl.full((BC,), float("-inf"), tl.float32)
    for c0 in range(0, c, BC):
        offs = c0 + tl.arange(0, BC)
        prev = tl.maximum(prev, tl.load(CM + bh * NCK + offs, mask=offs < c, other=float("-inf")))
    rows = c * BN + tl.arange(0, BN)
    run = tl.load(OUT + bh * N + rows, mask=rows < N, other=float("-inf"))
    run = tl.maximum(tl.maximum(run, tl.max(prev, 0)), f32_of(floor))
    tl.store(OUT + bh * N + rows, run, mask=rows < N)


@triton.jit
def _inv_den(den):
    """1/den for the backward's G' = [g/den, −Σ g·out/den]: 1 where den = 0 (no visible key), and 0
    where 0 < den < DEN_MIN (reference.py): such a query's 1/den would overflow the backward's
    fp32 sums (inf, then inf·0 = NaN), so it passes no gradient."""
    return tl.where(den == 0.0, 1.0, tl.where(den < 1e-30, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den)))


@triton.jit
def _key_valid(MASK, b, rows, Nk, smb, smn, HAS_MASK: tl.constexpr):
    rvalid = rows < Nk
    if HAS_MASK:
        km = tl.load(MASK + b * smb + rows * smn, mask=rvalid, other=0)
        rvalid = rvalid & (km != 0)
    return rvalid


# ---------------------------------------------------------------------------------------------
# kernels (grid: (segments, B·H); program (s, bh) walks chunks [s·CPS, (s+1)·CPS) )
# BD: columns of a head-dim block, ND: blocks (ND = 1: the whole padded head dim)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _state_kernel(
    K, V, W, MASK, MX, S_OUT, Z_OUT, C_OUT,
    Nk, D, E, M, H,
    skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, ND: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    nseg = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    DT = K.dtype.element_ty
    S = tl.zeros((BM, BE), tl.float32)
    z = tl.zeros((BM,), tl.float32)
    run = tl.max(tl.full((BN,), -1e30, tl.float32), 0)  # running max (log2 units), non-causal softmax
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(Nk, BN))
    c2 = 0.0
    if SOFTMAX and CAUSAL:
        # The segment's total at the stabilizer of its last position: only later queries read it,
        # and their running max is no smaller, so no key lost to underflow here mattered to them.
        c2 = _chunk_end(MX, bh, Nk, c_end - 1, BN)
    for ci in range(c_start, c_end):
        w = _omega0(W, h, D, M, BD, BM, ND, DT, INTERP)
        rows = ci * BN + offs_n
        rvalid = _key_valid(MASK, b, rows, Nk, smb, smn, HAS_MASK)
        vt = _load_rows(Vb, rows, offs_e, Nk, E, svn, sve)
        proj, sq, _ = _proj(Kb, rows, Nk, skn, skd, w, W, h, D, M, BD, BM, ND, DT, PREC, INTERP)
        if SOFTMAX and not CAUSAL:
            lg = _logits(proj, sq, rs)
            lg = tl.where(rvalid[:, None] & fvalid[None, :], lg, float("-inf"))
            new = tl.maximum(run, tl.max(lg))
            alpha = tl.exp2(run - new)
            S = S * alpha
            z = z * alpha
            run = new
            phi = tl.exp2(lg - (new + log2_sqrt_m))
        else:
            phi = _phi_key(proj, sq, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX)
        S += _mm(tl.trans(phi), vt, FEAT_F32, PREC, INTERP)
        z += tl.sum(phi, 0)
    out = bh * nseg + seg
    tl.store(S_OUT + out * BM * BE + offs_m[:, None] * BE + offs_e[None, :], S)
    tl.store(Z_OUT + out * BM + offs_m, z)
    if SOFTMAX and not CAUSAL:
        tl.store(C_OUT + out, run)


@triton.jit
def _fwd_kernel(
    Q, K, V, W, MASK, MX, S_IN, Z_IN, O,
    N, D, E, M, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    sob, soh, son, soe,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, ND: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    Ob = O + b * sob + h * soh
    DT = Q.dtype.element_ty
    tile = offs_m[:, None] * BE + offs_e[None, :]
    # The whole-sequence state (non-causal; bf16 for bf16 inputs) or, carried from chunk to chunk,
    # this segment's exclusive prefix (causal; fp32).
    st = bh * tl.num_programs(0) + seg if CAUSAL else bh
    S = tl.load(S_IN + st * BM * BE + tile)
    z = tl.load(Z_IN + st * BM + offs_m)
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(N, BN))
    # Causal softmax: S, z are at the stabilizer ecur of the position before the chunk (the
    # segment's exclusive prefix: the one before the segment).
    ecur = 0.0
    if SOFTMAX and CAUSAL:
        ecur = _chunk_end(MX, bh, N, c_start - 1, BN)
    for ci in range(c_start, c_end):
        w = _omega0(W, h, D, M, BD, BM, ND, DT, INTERP)
        rows = ci * BN + offs_n
        projq, sqq, _ = _proj(Qb, rows, N, sqn, sqd, w, W, h, D, M, BD, BM, ND, DT, PREC, INTERP)
        phq = _phi_query(projq, sqq, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX)
        num = _mm(phq, S, FEAT_F32, PREC, INTERP)
        den = tl.sum(phq * z[None, :], 1)
        if CAUSAL:
            rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
            projk, sqk, _ = _proj(Kb, rows, N, skn, skd, w, W, h, D, M, BD, BM, ND, DT, PREC, INTERP)
            vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)
            lower = offs_n[:, None] >= offs_n[None, :]
            if SOFTMAX:
                mrow = _row_max(MX, bh, rows, N)
                ec = _chunk_end(MX, bh, N, ci, BN)
                fq = _decay(ecur, mrow)
                num = num * fq[:, None]
                den = den * fq
                phk = _phi_key(projk, sqk, fvalid, rvalid, mrow[:, None], rs, inv_sqrt_m, eps, SOFTMAX)
                sc = _mm(phq, tl.trans(phk), FEAT_F32, PREC, INTERP)
                sc = tl.where(lower, sc * _decay(mrow[None, :], mrow[:, None]), 0.0)
                # The state moves to this chunk's last stabilizer ec.
                fk = _decay(mrow, ec)
                S = S * _decay(ecur, ec) + _mm(tl.trans(phk), vt * fk[:, None], FEAT_F32, PREC, INTERP)
                z = z * _decay(ecur, ec) + tl.sum(phk * fk[:, None], 0)
                ecur = ec
            else:
                phk = _phi_key(projk, sqk, fvalid, rvalid, 0.0, rs, inv_sqrt_m, eps, SOFTMAX)
                sc = tl.where(lower, _mm(phq, tl.trans(phk), FEAT_F32, PREC, INTERP), 0.0)
                S += _mm(tl.trans(phk), vt, FEAT_F32, PREC, INTERP)
                z += tl.sum(phk, 0)
            num += _mm(sc, vt, FEAT_F32, PREC, INTERP)
            den += tl.sum(sc, 1)
        out = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(
            Ob + rows[:, None] * son + offs_e[None, :] * soe,
            _cast(out, O.dtype.element_ty, INTERP),
            mask=(rows[:, None] < N) & (offs_e[None, :] < E),
        )


@triton.jit
def _bwd_q_kernel(
    G, Q, K, V, W, MASK, MX, S_IN, Z_IN, DQ, R_OUT, RZ_OUT, GS, GD,
    N, D, E, M, H,
    sgb, sgh, sgn, sge, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, ND: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    nseg = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Gb = G + b * sgb + h * sgh
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    DT = Q.dtype.element_ty
    tile = offs_m[:, None] * BE + offs_e[None, :]
    st = bh * nseg + seg if CAUSAL else bh  # as in _fwd_kernel
    S = tl.load(S_IN + st * BM * BE + tile)
    z = tl.load(Z_IN + st * BM + offs_m)
    R = tl.zeros((BM, BE), tl.float32)  # Σ φ(q)ᵀ g/den over this segment
    rz = tl.zeros((BM,), tl.float32)  # Σ φ(q)ᵀ gden
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(N, BN))
    # Causal softmax: S, z at ecur as in _fwd_kernel; R, rz summed at the stabilizer eb of the
    # position before the segment (the later segments' keys read them from there).
    ecur = 0.0
    eb = 0.0
    if SOFTMAX and CAUSAL:
        ecur = _chunk_end(MX, bh, N, c_start - 1, BN)
        eb = ecur
    for ci in range(c_start, c_end):
        w = _omega0(W, h, D, M, BD, BM, ND, DT, INTERP)
        rows = ci * BN + offs_n
        projq, sqq, x = _proj(Qb, rows, N, sqn, sqd, w, W, h, D, M, BD, BM, ND, DT, PREC, INTERP)
        phq = _phi_query(projq, sqq, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX)
        num = _mm(phq, S, FEAT_F32, PREC, INTERP)
        den = tl.sum(phq * z[None, :], 1)
        fq = tl.zeros((BN,), tl.float32) + 1.0
        if CAUSAL:
            rvalid = _key_valid(MASK, b, rows, N, smb, smn, HAS_MASK)
            projk, sqk, _ = _proj(Kb, rows, N, skn, skd, w, W, h, D, M, BD, BM, ND, DT, PREC, INTERP)
            vt = _load_rows(Vb, rows, offs_e, N, E, svn, sve)
            lower = offs_n[:, None] >= offs_n[None, :]
            if SOFTMAX:
                mrow = _row_max(MX, bh, rows, N)
                fq = _decay(ecur, mrow)
                num = num * fq[:, None]
                den = den * fq
                intra = _decay(mrow[None, :], mrow[:, None])
                phk = _phi_key(projk, sqk, fvalid, rvalid, mrow[:, None], rs, inv_sqrt_m, eps, SOFTMAX)
                sc = tl.where(lower, _mm(phq, tl.trans(phk), FEAT_F32, PREC, INTERP) * intra, 0.0)
            else:
                phk = _phi_key(projk, sqk, fvalid, rvalid, 0.0, rs, inv_sqrt_m, eps, SOFTMAX)
                sc = tl.where(lower, _mm(phq, tl.trans(phk), FEAT_F32, PREC, INTERP), 0.0)
            num += _mm(sc, vt, FEAT_F32, PREC, INTERP)
            den += tl.sum(sc, 1)
        inv = _inv_den(den)
        g = _load_rows(Gb, rows, offs_e, N, E, sgn, sge).to(tl.float32)
        gs = g * inv[:, None]
        gd = -tl.sum(gs * num, 1) * inv  # −Σ g·out / den
        # dφ(q) = G'·[S; z]ᵀ (+ intra-chunk (G'·V'ᵀ masked)·φ(k)); causal softmax: each term at
        # the query's own stabilizer (fq on the state's, the intra-chunk factors on the chunk's).
        dphi = _mm(gs * fq[:, None], tl.trans(S), FEAT_F32, PREC, INTERP) + (gd * fq)[:, None] * z[None, :]
        if CAUSAL:
            p = _mm(gs, tl.trans(vt), FEAT_F32, PREC, INTERP) + gd[:, None]
            if SOFTMAX:
                p = tl.where(lower, p * intra, 0.0)
                ec = _chunk_end(MX, bh, N, ci, BN)
                fk = _decay(mrow, ec)
                S = S * _decay(ecur, ec) + _mm(tl.trans(phk), vt * fk[:, None], FEAT_F32, PREC, INTERP)
                z = z * _decay(ecur, ec) + tl.sum(phk * fk[:, None], 0)
                ecur = ec
            else:
                p = tl.where(lower, p, 0.0)
                S += _mm(tl.trans(phk), vt, FEAT_F32, PREC, INTERP)
                z += tl.sum(phk, 0)
            dphi += _mm(p, phk, FEAT_F32, PREC, INTERP)
            tl.store(GS + bh * N * BE + rows[:, None] * BE + offs_e[None, :], gs, mask=rows[:, None] < N)
            tl.store(GD + bh * N + rows, gd, mask=rows < N)
        qvalid = rows < N
        t = _dphi_t(dphi, phq, projq, qvalid, inv_sqrt_m, SOFTMAX)
        _store_dx(
            DQ + bh * N * D, rows, qvalid, t, x, w, Qb, N, sqn, sqd, W, h, D, M, rs,
            BD, BM, ND, DT, SOFTMAX, FEAT_F32, PREC, INTERP,
        )  # fmt: skip
        if SOFTMAX and CAUSAL:
            phq = phq * _decay(eb, mrow)[:, None]
        phq = tl.where(qvalid[:, None], phq, 0.0)
        R += _mm(tl.trans(phq), gs, FEAT_F32, PREC, INTERP)
        rz += tl.sum(phq * gd[:, None], 0)
    out = bh * nseg + seg
    tl.store(R_OUT + out * BM * BE + offs_m[:, None] * BE + offs_e[None, :], R)
    tl.store(RZ_OUT + out * BM + offs_m, rz)


@triton.jit
def _bwd_k_kernel(
    Q, K, V, W, MASK, MX, CK, R_IN, RZ_IN, GS, GD, DK, DV,
    N, Nk, D, E, M, H,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, ND: tl.constexpr,
    SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    FEAT_F32: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):
    seg = tl.program_id(0)
    bh = _bh_id(1, I64)
    rs, log2_sqrt_m, inv_sqrt_m, eps = _f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    nseg = tl.num_programs(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    offs_m = tl.arange(0, BM)
    fvalid = offs_m < M
    Qb = Q + b * sqb + h * sqh
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    DT = K.dtype.element_ty
    tile = offs_m[:, None] * BE + offs_e[None, :]
    # R = Σ φ(q)ᵀG' over the queries that see these keys: all (non-causal; bf16 for bf16 inputs),
    # or, carried backward from chunk to chunk, the later segments' (causal; fp32).
    st = bh * nseg + seg if CAUSAL else bh
    R = tl.load(R_IN + st * BM * BE + tile)
    rz = tl.load(RZ_IN + st * BM + offs_m)
    c_start = seg * CPS
    c_end = tl.minimum(c_start + CPS, tl.cdiv(Nk, BN))
    c2 = 0.0
    rcur = 0.0
    if SOFTMAX:
        if CAUSAL:
            # R, rz (the later segments' suffix) are at the stabilizer of the segment's last
            # position, and move back one chunk at a time.
            rcur = _chunk_end(MX, bh, N, c_end - 1, BN)
        else:
            c2 = tl.load(CK + bh)  # the global key max of the forward pass
    for i in range(c_start, c_end):
        ci = c_end - 1 - (i - c_start) if CAUSAL else i  # causal: walk the chunks backward
        w = _omega0(W, h, D, M, BD, BM, ND, DT, INTERP)
        rows = ci * BN + offs_n
        rvalid = _key_valid(MASK, b, rows, Nk, smb, smn, HAS_MASK)
        projk, sqk, x = _proj(Kb, rows, Nk, skn, skd, w, W, h, D, M, BD, BM, ND, DT, PREC, INTERP)
        vt = _load_rows(Vb, rows, offs_e, Nk, E, svn, sve)
        if SOFTMAX and CAUSAL:
            mrow = _row_max(MX, bh, rows, N)
            phk = _phi_key(projk, sqk, fvalid, rvalid, mrow[:, None], rs, inv_sqrt_m, eps, SOFTMAX)
            # Key j reads R at the chunk's stabilizer rcur: exp2(Mⱼ − rcur) takes it to its own.
            fk = _decay(mrow, rcur)
            dphi = _mm(vt * fk[:, None], tl.trans(R), FEAT_F32, PREC, INTERP) + fk[:, None] * rz[None, :]
            dv = _mm(phk, R, FEAT_F32, PREC, INTERP) * fk[:, None]
        else:
            phk = _phi_key(projk, sqk, fvalid, rvalid, c2, rs, inv_sqrt_m, eps, SOFTMAX)
            dphi = _mm(vt, tl.trans(R), FEAT_F32, PREC, INTERP) + rz[None, :]
            dv = _mm(phk, R, FEAT_F32, PREC, INTERP)
        if CAUSAL:
            projq, sqq, _ = _proj(Qb, rows, N, sqn, sqd, w, W, h, D, M, BD, BM, ND, DT, PREC, INTERP)
            phq = _phi_query(projq, sqq, fvalid, rs, log2_sqrt_m, inv_sqrt_m, eps, SOFTMAX)
            gs = tl.load(GS + bh * N * BE + rows[:, None] * BE + offs_e[None, :], mask=rows[:, None] < N, other=0.0)
            gd = tl.load(GD + bh * N + rows, mask=rows < N, other=0.0)
            upper = offs_n[:, None] <= offs_n[None, :]  # (key j, query i): i ≥ j
            if SOFTMAX:
                intra = _decay(mrow[:, None], mrow[None, :])
            else:
                intra = 1.0
            p = _mm(vt, tl.trans(gs), FEAT_F32, PREC, INTERP) + gd[None, :]
            dphi += _mm(tl.where(upper, p * intra, 0.0), phq, FEAT_F32, PREC, INTERP)
            sc = _mm(phk, tl.trans(phq), FEAT_F32, PREC, INTERP)
            dv += _mm(tl.where(upper, sc * intra, 0.0), gs, FEAT_F32, PREC, INTERP)
            if SOFTMAX:
                # R moves back to the stabilizer before this chunk; its queries join it there.
                eb = _chunk_end(MX, bh, N, ci - 1, BN)
                R = R * _decay(eb, rcur)
                rz = rz * _decay(eb, rcur)
                phq = phq * _decay(eb, mrow)[:, None]
                rcur = eb
            R += _mm(tl.trans(phq), gs, FEAT_F32, PREC, INTERP)
            rz += tl.sum(phq * gd[:, None], 0)
        t = _dphi_t(dphi, phk, projk, rvalid, inv_sqrt_m, SOFTMAX)
        kvalid = rows < Nk
        _store_dx(
            DK + bh * Nk * D, rows, kvalid, t, x, w, Kb, Nk, skn, skd, W, h, D, M, rs,
            BD, BM, ND, DT, SOFTMAX, FEAT_F32, PREC, INTERP,
        )  # fmt: skip
        tl.store(
            DV + bh * Nk * E + rows[:, None] * E + offs_e[None, :],
            _cast(dv, DV.dtype.element_ty, INTERP),
            mask=kvalid[:, None] & (offs_e[None, :] < E),
        )


@triton.jit
def _reduce_kernel(
    S, Z, C, S_OUT, Z_OUT, C_OUT, MX, P, NTC, RPC, log2_sqrt_m, N, L,
    BM: tl.constexpr, BE: tl.constexpr, RT: tl.constexpr, BPT: tl.constexpr, BNT: tl.constexpr, MODE: tl.constexpr,
    RESCALE: tl.constexpr, INTERP: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Combine the P segment states (S, z) of one (batch, head), grid (B·H, BM / RT): each program
    owns RT feature rows (a whole-BM tile per (batch, head) left most SMs idle: 12.6 µs per call
    at B·H = 48 on the H200).
    MODE 0: sum; 1: sum rescaled to the largest stabilizer C (also written, as the key stabilizer
    with log2 √m folded in, by the first row block); 2/3: exclusive prefix / suffix sums, in place.
    Modes 0/1 write S in S_OUT's dtype (bf16 for bf16 inputs: the operand dtype of its products).
    C (B·H, P, NTC): one stabilizer per segment and block of RPC feature rows (NTC = 1, RPC = BM:
    one per segment; BNT = NTC padded to a power of two), read BPT segments at a time.
    RESCALE (modes 2/3, causal softmax): segment s, positions [s·L, (s+1)·L) of N, is summed at the
    key stabilizer MX (B·H, N) of its last position (mode 2: the keys' totals) or of the position
    before it (mode 3: the queries' R); the running sum moves between them by exp2(Eb − Ee) ≤ 1."""
    bh = _bh_id(0, I64)
    offs_m = tl.program_id(1) * RT + tl.arange(0, RT)
    tile = offs_m[:, None] * BE + tl.arange(0, BE)[None, :]
    cmax = 0.0
    if MODE == 1:
        offs_t = tl.arange(0, BNT)
        cm = tl.full((BNT,), -1e30, tl.float32)
        for p0 in range(0, P, BPT):
            offs_p = p0 + tl.arange(0, BPT)
            cs = tl.load(
                C + (bh * P + offs_p[:, None]) * NTC + offs_t[None, :],
                mask=(offs_p[:, None] < P) & (offs_t[None, :] < NTC),
                other=-1e30,
            )
            cm = tl.maximum(cm, tl.max(cs, 0))
        cmax = tl.max(cm, 0)
        cmax = tl.where(cmax > -1e29, cmax, 0.0)  # every key masked: c = 0
    acc = tl.zeros((RT, BE), tl.float32)
    accz = tl.zeros((RT,), tl.float32)
    for i in range(P):
        p = bh * P + (P - 1 - i if MODE == 3 else i)
        s = tl.load(S + p * BM * BE + tile)
        z = tl.load(Z + p * BM + offs_m)
        if MODE >= 2:
            tl.store(S + p * BM * BE + tile, acc)
            tl.store(Z + p * BM + offs_m, accz)
            if RESCALE:
                sg = p - bh * P
                f = _decay(_chunk_end(MX, bh, N, sg - 1, L), _chunk_end(MX, bh, N, sg, L))
                acc = acc * f
                accz = accz * f
        if MODE == 1:
            wgt = tl.exp2(tl.load(C + p * NTC + offs_m // RPC) - cmax)
            s = s * wgt[:, None]
            z = z * wgt
        acc += s
        accz += z
    if MODE < 2:
        tl.store(S_OUT + bh * BM * BE + tile, _cast(acc, S_OUT.dtype.element_ty, INTERP))
        tl.store(Z_OUT + bh * BM + offs_m, accz)
    if MODE == 1 and tl.program_id(1) == 0:
        tl.store(C_OUT + bh, cmax + f32_of(log2_sqrt_m))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device, per_sm: int | None = None) -> int:
    """Programs to aim for per launch: per_sm (default PROGRAMS_PER_SM) times the SM count; a
    fixed INTERPRETER_PROGRAMS off the GPU."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return (PROGRAMS_PER_SM if per_sm is None else per_sm) * _SM_COUNT[idx]


def _segments(n: int, bn: int, bh: int, device: torch.device) -> tuple[int, int]:
    """(segments, chunks per segment) for n positions in chunks of bn, over bh (batch, head)s."""
    chunks = max(1, triton.cdiv(n, bn))
    want = min(chunks, max(1, triton.cdiv(_target_programs(device), bh)))
    cps = triton.cdiv(chunks, want)
    return triton.cdiv(chunks, cps), cps


def _extent(t: Tensor) -> int:
    """Elements from t's first to its last, as its strides lay them out."""
    return 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride()))


def _contiguous_strides(*shape: int) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _bool_mask(key_mask: Tensor | None) -> Tensor | None:
    return key_mask if key_mask is None or key_mask.dtype == torch.bool else key_mask != 0


def _run(plan, name: str, *tensors: Tensor) -> None:
    """Call the plan's launch ``name``. A first call that finds the kernel's shared memory over the
    device's limit (a shape the num_stages heuristic misjudged) rebuilds the launch, kept in the
    plan, with num_stages=1."""
    launch = getattr(plan, name)
    try:
        launch(*tensors)
    except OutOfResources:
        if launch.opts.get("num_stages") == 1:
            raise
        opts = {**launch.opts, "num_stages": 1}
        launch = _Launch(launch.fn, launch.grid, len(tensors), launch.scalars, launch.meta, opts, launch.fast, launch.trace)
        setattr(plan, name, launch)
        launch(*tensors)


class _Cfg:
    """Validated shapes, block sizes and launch settings of one call signature (no tensor data):
    the launches it builds are fixed but for their tensors."""

    def __init__(self, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast: bool, trace: bool):
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
        self.fast, self.trace = fast, trace
        if key_mask is not None:
            if key_mask.shape != (B, Nk):
                raise ValueError(f"key_mask must have shape {(B, Nk)}, got {tuple(key_mask.shape)}")
            self.mask_strides = (key_mask.stride(0), key_mask.stride(1))
        else:
            self.mask_strides = (0, 0)  # the mask pointer is q, never read (HAS_MASK is false)
        BDF = _pow2(D)  # padded head dim
        feat_f32 = q.dtype != torch.bfloat16
        # Whole head dims up to MAX_TILE (bf16 features) or WHOLE_D_F32 (fp32 features: fp16/fp32
        # inputs, whose fp32 tiles double the shared memory); wider ones in D_BLOCK slices.
        if BDF <= (WHOLE_D_F32 if feat_f32 else MAX_TILE):
            self.BD, self.ND = BDF, 1
        else:
            dblk = D_BLOCK_F32 if feat_f32 else D_BLOCK
            self.BD, self.ND = dblk, triton.cdiv(D, dblk)
        self.BE, self.BM = _pow2(E), _pow2(m)
        self.feat_f32 = feat_f32
        self.interp = q.device.type == "cpu"
        self.meta = {
            "BD": self.BD, "BE": self.BE, "BM": self.BM, "ND": self.ND, "SOFTMAX": self.softmax, "CAUSAL": causal,
            "HAS_MASK": key_mask is not None, "FEAT_F32": feat_f32, "PREC": "ieee" if q.dtype == torch.float32 else "tf32",
            "INTERP": self.interp,
        }  # fmt: skip
        self.scal = _scalars(scale, m)
        self.small = self.BM * max(self.BE, BDF) < 128 * 64
        self.settings = TUNED if not feat_f32 and max(BDF, self.BE) <= 64 and self.BM <= 256 else SAFE
        # Software-pipelining depth: the loop's loads (ω, q/k, v tiles; every block of them when
        # the head dim is cut) are multi-buffered in shared memory beside the state; deep
        # pipelines of large tiles overflow it (227 KB on Hopper).
        big = (4 if feat_f32 else 2) * self.BM * self.BE + q.element_size() * self.BM * self.BD * self.ND
        self.num_stages = 3 if big <= 64 * 1024 else 2 if big <= 96 * 1024 and not feat_f32 else 1
        self.i64 = self.meta["I64"] = self._needs_i64(q, k, v)

    def _needs_i64(self, q: Tensor, k: Tensor, v: Tensor) -> bool:
        """Whether the kernels need int64 offsets (``_bh_id``): an upper bound on the elements of
        every buffer they index reaches 2³¹. Per (batch, head), with n = max(N, Nk), C the chunked
        kernels' chunk and P the segment kernels' segments: the rows of q, k, v, out, G' and the
        training stats, n·max(D, E, 3 + C); the per-chunk and per-segment states, ≤ 2·(n/C + P +
        1)·m·E. And the inputs' own extents (their strides may reach past B·H·n·D)."""
        n = max(self.N, self.Nk)
        chunk = self.chunk_size or _CHUNKED.chunked.CHUNK
        P = max(self.segments(n, "fwd")[0], self.segments(n, "bwd")[0])
        per_bh = n * max(self.BD * self.ND, self.BE, 3 + chunk) + 2 * (triton.cdiv(n, chunk) + P + 1) * self.BM * self.BE
        return self.BH * per_bh >= 2**31 or max(_extent(t) for t in (q, k, v)) >= 2**31

    def tiles(self, group: str) -> tuple[int, int]:
        """(chunk, warps) of a kernel group: "fwd" (state and output passes) or "bwd"."""
        bn, warps = self.settings[("causal" if self.causal else "noncausal", group)]
        if self.chunk_size is not None:
            bn = self.chunk_size
        return bn, NUM_WARPS or (4 if self.small else warps)

    def segments(self, n: int, group: str) -> tuple[int, int]:
        return _segments(n, self.tiles(group)[0], self.BH, self.device)

    def launch(self, kernel, grid, n_ptr: int, scalars: tuple, group: str) -> _Launch:
        bn, warps = self.tiles(group)
        opts = {"num_warps": warps, "num_stages": self.num_stages}
        return _Launch(kernel, grid, n_ptr, scalars, {"BN": bn, **self.meta}, opts, self.fast, self.trace)

    def reduce_launch(self, P: int, mode: int, ntc: int = 1, seg_len: int = 1) -> _Launch:
        """_reduce_kernel over P segments per (batch, head), with ntc stabilizers per segment (one
        per block of BM / ntc feature rows; ntc divides BM); see its docstring. Causal softmax
        (modes 2/3) rescales by the key stabilizer, segments of seg_len positions."""
        rt = min(self.BM, REDUCE_ROWS)
        bnt = triton.next_power_of_2(ntc)
        # Stabilizers are read BPT segments at a time, ≤ 4096 values (32 registers a thread).
        meta = {
            "BM": self.BM, "BE": self.BE, "RT": rt, "BPT": min(triton.next_power_of_2(P), max(1, 4096 // bnt)), "BNT": bnt,
            "MODE": mode, "RESCALE": mode >= 2 and self.softmax, "INTERP": self.interp, "I64": self.i64,
        }  # fmt: skip
        opts = {"num_warps": 4}
        scalars = (P, ntc, self.BM // ntc, self.scal[1], self.N, seg_len)
        return _Launch(_reduce_kernel, (self.BH, self.BM // rt), 7, scalars, meta, opts, self.fast, self.trace)

    def state_launch(self, k: Tensor, v: Tensor, group: str) -> tuple[_Launch, _Launch, int]:
        """Key pass and its reduce: (state launch, reduce launch, segments). Non-causal: the
        whole-sequence state per (batch, head) and (softmax) the global key stabilizer; causal:
        per-segment exclusive prefix states."""
        P, cps = self.segments(self.Nk, group)
        state = self.launch(
            _state_kernel, (P, self.BH), 8,
            (self.Nk, self.D, self.E, self.m, self.H, *k.stride(), *v.stride(), *self.mask_strides, *self.scal, cps),
            group,
        )  # fmt: skip
        mode = 2 if self.causal else 1 if self.softmax else 0
        return state, self.reduce_launch(P, mode, seg_len=cps * self.tiles(group)[0]), P

    def key_max_launch(self, k: Tensor) -> tuple[_Launch, _Launch] | None:
        """The launches of the causal softmax key stabilizer (else None): _key_max_kernel (chunks
        of KEY_MAX_ROWS keys, ω in tiles of KEY_MAX_FEATURES rows and the head dim's blocks), then
        _key_max_carry_kernel."""
        if not (self.causal and self.softmax):
            return None
        nck = max(1, triton.cdiv(self.N, KEY_MAX_ROWS))
        meta = {
            "BN": KEY_MAX_ROWS, "BD": self.BD, "BMT": min(KEY_MAX_FEATURES, self.BM), "ND": self.ND,
            "HAS_MASK": self.meta["HAS_MASK"], "PREC": self.meta["PREC"], "INTERP": self.interp, "I64": self.i64,
        }  # fmt: skip
        rows = _Launch(
            _key_max_kernel, (nck, self.BH), 5,
            (self.N, self.D, self.m, self.H, nck, *k.stride(), *self.mask_strides, *self.scal[:2]),
            meta, {"num_warps": KEY_MAX_WARPS, "num_stages": KEY_MAX_STAGES}, self.fast, self.trace,
        )  # fmt: skip
        carry = _Launch(
            _key_max_carry_kernel, (nck, self.BH), 2, (self.N, nck, _f32_bits(NO_KEY)),
            {"BN": KEY_MAX_ROWS, "BC": min(1024, triton.next_power_of_2(nck))}, {"num_warps": 4}, self.fast, self.trace,
        )  # fmt: skip
        return rows, carry

    def key_max(self, plan, k: Tensor, omega: Tensor, mask: Tensor) -> Tensor:
        """The causal softmax key stabilizer (B·H, N) fp32 of :func:`.reference.causal_key_max`
        in log2 units with log2 √m folded in: the running max over positions of each key's largest
        logit (the plan's ``key_max`` launches); NO_KEY where no unmasked key is visible yet.
        Where the call needs none (relu, non-causal), a (1,) placeholder, never read."""
        if plan.key_max is None:
            return self.f32(1)
        rows, carry = plan.key_max  # (small tiles, 2 stages: no shared-memory retry, as _run has)
        out, cm = self.f32(self.BH, self.N), self.f32(self.BH, rows.grid[0])
        rows(k, omega, mask, out, cm)
        carry(out, cm)
        return out

    def f32(self, *shape: int) -> Tensor:
        return torch.empty(shape, device=self.device, dtype=torch.float32)

    def run_state(self, plan, k, v, omega, mask, ntc: int = 1, mx: Tensor | None = None):
        """Run the plan's key pass (launches ``state`` and ``state_reduce``, ``P_state``
        segments, ntc stabilizers per segment as in reduce_launch): (S, z, c_key) as the later
        passes read them. mx: the causal key stabilizer (:meth:`key_max`; causal calls only)."""
        BH, P = self.BH, plan.P_state
        S, z, c = self.f32(BH, P, self.BM, self.BE), self.f32(BH, P, self.BM), self.f32(BH, P, ntc)
        # (the chunked non-causal key pass, _key_pass_kernel, takes no stabilizer pointer)
        mx = () if plan.state.fn is not _state_kernel else (z if mx is None else mx,)
        _run(plan, "state", k, v, omega, mask, *mx, S, z, c)
        if self.causal:  # exclusive prefix sums, in place
            _run(plan, "state_reduce", S, z, z, S, z, z, *mx)
            return S, z, None
        sdt = torch.float32 if self.feat_f32 else torch.bfloat16
        S_out = torch.empty(BH, self.BM, self.BE, device=self.device, dtype=sdt)
        z_out = self.f32(BH, self.BM)
        if self.softmax:
            ckey = self.f32(BH)
            _run(plan, "state_reduce", S, z, c, S_out, z_out, ckey, z)
            return S_out, z_out, ckey
        _run(plan, "state_reduce", S, z, z, S_out, z_out, z, z)
        return S_out, z_out, None


class _ForwardPlan:
    """The launches of one forward call signature: key pass, its reduce, output pass."""

    def __init__(self, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast: bool, trace: bool):
        c = self.cfg = _Cfg(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast, trace)
        self.state, self.state_reduce, self.P_state = c.state_launch(k, v, "fwd")
        self.key_max = c.key_max_launch(k)
        P, cps = c.segments(c.N, "fwd")
        self.out_shape = (c.B, c.H, c.N, c.E)
        self.fwd = c.launch(
            _fwd_kernel, (P, c.BH), 9,
            (c.N, c.D, c.E, c.m, c.H, *q.stride(), *k.stride(), *v.stride(), *c.mask_strides,
             *_contiguous_strides(*self.out_shape), *c.scal, cps),
            "fwd",
        )  # fmt: skip

    def __call__(self, q, k, v, omega, mask) -> Tensor:
        c = self.cfg
        mx = c.key_max(self, k, omega, mask)
        S, z, _ = c.run_state(self, k, v, omega, mask, mx=mx)
        out = torch.empty(self.out_shape, device=q.device, dtype=v.dtype)
        _run(self, "fwd", q, k, v, omega, mask, mx, S, z, out)
        return out


class _BackwardPlan:
    """The launches of one backward call signature: key pass and its reduce, query pass, the
    reduce of its R, key pass of the gradients."""

    def __init__(self, grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast: bool, trace: bool):
        c = self.cfg = _Cfg(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, fast, trace)
        if grad.shape != (c.B, c.H, c.N, c.E):
            raise ValueError(f"grad must have shape {(c.B, c.H, c.N, c.E)}, got {tuple(grad.shape)}")
        # Causal: the key pass must cut the same segments as the backward passes.
        self.state, self.state_reduce, self.P_state = c.state_launch(k, v, "bwd" if causal else "fwd")
        self.key_max = c.key_max_launch(k)
        P, cps = c.segments(c.N, "bwd")
        if causal:
            assert P == self.P_state
        self.P = P
        self.bwd_q = c.launch(
            _bwd_q_kernel, (P, c.BH), 14,
            (c.N, c.D, c.E, c.m, c.H, *grad.stride(), *q.stride(), *k.stride(), *v.stride(), *c.mask_strides, *c.scal, cps),
            "bwd",
        )  # fmt: skip
        self.r_reduce = c.reduce_launch(P, 3 if causal else 0, seg_len=cps * c.tiles("bwd")[0])
        if not causal:
            P, cps = c.segments(c.Nk, "bwd")
        self.bwd_k = c.launch(
            _bwd_k_kernel, (P, c.BH), 13,
            (c.N, c.Nk, c.D, c.E, c.m, c.H, *q.stride(), *k.stride(), *v.stride(), *c.mask_strides, *c.scal, cps),
            "bwd",
        )  # fmt: skip

    def __call__(self, grad, q, k, v, omega, mask) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        B, H, N, Nk, D, E, BH, P = c.B, c.H, c.N, c.Nk, c.D, c.E, c.BH, self.P
        mx = c.key_max(self, k, omega, mask)
        S, z, ckey = c.run_state(self, k, v, omega, mask, mx=mx)
        if c.causal:
            gs, gd = c.f32(BH, N, c.BE), c.f32(BH, N)  # G' = [g/den, −Σ g·out/den] for the key pass
        else:
            gs = gd = z  # unused
        R, rz = c.f32(BH, P, c.BM, c.BE), c.f32(BH, P, c.BM)
        dq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
        _run(self, "bwd_q", grad, q, k, v, omega, mask, mx, S, z, dq, R, rz, gs, gd)
        if c.causal:  # exclusive suffix sums, in place
            _run(self, "r_reduce", R, rz, rz, R, rz, rz, mx)
        else:
            rdt = torch.float32 if c.feat_f32 else torch.bfloat16
            R_out = torch.empty(BH, c.BM, c.BE, device=q.device, dtype=rdt)
            rz_out = c.f32(BH, c.BM)
            _run(self, "r_reduce", R, rz, rz, R_out, rz_out, rz, rz)
            R, rz = R_out, rz_out
        dk = torch.empty(B, H, Nk, D, device=q.device, dtype=k.dtype)
        dv = torch.empty(B, H, Nk, E, device=q.device, dtype=v.dtype)
        _run(self, "bwd_k", q, k, v, omega, mask, mx, ckey if ckey is not None else z, R, rz, gs, gd, dk, dv)
        return dq, dk, dv


# Plans per call signature (shapes, strides, dtypes, device, flags, scale, chunk, alignment),
# built at its first call; cleared when full and whenever a module knob changed since the last call.
_PLANS: dict = {}
_MAX_PLANS = 1024
_KNOBS: tuple | None = None


def _knobs() -> tuple:
    return (
        NUM_WARPS, PROGRAMS_PER_SM, INTERPRETER_PROGRAMS, REDUCE_ROWS, KEY_MAX_ROWS, KEY_MAX_FEATURES, KEY_MAX_WARPS, KEY_MAX_STAGES,
        D_BLOCK, WHOLE_D_F32, D_BLOCK_F32, tuple(TUNED.items()),
        tuple(SAFE.items()), PATH, CHUNKED_MAX_N, _CHUNKED.chunked.CHUNK, _CHUNKED.chunked.M_TILE, _CHUNKED.chunked.WARPS, _CHUNKED.chunked.SCAN_WARPS,
        _CHUNKED.chunked.SCAN_STAGES, _CHUNKED.chunked.SCAN_PROGRAMS_PER_SM, _CHUNKED.chunked.KEY_PROGRAMS_PER_SM, _CHUNKED.chunked.OUT_PERSIST,
        _CHUNKED.chunked.OUT_MAX_TILES, _CHUNKED.chunked.OUT_MIN_CHUNKS, _CHUNKED.chunked.OUT_PROGRAMS_PER_SM,
        _CHUNKED.chunked.OUT_WARPS, _CHUNKED.bwd.BWD_K_WARPS, _CHUNKED.bwd.BWD_K_STAGES,
    )  # fmt: skip


def _plan(key, make, args: tuple):
    """The cached plan for ``key``, else ``make()``'s; a new plan is first called once with ``args``
    in compile_ahead, so that the kernels of its launches compile in parallel, not one by one at
    their first launch."""
    global _KNOBS
    knobs = _knobs()
    if knobs != _KNOBS:
        _PLANS.clear()
        _KNOBS = knobs
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = make()
        _compile_ahead(lambda: plan(*args))
        _PLANS[key] = plan
    return plan


def _key(*ts: Tensor | None) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype) if t is not None else None for t in ts)


def _aligned(*ts: Tensor | None) -> bool:
    """Every data pointer 16-byte aligned: what a compiled kernel was specialized for, so the
    plan may launch it directly (else each call goes through Triton's own dispatch)."""
    bits = 0
    for t in ts:
        if t is not None:
            bits |= t.data_ptr()
    return bits & 15 == 0


def _fp16_wide(q: Tensor) -> bool:
    # fp16 inputs with head dims past WHOLE_D_F32 run through the fp32 kernels: their fp32
    # features sliced over the head dim with tf32 products needed 262–344 KB of shared memory on
    # the H200 (triton 3.6; the limit is 227 KB) at D = 128, whole or sliced, while the fp32 kernels
    # (FMA products, no operand staging) passed at D = 128 and 256.
    return q.dtype == torch.float16 and _pow2(q.shape[-1]) > WHOLE_D_F32


def _use_chunked(q: Tensor, v: Tensor, omega: Tensor, causal: bool, backward: bool) -> bool:
    """Whether a call runs on the chunked kernels (see PATH)."""
    if PATH == "segments" or (backward and not causal) or not _CHUNKED.chunked.chunked_supports(q, v, omega):
        return False
    return PATH == "chunked" or not causal or q.shape[2] <= CHUNKED_MAX_N


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

    ``chunk_size`` (a power of two ≥ 16) overrides the tuned chunk of every kernel. Runs on the
    chunked kernels of :mod:`.chunked` or the segment kernels here (``PATH``).
    """
    if _fp16_wide(q):
        args = (omega, key_mask, kernel_fn, causal, scale, chunk_size)
        return performer_attention(q.float(), k.float(), v.float(), *args).to(v.dtype)
    return _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, _use_chunked(q, v, omega, causal, False))


def performer_attention_train(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    key_mask: Tensor | None,
    kernel_fn: str,
    causal: bool,
    scale: float,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, stats): :func:`performer_attention`'s output and what its backward can reuse.

    Where the call runs on the causal chunked kernels, stats (B, H, R, N) fp32 holds each query
    row's stabilizer and normalizer, each position's causal key stabilizer and the intra-chunk
    scores (:func:`.chunked.stats_rows`), and :func:`performer_attention_backward` given (out,
    stats) skips recomputing the forward in its dq pass, the key stabilizer and the scores. Elsewhere stats is an empty fp32 tensor, and the backward recomputes.
    """
    if causal and not _fp16_wide(q) and _use_chunked(q, v, omega, causal, False):
        return _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, True, stats=True)
    out = performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size)
    return out, q.new_empty(0, dtype=torch.float32)


def _forward(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, chunked: bool, stats: bool = False):
    """performer_attention (and its stats, with ``stats``: chunked causal only) through the
    chunked kernels or the segment kernels, plans cached."""
    omega = omega.contiguous()
    mask = _bool_mask(key_mask)
    mptr = mask if mask is not None else q
    args = (q, k, v, omega, mask, kernel_fn, causal, scale, chunk_size)

    def make(fast: bool, trace: bool):
        if chunked:
            return _CHUNKED.chunked.ChunkedForwardPlan(*args, fast, trace, stats=stats)
        return _ForwardPlan(*args, fast, trace)

    if _traced(q):
        return make(False, True)(q, k, v, omega, mptr)
    aligned = _aligned(q, k, v, omega, mask)
    key = ("fwd", _key(q, k, v, omega, mask), q.device, kernel_fn, causal, scale, chunk_size, aligned, chunked, stats)
    call = (q, k, v, omega, mptr)
    return _plan(key, lambda: make(aligned, False), call)(*call)


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
    out: Tensor | None = None,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`performer_attention` given grad = ∂loss/∂out; omega gets no gradient.
    Causal calls may run on the chunked kernels (``PATH``), non-causal ones on the segment kernels.

    ``out`` and ``stats``: what :func:`performer_attention_train` returned for these inputs (or
    None). A non-empty stats, on a call that runs on the chunked kernels, spares the dq pass its
    recompute of the forward; otherwise both are ignored.

    Raises:
        ValueError: a non-empty stats that is not (B, H, R, N) fp32 contiguous
            (:func:`.chunked.stats_rows` for q's dtype and ``chunk_size``), or stats without out,
            or out not the shape of grad (besides the forward's errors).
    """
    saved = stats is not None and stats.numel() > 0
    if saved:
        B, H, N = q.shape[:3]
        want = (B, H, _CHUNKED.chunked.stats_rows(q.dtype != torch.bfloat16, chunk_size), N)
        if stats.shape != want or stats.dtype != torch.float32 or not stats.is_contiguous():
            raise ValueError(
                f"stats must be a contiguous float32 tensor of shape {want} (from performer_attention_train "
                f"with the same chunk_size), got {tuple(stats.shape)} {stats.dtype}"
            )
        if out is None or out.shape != grad.shape:
            raise ValueError(f"out must be the forward's output, of grad's shape {tuple(grad.shape)}, with stats")
    if _fp16_wide(q):
        args = (omega, key_mask, kernel_fn, causal, scale, chunk_size)
        dq, dk, dv = performer_attention_backward(grad.float(), q.float(), k.float(), v.float(), *args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    chunked = _use_chunked(q, v, omega, causal, True)
    if not (saved and chunked):
        out = stats = None
    return _backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, chunked, out, stats)


def _backward(grad, q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size, chunked: bool, out=None, stats=None):
    """performer_attention_backward through the chunked kernels (with the forward's out and stats,
    if given) or the segment kernels."""
    omega = omega.contiguous()
    mask = _bool_mask(key_mask)
    mptr = mask if mask is not None else q
    args = (grad, q, k, v, omega, mask, kernel_fn, causal, scale, chunk_size)
    saved = () if out is None else (out, stats)

    def make(fast: bool, trace: bool):
        if chunked:
            return _CHUNKED.bwd.ChunkedBackwardPlan(*args, fast, trace, out=out)
        return _BackwardPlan(*args, fast, trace)

    if _traced(q):
        return make(False, True)(grad, q, k, v, omega, mptr, *saved)
    aligned = _aligned(grad, q, k, v, omega, mask, *saved)
    key = ("bwd", _key(grad, q, k, v, omega, mask, out), q.device, kernel_fn, causal, scale, chunk_size, aligned, chunked)
    call = (grad, q, k, v, omega, mptr, *saved)
    return _plan(key, lambda: make(aligned, False), call)(*call)


class _ChunkedModules:
    """chunked.py and chunked_bwd.py, imported at first use: they import this module's helpers."""

    def __getattr__(self, name: str):
        from . import chunked, chunked_bwd

        _CHUNKED.__dict__.update(chunked=chunked, bwd=chunked_bwd)
        return getattr(self, name)


_CHUNKED = _ChunkedModules()
