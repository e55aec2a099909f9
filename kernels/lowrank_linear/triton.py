"""Triton kernels for the low-rank linear y = scale·((x·A)·B) + b (the math is in README.md).

Layers, top to bottom: ``@triton.jit`` kernels → configs (fixed heuristics for small T, a few
candidates timed once per layer shape and T bucket for large T) → launch plans (every argument but
the tensors fixed, cached per shape; repeated calls launch the compiled kernel directly) → the four
functions the panther ops register, with the signatures of ``reference.py``.

**Factors.** A is one or two factors P (long dim × R), B one or two factors Q (R × long dim):
SKLinear's (S1s, U2s) / (U1s, S2s) or the plain (A, B). Each is read in place through a
:class:`Factor` view: rank column j = l·KT + c (term l, column c inside the term) of long row i
lives at ``t + l·s_l + i·s_long + c·s_c``. The same view serves a factor and its transpose, so the
backward reuses the forward kernels: gh = g·Bᵀ is ``_xa`` over the B factors, dx = gh·Aᵀ is
``_hq`` over the A factors. No concatenated copy of the weights is ever made.

**Kernels.**

* ``_xa_kernel``     h = scale·X·[P1 P2] (T × R). When there are too few row blocks to fill the
  GPU the reduction over the long dim is split across programs, each writing an fp32 partial
  (no atomics, no zero fill); the consumers sum the partials. Unsplit, h is written in the
  operand dtype (the reference's h = x·A is rounded to it too).
* ``_hq_kernel``     Y = scale·h·[Q1; Q2] + bias, h summed over its partials and rounded to the
  operand dtype first; each program keeps its rows of h and walks column blocks. With ``want_h``
  (the training ops) the first column range also stores the summed h for the backward.
* ``_hq_persistent_kernel``  the same Y as a GEMM over the rank in slices, one or two programs an
  SM walking output tiles: a tuning candidate for ranks ≥ 64 (chosen for fp32 at rank 256).
* ``_hq_tma_kernel``  that persistent GEMM with TMA copies for every load and store (descriptors
  built on the device; both B factors through one 3-D descriptor, whose span the kernel checks):
  the tuned candidate for 16-bit operands from T = 1024 on Hopper, where
  h is unsplit (chosen at ranks 128 and 256, and at T = 16384 of the headline layer).
* ``_fused_kernel``  both in one pass: each program keeps its rows of h in registers, so x is read
  once and y written once with no launch in between (rank ≤ ``_FUSED_MAX_RANK``).
* ``_wgrad_kernel``  D = scale·Xᵀ·h (N × R) for dS1/dS2 (dA/dB), optionally the column sums of X
  (db) in the same pass. Split over T into fp32 partials when there are too few column blocks;
  ``_reduce_kernel`` then sums the partials of every such output in one launch (and, at small T,
  the forward's x·A partials before the h·B at large rank, and the backward's g·Bᵀ partials
  before dx and dS1 read them: ``_sum_first``).
* ``_dxa_kernel``  the backward's dx = gh·Aᵀ and dA = Xᵀ·gh in one pass over columns of x and dx
  (gh unsplit: dx needs no reduction, so each program reads its x tile while it writes the same
  rows of dx); dA split over T into fp32 partials as ``_wgrad`` splits it. A tuning candidate from
  T = 1024 for 16-bit operands up to rank 128.

The forward for training also returns h = x·A (``want_h``), and the backward takes it (``h``)
instead of a pass over x to recompute it.

fp32 accumulation everywhere; an fp32 product follows torch's TF32 setting for CUDA matmuls. The
kernels take ``scale`` as the int32 bits of its fp32 value (``scale_bits``; see
``kernels/_launch.f32_bits``), so that Inductor compiles the same binary as an eager call.
"""

from __future__ import annotations

import contextvars
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes
from triton.runtime.errors import OutOfResources

from .._launch import Launch as _Launch, compile_ahead as _compile_ahead, compiling_ahead as _compiling_ahead
from .._launch import f32_bits as _f32_bits, f32_of, traced as _traced
from . import reference

_log = logging.getLogger(__name__)


__all__ = [
    "MAX_RANK",
    "lowrank_backward",
    "lowrank_forward",
    "sklinear_backward",
    "sklinear_forward",
    "supported",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Largest rank R of one factor the kernels take (h tile kept whole in registers).
MAX_RANK = 256
# The fused forward holds (BLOCK_M × R1P+R2P) of h in registers and multiplies it by whole
# (R × BLOCK_N) tiles of B; fp32 ("ieee" FMA products) needs the most registers.
_FUSED_MAX_RANK = {torch.float32: 32, torch.bfloat16: 128, torch.float16: 128}
# Smallest slice of a split reduction (over the long dim in _xa, over T in _wgrad).
_K_GRANULE = 256
_T_GRANULE = 256
_M_BUCKET_MAX = 16384
# Below _TUNE_MIN_M rows, split partials of h are summed once (the _reduce kernel) before their
# consumers read them (see _sum_first): in the forward from this many bytes of partials per row of
# h (rank 256 at 16 or more splits) or from this many that all h·B programs together would read,
# in the backward (gh, read by dx and dA) from this many bytes of them that one consumer program
# would read.
_REDUCE_FWD_ROW_BYTES = 16 * 1024
_REDUCE_FWD_READ_BYTES = 32 * 1024 * 1024
_REDUCE_BWD_BYTES = 32 * 1024
# fp32 below _TUNE_MIN_M rows: from this padded rank on, the forward's x·A and the backward's g·Bᵀ
# split their long dim into slices of one BLOCK_K (not _K_GRANULE); up to _FWD_IEEE_MAX_RANK the
# forward multiplies with FMAs.
_XA_FP32_FINE_MIN_RANK = 128
_FWD_IEEE_MAX_RANK = 32
# _reduce loads up to _REDUCE_SB partials at once, _REDUCE_TILE elements a load and program.
_REDUCE_SB = 32
_REDUCE_TILE = 4096
# From this many rows on, the first call at a (layer, T bucket) times a few candidate configs
# (and the fused against the two-kernel forward) and keeps the fastest; below it, one fixed
# config: the GPU work is a few µs there and the host time is what counts.
_TUNE_MIN_M = 1024
_TUNE = not _INTERPRET
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Plans kept per process (layer shape × T); cleared when full.
_MAX_PLANS = 4096

# Triton's interpreter multiplies bf16 operands as their raw 16-bit patterns (its dot hands numpy
# the storage integers; seen with triton 3.9), so under the interpreter 16-bit operands are widened
# to fp32 first: the same products (exact in fp32) and the same fp32 accumulation.
_WIDEN_DOT = tl.constexpr(_INTERPRET)

# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    # PREC: 0 ieee, 1 tf32, 2 tf32x3. Only fp32 operands look at it; 16-bit ones ignore it.
    if _WIDEN_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PREC == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    elif PREC == 2:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _rank_off(j, KT, s_l, s_c):
    # Offset of rank column j = l·KT + c inside a stacked factor.
    return (j // KT) * s_l + (j % KT) * s_c


@triton.jit
def _load_p(p_ptr, rows, j, n_rows, R, KT, s_l, s_long, s_c, EVEN: tl.constexpr):
    # P[rows, j] as a (len(rows) × len(j)) tile; zero outside [0, n_rows) × [0, R).
    ptrs = p_ptr + rows[:, None] * s_long + _rank_off(j, KT, s_l, s_c)[None, :]
    if EVEN:
        return tl.load(ptrs, mask=j[None, :] < R, other=0.0)
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (j[None, :] < R), other=0.0)


@triton.jit
def _load_q(q_ptr, j, cols, R, n_cols, KT, s_l, s_long, s_c):
    # Q[j, cols] as a (len(j) × len(cols)) tile; zero outside [0, R) × [0, n_cols).
    ptrs = q_ptr + _rank_off(j, KT, s_l, s_c)[:, None] + cols[None, :] * s_long
    return tl.load(ptrs, mask=(j[:, None] < R) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _load_h(h_rows, m_mask, col0, j, R, s_hs, SPLIT_H: tl.constexpr):
    # h[rows, col0 + j] summed over its SPLIT_H partials (fp32 when split), zero outside [0, R).
    # (A constexpr count: unsplit, as at large T, there is no inner loop to keep the caller's loop
    # from pipelining; many partials, as at small T, take a loop rather than an unrolled chain.)
    mask = m_mask & (j[None, :] < R)
    ptrs = h_rows + col0 + j[None, :]
    h = tl.load(ptrs, mask=mask, other=0.0)
    if SPLIT_H > 1:
        h = h.to(tl.float32)
        if SPLIT_H <= 4:
            for s in tl.static_range(1, SPLIT_H):
                h += tl.load(ptrs + s * s_hs, mask=mask, other=0.0)
        else:
            for s in range(1, SPLIT_H):
                h += tl.load(ptrs + s * s_hs, mask=mask, other=0.0)
    return h


@triton.jit
def _xa_rows(
    x_ptr, s_xm, s_xk, offs_m, M, k_lo, k_hi,
    p1_ptr, R1, KT1, s_p1l, s_p1i, s_p1c,
    p2_ptr, R2, KT2, s_p2l, s_p2i, s_p2c,
    HAS_SECOND: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, PREC: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # (x[offs_m, k_lo:k_hi] · P1, · P2) accumulated in fp32: (BLOCK_M × R1P), (BLOCK_M × R2P).
    # EVEN_K: the slice is whole BLOCK_Ks (no mask along the long dim: 16-byte loads).
    j1 = tl.arange(0, R1P)
    j2 = tl.arange(0, R2P)
    acc1 = tl.zeros((BLOCK_M, R1P), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, R2P), dtype=tl.float32)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm
    m_mask = offs_m[:, None] < M
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :] * s_xk, mask=m_mask, other=0.0)
        else:
            x = tl.load(x_rows + offs_k[None, :] * s_xk, mask=m_mask & (offs_k[None, :] < k_hi), other=0.0)
        p1 = _load_p(p1_ptr, offs_k, j1, k_hi, R1, KT1, s_p1l, s_p1i, s_p1c, EVEN_K)
        acc1 = _dot(x, p1, acc1, PREC)
        if HAS_SECOND:
            p2 = _load_p(p2_ptr, offs_k, j2, k_hi, R2, KT2, s_p2l, s_p2i, s_p2c, EVEN_K)
            acc2 = _dot(x, p2, acc2, PREC)
    return acc1, acc2


@triton.jit
def _hq_tile(
    h1, h2, offs_n, N,
    q1_ptr, R1, KT1, s_q1l, s_q1n, s_q1c,
    q2_ptr, R2, KT2, s_q2l, s_q2n, s_q2c,
    HAS_SECOND: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # h1·Q1[:, offs_n] + h2·Q2[:, offs_n] in fp32 (h already in the operand dtype).
    q1 = _load_q(q1_ptr, tl.arange(0, R1P), offs_n, R1, N, KT1, s_q1l, s_q1n, s_q1c)
    acc = _dot(h1, q1, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC)
    if HAS_SECOND:
        q2 = _load_q(q2_ptr, tl.arange(0, R2P), offs_n, R2, N, KT2, s_q2l, s_q2n, s_q2c)
        acc = _dot(h2, q2, acc, PREC)
    return acc


@triton.jit
def _scale_bias(acc, scale, bias_ptr, s_b, offs_n, N, HAS_BIAS: tl.constexpr):
    # scale·acc + bias[offs_n] in fp32 (the h·B epilogues, before rounding to y's dtype).
    acc = acc * scale
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * s_b, mask=offs_n < N, other=0.0)
        acc = acc + b.to(tl.float32)[None, :]
    return acc


@triton.jit
def _store_y(acc, scale, bias_ptr, s_b, y_ptr, s_ym, s_yn, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    # Epilogue: y = scale·acc + bias, rounded once to y's dtype.
    acc = _scale_bias(acc, scale, bias_ptr, s_b, offs_n, N, HAS_BIAS)
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :] * s_yn
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _hq_columns(
    h1, h2, n_lo, n_hi, offs_m, M, N, y_ptr, s_ym, s_yn, bias_ptr, s_b, scale,
    q1_ptr, R1, KT1, s_q1l, s_q1n, s_q1c, q2_ptr, R2, KT2, s_q2l, s_q2n, s_q2c,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # y[offs_m, n_lo:n_hi] = scale·(h1·Q1 + h2·Q2) + bias, column block by column block, for rows
    # of h already in registers (_hq_kernel and _fused_kernel).
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = _hq_tile(
            h1, h2, offs_n, N, q1_ptr, R1, KT1, s_q1l, s_q1n, s_q1c, q2_ptr, R2, KT2, s_q2l, s_q2n, s_q2c,
            HAS_SECOND, R1P, R2P, PREC, BLOCK_M, BLOCK_N,
        )
        _store_y(acc, scale, bias_ptr, s_b, y_ptr, s_ym, s_yn, offs_m, offs_n, M, N, HAS_BIAS)


@triton.jit
def _store_h(h_ptr, offs_m, M, R1, R2, s_hm, h1, h2, HAS_SECOND: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr):
    # h[offs_m, 0:R1] = h1, h[offs_m, R1:R1+R2] = h2 (the forward's x·A, kept for the backward).
    rows = h_ptr + offs_m.to(tl.int64)[:, None] * s_hm
    m_mask = offs_m[:, None] < M
    j1 = tl.arange(0, R1P)
    tl.store(rows + j1[None, :], h1.to(h_ptr.dtype.element_ty), mask=m_mask & (j1[None, :] < R1))
    if HAS_SECOND:
        j2 = tl.arange(0, R2P)
        tl.store(rows + R1 + j2[None, :], h2.to(h_ptr.dtype.element_ty), mask=m_mask & (j2[None, :] < R2))


# ---------------------------------------------------------------------------------------------
# Kernels. Tensors come first in every signature (the launch plans rely on it). Only T (M) is
# not specialized: the long dims, ranks and strides are, since masks along a dim of known
# divisibility and unit strides are what make 16-byte, cp.async-pipelined loads. KT (columns per
# term) is a constexpr, so the rank gather (j // KT, j % KT) stays contiguous in runs of KT.
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _xa_kernel(
    x_ptr, h_ptr, p1_ptr, p2_ptr,
    M, K, R1, R2, K_PER_SPLIT,
    s_xm, s_xk, s_hs, s_hm,
    s_p1l, s_p1i, s_p1c, s_p2l, s_p2i, s_p2c,
    scale_bits,
    KT1: tl.constexpr, KT2: tl.constexpr, HAS_SECOND: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr,
    PREC: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Partial pid_k of h: h[pid_k, :, 0:R1] = scale·x·P1, h[pid_k, :, R1:R1+R2] = scale·x·P2 over
    # this program's slice of K.
    scale = f32_of(scale_bits)
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc1, acc2 = _xa_rows(
        x_ptr, s_xm, s_xk, offs_m, M, k_lo, k_hi,
        p1_ptr, R1, KT1, s_p1l, s_p1i, s_p1c, p2_ptr, R2, KT2, s_p2l, s_p2i, s_p2c,
        HAS_SECOND, R1P, R2P, PREC, EVEN_K, BLOCK_M, BLOCK_K,
    )
    h_ty = h_ptr.dtype.element_ty
    h_rows = h_ptr + pid_k.to(tl.int64) * s_hs + offs_m.to(tl.int64)[:, None] * s_hm
    m_mask = offs_m[:, None] < M
    j1 = tl.arange(0, R1P)
    tl.store(h_rows + j1[None, :], (acc1 * scale).to(h_ty), mask=m_mask & (j1[None, :] < R1))
    if HAS_SECOND:
        j2 = tl.arange(0, R2P)
        tl.store(h_rows + R1 + j2[None, :], (acc2 * scale).to(h_ty), mask=m_mask & (j2[None, :] < R2))


@triton.jit(do_not_specialize=["M"])
def _hq_kernel(
    h_ptr, y_ptr, q1_ptr, q2_ptr, bias_ptr, hout_ptr,
    M, N, R1, R2, N_PER_PROG,
    s_hs, s_hm, s_ym, s_yn, s_b,
    s_q1l, s_q1n, s_q1c, s_q2l, s_q2n, s_q2c,
    scale_bits,
    KT1: tl.constexpr, KT2: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
    R1P: tl.constexpr, R2P: tl.constexpr, PREC: tl.constexpr, SPLIT_H: tl.constexpr, WRITE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # y[offs_m, n-range of this program] = scale·(h[:, :R1]·Q1 + h[:, R1:R1+R2]·Q2) + bias. The
    # rows of h are loaded (summed over their partials, rounded to the operand dtype) once, then
    # kept in registers for every column block of the range. WRITE_H: the programs of the first
    # column range also store those rows of h (M × R1+R2, operand dtype) for the backward.
    scale = f32_of(scale_bits)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * s_hm
    m_mask = offs_m[:, None] < M
    op_ty = q1_ptr.dtype.element_ty
    h1 = _load_h(h_rows, m_mask, 0, tl.arange(0, R1P), R1, s_hs, SPLIT_H).to(op_ty)
    h2 = tl.zeros((BLOCK_M, R2P), dtype=op_ty)
    if HAS_SECOND:
        h2 = _load_h(h_rows, m_mask, R1, tl.arange(0, R2P), R2, s_hs, SPLIT_H).to(op_ty)
    if WRITE_H:
        if pid_n == 0:
            _store_h(hout_ptr, offs_m, M, R1, R2, R1 + R2, h1, h2, HAS_SECOND, R1P, R2P)
    n_lo = pid_n * N_PER_PROG
    _hq_columns(
        h1, h2, n_lo, tl.minimum(n_lo + N_PER_PROG, N), offs_m, M, N, y_ptr, s_ym, s_yn, bias_ptr, s_b, scale,
        q1_ptr, R1, KT1, s_q1l, s_q1n, s_q1c, q2_ptr, R2, KT2, s_q2l, s_q2n, s_q2c,
        HAS_SECOND, HAS_BIAS, R1P, R2P, PREC, BLOCK_M, BLOCK_N,
    )


@triton.jit(do_not_specialize=["M"])
def _hq_persistent_kernel(
    h_ptr, y_ptr, q1_ptr, q2_ptr, bias_ptr, hout_ptr,
    M, N, R1, R2, NUM_PROGS,
    s_hs, s_hm, s_ym, s_yn, s_b,
    s_q1l, s_q1n, s_q1c, s_q2l, s_q2n, s_q2c,
    scale_bits,
    KT1: tl.constexpr, KT2: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr, SPLIT_H: tl.constexpr, WRITE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The same y = scale·h·[Q1; Q2] + bias as _hq_kernel, as a plain GEMM over the rank: each
    # program walks output tiles (row-major, NUM_PROGS apart) and, per tile, the rank in BLOCK_K
    # slices, loading h and B slices through the software pipeline. For large ranks (K = R of 128
    # or more), where _hq_kernel's h held whole in registers/shared memory leaves one program an SM
    # and nothing overlapping its epilogue; the flattened tile loop lets the next tile's loads
    # start under this one's epilogue. WRITE_H: programs on the first column block also store h
    # (summed over its partials, operand dtype).
    scale = f32_of(scale_bits)
    pid = tl.program_id(0)
    R = R1 + R2
    n_pid_n = tl.cdiv(N, BLOCK_N)
    n_tiles = tl.cdiv(M, BLOCK_M) * n_pid_n
    op_ty = q1_ptr.dtype.element_ty
    for tile in tl.range(pid, n_tiles, NUM_PROGS, flatten=True):
        pid_m = tile // n_pid_n
        pid_n = tile % n_pid_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m[:, None] < M
        n_mask = offs_n[None, :] < N
        h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * s_hm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):
            jk = tl.arange(0, BLOCK_K)
            h = _load_h(h_rows, m_mask, k0, jk, R - k0, s_hs, SPLIT_H).to(op_ty)
            if WRITE_H:
                if pid_n == 0:
                    o = hout_ptr + offs_m.to(tl.int64)[:, None] * R + k0 + jk[None, :]
                    tl.store(o, h, mask=m_mask & (jk[None, :] < R - k0))
            j = k0 + jk
            p1 = q1_ptr + _rank_off(j, KT1, s_q1l, s_q1c)[:, None] + offs_n[None, :] * s_q1n
            if HAS_SECOND:
                p2 = q2_ptr + _rank_off(j - R1, KT2, s_q2l, s_q2c)[:, None] + offs_n[None, :] * s_q2n
                ptrs = tl.where((j < R1)[:, None], p1, p2)
            else:
                ptrs = p1
            q = tl.load(ptrs, mask=(j[:, None] < R) & n_mask, other=0.0)
            acc = _dot(h, q, acc, PREC)
        _store_y(acc, scale, bias_ptr, s_b, y_ptr, s_ym, s_yn, offs_m, offs_n, M, N, HAS_BIAS)


@triton.jit
def _hq_tma_tiles(
    hd, yd, y_ptr, qd, q1d, q2d, sel_second, pid, n_mine, NUM_PROGS, n_pid_n, KT1, KT, scale, bias_ptr, s_b, N,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ONE_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI: tl.constexpr,
):
    # _hq_tma_kernel's loop: this program's output tiles, each over the rank in BLOCK_K slices (KT1
    # of the first factor, then KT - KT1 of the second), as one flat loop over (tile, slice) so the
    # next tile's loads are issued under this one's epilogue. ONE_DESC: both factors through qd,
    # the first at outer index sel_second and the second at 1 - sel_second (sel_second: the second
    # factor lies below the first in memory, qd's base); else q1d / q2d by a branch per slice.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in tl.range(0, n_mine * KT, flatten=True):
        tile = pid + (it // KT) * NUM_PROGS
        kk = it % KT
        pm = tile // n_pid_n
        pn = tile % n_pid_n
        second = kk >= KT1
        h = hd.load([pm * BLOCK_M, kk * BLOCK_K])
        row = tl.where(second, kk - KT1, kk) * BLOCK_K
        if ONE_DESC:
            q = qd.load([(second != sel_second).to(tl.int32), row, pn * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
        elif second:
            q = q2d.load([row, pn * BLOCK_N])
        else:
            q = q1d.load([row, pn * BLOCK_N])
        acc = _dot(h, q, acc, PREC)
        if kk == KT - 1:
            offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
            out = _scale_bias(acc, scale, bias_ptr, s_b, offs_n, N, HAS_BIAS).to(y_ptr.dtype.element_ty)
            if EPI == 1:
                yd.store([pm * BLOCK_M, pn * BLOCK_N], out)
            else:  # two stores of half the columns: half the epilogue's shared memory
                o0, o1 = tl.split(tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                yd.store([pm * BLOCK_M, pn * BLOCK_N], o0)
                yd.store([pm * BLOCK_M, pn * BLOCK_N + BLOCK_N // 2], o1)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit(do_not_specialize=["M"])
def _hq_tma_kernel(
    h_ptr, y_ptr, q1_ptr, q2_ptr, bias_ptr, hout_ptr,
    M, N, R1, R2, NUM_PROGS,
    s_hm, s_q, s_b,
    scale_bits,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI: tl.constexpr,
):
    # The same y = scale·h·[Q1; Q2] + bias as _hq_persistent_kernel, with every load and store a TMA
    # copy (descriptors built on the device): h (M × R1+R2, unsplit) in (BLOCK_M × BLOCK_K) slices,
    # y in EPI stores of (BLOCK_M × BLOCK_N/EPI), the B factors rows s_q apart, unit column stride.
    # Both B factors go through ONE 3-D descriptor [2, max(R1, R2), N] whose outer stride is the
    # distance between the two tensors, the lower one its base: one slice a step. A branch between
    # two descriptors inside the rank loop keeps Triton's pipeliner from prefetching the loads, and
    # pointer loads of B cost more too (H200, 8192², L = 2, k = 64, T = 16384: 280 and 192 µs
    # against 142); a descriptor per factor loading slices of both a step lost 15-27% at ranks
    # 128/256 (54.7 against 43.6 at T = 4096). TMA's stride rules need that distance to be a
    # positive multiple of 16 bytes below 2**40, which a plan cannot check once for every call (a
    # traced one cannot check it at all): the kernel checks it, one branch before the loop, and
    # where it fails takes a descriptor per factor and the branch per slice: slower (H200, 8192²,
    # L = 2, k = 64, T = 4096: 78.1 against 43.5 µs), but right for any two factor tensors; in
    # practice only for one memory under two names. The check costs nothing measurable (43.5
    # against 43.7 µs with the host checking instead). Base pointers: 16-byte aligned (the plan's).
    # hout_ptr: unused (h is the unsplit one the plan keeps).
    scale = f32_of(scale_bits)
    hd = tl.make_tensor_descriptor(h_ptr, shape=[M, R1 + R2], strides=[s_hm, 1], block_shape=[BLOCK_M, BLOCK_K])
    yd = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // EPI])
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    n_mine = tl.cdiv(tl.cdiv(M, BLOCK_M) * n_pid_n - pid, NUM_PROGS)
    KT1 = R1 // BLOCK_K
    KT = KT1 + R2 // BLOCK_K
    ES: tl.constexpr = q1_ptr.dtype.element_ty.primitive_bitwidth // 8
    d = q2_ptr.to(tl.int64) - q1_ptr.to(tl.int64)
    # (d = 0 only for one factor, q2 passed as q1: two factors in one memory take the fallback.)
    if (d % 16 == 0) & (tl.abs(d) < (1 << 40)) & ((d != 0) | (not HAS_SECOND)):
        swap = d < 0
        base = tl.where(swap, q2_ptr, q1_ptr)
        # (One factor: any valid outer stride serves, the second slot is never read.)
        dist = tl.where(d == 0, R1 * s_q, tl.abs(d) // ES)
        qd = tl.make_tensor_descriptor(base, shape=[2, tl.maximum(R1, R2), N], strides=[dist, s_q, 1],
                                       block_shape=[1, BLOCK_K, BLOCK_N])  # fmt: skip
        _hq_tma_tiles(
            hd, yd, y_ptr, qd, qd, qd, swap, pid, n_mine, NUM_PROGS, n_pid_n, KT1, KT, scale, bias_ptr, s_b, N,
            HAS_BIAS, PREC, True, BLOCK_M, BLOCK_N, BLOCK_K, EPI,
        )  # fmt: skip
    else:
        q1d = tl.make_tensor_descriptor(q1_ptr, shape=[R1, N], strides=[s_q, 1], block_shape=[BLOCK_K, BLOCK_N])
        q2d = tl.make_tensor_descriptor(q2_ptr, shape=[R2, N], strides=[s_q, 1], block_shape=[BLOCK_K, BLOCK_N])
        _hq_tma_tiles(
            hd, yd, y_ptr, q1d, q1d, q2d, False, pid, n_mine, NUM_PROGS, n_pid_n, KT1, KT, scale, bias_ptr, s_b, N,
            HAS_BIAS, PREC, False, BLOCK_M, BLOCK_N, BLOCK_K, EPI,
        )  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _fused_kernel(
    x_ptr, y_ptr, p1_ptr, p2_ptr, q1_ptr, q2_ptr, bias_ptr, hout_ptr,
    M, K, N, R1, R2,
    s_xm, s_xk, s_ym, s_yn, s_b,
    s_p1l, s_p1i, s_p1c, s_p2l, s_p2i, s_p2c,
    s_q1l, s_q1n, s_q1c, s_q2l, s_q2n, s_q2c,
    scale_bits,
    KT1: tl.constexpr, KT2: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
    R1P: tl.constexpr, R2P: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr, WRITE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One row block: h = x·[P1 P2] over all of K (registers), then y = scale·h·[Q1; Q2] + bias
    # streamed out in column blocks. x is read once and y written once. WRITE_H: h is stored too
    # (M × R1+R2, operand dtype), for the backward.
    scale = f32_of(scale_bits)
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc1, acc2 = _xa_rows(
        x_ptr, s_xm, s_xk, offs_m, M, 0, K,
        p1_ptr, R1, KT1, s_p1l, s_p1i, s_p1c, p2_ptr, R2, KT2, s_p2l, s_p2i, s_p2c,
        HAS_SECOND, R1P, R2P, PREC, EVEN_K, BLOCK_M, BLOCK_K,
    )
    op_ty = q1_ptr.dtype.element_ty
    h1 = acc1.to(op_ty)
    h2 = acc2.to(op_ty)
    if WRITE_H:
        _store_h(hout_ptr, offs_m, M, R1, R2, R1 + R2, h1, h2, HAS_SECOND, R1P, R2P)
    _hq_columns(
        h1, h2, 0, N, offs_m, M, N, y_ptr, s_ym, s_yn, bias_ptr, s_b, scale,
        q1_ptr, R1, KT1, s_q1l, s_q1n, s_q1c, q2_ptr, R2, KT2, s_q2l, s_q2n, s_q2c,
        HAS_SECOND, HAS_BIAS, R1P, R2P, PREC, BLOCK_M, BLOCK_N,
    )


@triton.jit(do_not_specialize=["M"])
def _wgrad_kernel(
    x_ptr, h_ptr, d_ptr, db_ptr,
    M, N, R, T_PER_SPLIT, h_col0,
    s_xm, s_xn, s_hs, s_hm, s_dsplit, s_dl, s_dn, s_dc, s_dbsplit,
    scale_bits,
    KT: tl.constexpr, HAS_DB: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr, SPLIT_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # D[offs_n, j] = scale·Σ_t x[t, offs_n]·h[t, h_col0 + j] over this program's slice of T, written
    # through the factor view (l, n, c) at partial pid_t (pid_t·s_dsplit); db[offs_n] =
    # Σ_t x[t, offs_n] likewise when HAS_DB.
    scale = f32_of(scale_bits)
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, RP)
    t_lo = pid_t * T_PER_SPLIT
    t_hi = tl.minimum(t_lo + T_PER_SPLIT, M)
    n_mask = offs_n < N
    op_ty = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t[:, None] < t_hi
        rows = offs_t.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows * s_xm + offs_n[None, :] * s_xn, mask=t_mask & n_mask[None, :], other=0.0)
        h = _load_h(h_ptr + rows * s_hm, t_mask, h_col0, j, R, s_hs, SPLIT_H).to(op_ty)
        acc = _dot(tl.trans(x), h, acc, PREC)
        if HAS_DB:
            colsum += tl.sum(x.to(tl.float32), axis=0)
    acc = acc * scale
    d_base = d_ptr + pid_t.to(tl.int64) * s_dsplit
    ptrs = d_base + offs_n[:, None] * s_dn + _rank_off(j, KT, s_dl, s_dc)[None, :]
    tl.store(ptrs, acc.to(d_ptr.dtype.element_ty), mask=n_mask[:, None] & (j[None, :] < R))
    if HAS_DB:
        db_base = db_ptr + pid_t.to(tl.int64) * s_dbsplit
        tl.store(db_base + offs_n, colsum.to(db_ptr.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=["M"])
def _dxa_kernel(
    gh_ptr, x_ptr, dx_ptr, p1_ptr, p2_ptr, d1_ptr, d2_ptr,
    M, K, R1, R2, T_PER_SPLIT,
    s_ghm, s_xm, s_xk,
    s_p1l, s_p1i, s_p1c, s_p2l, s_p2i, s_p2c,
    s_d1split, s_d1l, s_d1i, s_d1c, s_d2split, s_d2l, s_d2i, s_d2c,
    KT1: tl.constexpr, KT2: tl.constexpr, DKT1: tl.constexpr, DKT2: tl.constexpr, HAS_SECOND: tl.constexpr,
    TRAIN1: tl.constexpr, TRAIN2: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The backward's dx and dA in one pass over this program's columns (pid_k) of x and dx and its
    # slice of T (pid_t): dx[t, cols] = gh1[t]·P1[cols]ᵀ + gh2[t]·P2[cols]ᵀ (gh = g·Bᵀ, unsplit,
    # M × R1+R2, dx contiguous), and with TRAIN1 D1[cols] = Σ_t x[t, cols]ᵀ·gh1[t] (TRAIN2: D2 from
    # gh2), written through the factor view (l, i, c) at partial pid_t. dx needs no reduction (gh
    # holds the whole rank), so the x tile read for dA and the dx tile written come from the same
    # rows: the reads and the writes of the two passes this replaces overlap in one.
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = cols[None, :] < K
    j1 = tl.arange(0, R1P)
    j2 = tl.arange(0, R2P)
    op_ty = x_ptr.dtype.element_ty
    q1 = _load_q(p1_ptr, j1, cols, R1, K, KT1, s_p1l, s_p1i, s_p1c)
    q2 = tl.zeros((R2P, BLOCK_K), dtype=op_ty)
    if HAS_SECOND:
        q2 = _load_q(p2_ptr, j2, cols, R2, K, KT2, s_p2l, s_p2i, s_p2c)
    acc1 = tl.zeros((BLOCK_K, R1P), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, R2P), dtype=tl.float32)
    t_lo = pid_t * T_PER_SPLIT
    t_hi = tl.minimum(t_lo + T_PER_SPLIT, M)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t[:, None] < t_hi
        rows = offs_t.to(tl.int64)[:, None]
        g1 = tl.load(gh_ptr + rows * s_ghm + j1[None, :], mask=t_mask & (j1[None, :] < R1), other=0.0)
        dx = _dot(g1, q1, tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32), PREC)
        g2 = tl.zeros((BLOCK_T, R2P), dtype=op_ty)
        if HAS_SECOND:
            g2 = tl.load(gh_ptr + rows * s_ghm + R1 + j2[None, :], mask=t_mask & (j2[None, :] < R2), other=0.0)
            dx = _dot(g2, q2, dx, PREC)
        tl.store(dx_ptr + rows * K + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=t_mask & k_mask)
        x = tl.load(x_ptr + rows * s_xm + cols[None, :] * s_xk, mask=t_mask & k_mask, other=0.0)
        if TRAIN1:
            acc1 = _dot(tl.trans(x), g1, acc1, PREC)
        if TRAIN2:
            acc2 = _dot(tl.trans(x), g2, acc2, PREC)
    c_mask = cols[:, None] < K
    if TRAIN1:
        ptrs = d1_ptr + pid_t.to(tl.int64) * s_d1split + cols[:, None] * s_d1i + _rank_off(j1, DKT1, s_d1l, s_d1c)[None, :]
        tl.store(ptrs, acc1.to(d1_ptr.dtype.element_ty), mask=c_mask & (j1[None, :] < R1))
    if TRAIN2:
        ptrs = d2_ptr + pid_t.to(tl.int64) * s_d2split + cols[:, None] * s_d2i + _rank_off(j2, DKT2, s_d2l, s_d2c)[None, :]
        tl.store(ptrs, acc2.to(d2_ptr.dtype.element_ty), mask=c_mask & (j2[None, :] < R2))


@triton.jit
def _reduce_seg(w_ptr, o_ptr, n, splits, s_split, blk, BLOCK: tl.constexpr, SB: tl.constexpr):
    # o[i] = Σ_{s < splits} w[s·s_split + i] for this block of i, rounded to o's dtype. SB partials
    # are loaded at once: a loop of one load per partial waits out one memory latency per partial
    # (32 partials of rank 256 at T = 1: 6.7 µs on the H200 for 32 KB).
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    rows = tl.arange(0, SB)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, splits, SB):
        s = s0 + rows
        ptrs = w_ptr + s.to(tl.int64)[:, None] * s_split + idx[None, :]
        acc += tl.sum(tl.load(ptrs, mask=(s[:, None] < splits) & mask[None, :], other=0.0), axis=0)
    tl.store(o_ptr + idx, acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(
    w1_ptr, w2_ptr, w3_ptr, o1_ptr, o2_ptr, o3_ptr,
    n1, n2, n3, sp1, sp2, sp3, st1, st2, st3, NB1, NB2,
    NSEG: tl.constexpr, BLOCK: tl.constexpr, SB: tl.constexpr,
):
    # Up to three outputs, each the sum of the fp32 partials in its own workspace: blocks [0, NB1)
    # of the grid serve o1, the next NB2 o2, the rest o3. (Separate workspaces, and no code for
    # unused slots: under torch.compile every tensor a kernel writes must be a distinct argument.)
    pid = tl.program_id(0)
    if pid < NB1:
        _reduce_seg(w1_ptr, o1_ptr, n1, sp1, st1, pid, BLOCK, SB)
    else:
        if NSEG >= 2:
            if pid < NB1 + NB2:
                _reduce_seg(w2_ptr, o2_ptr, n2, sp2, st2, pid - NB1, BLOCK, SB)
            else:
                if NSEG >= 3:
                    _reduce_seg(w3_ptr, o3_ptr, n3, sp3, st3, pid - NB1 - NB2, BLOCK, SB)


# ---------------------------------------------------------------------------------------------
# Factor views
# ---------------------------------------------------------------------------------------------


class Factor(NamedTuple):
    """A factor read in place: rank column j = l·KT + c of long row i at t[l, i, c] (dims named below).

    ``dim_l`` is None for a plain 2-D factor (one term, KT = R).
    """

    t: Tensor
    R: int
    KT: int
    dim_l: int | None
    dim_long: int
    dim_c: int

    def strides(self, t: Tensor | None = None) -> tuple[int, int, int]:
        """(s_l, s_long, s_c) of ``t`` (default: the factor's own tensor) along this view's dims."""
        t = self.t if t is None else t
        s_l = t.stride(self.dim_l) if self.dim_l is not None else 0
        return s_l, t.stride(self.dim_long), t.stride(self.dim_c)

    @property
    def n_long(self) -> int:
        return self.t.shape[self.dim_long]

    def kt(self, t: Tensor | None = None) -> int:
        """The KT constexpr for reading ``t`` (default: the factor) through this view.

        Where the terms lie back to back (one term, or s_l = KT·s_c as in a contiguous (L, k, out))
        column j sits at j·s_c: one run of the padded rank, the longest contiguous loads.
        """
        t = self.t if t is None else t
        s_l, _, s_c = self.strides(t)
        if self.dim_l is None or t.shape[self.dim_l] == 1 or s_l == self.KT * s_c:
            return _rank_pad(self.R)
        return self.KT


def _stacked_long_mid(t: Tensor) -> Factor:
    """(L, long, k): S1s, U2s."""
    return Factor(t, t.shape[0] * t.shape[2], t.shape[2], 0, 1, 2)


def _stacked_long_last(t: Tensor) -> Factor:
    """(L, k, long): U1s, S2s."""
    return Factor(t, t.shape[0] * t.shape[1], t.shape[1], 0, 2, 1)


def _plain_a(A: Tensor) -> Factor:
    """(in, r)."""
    return Factor(A, A.shape[1], A.shape[1], None, 0, 1)


def _plain_b(B: Tensor) -> Factor:
    """(r, out)."""
    return Factor(B, B.shape[0], B.shape[0], None, 1, 0)


def _pow2_at_least(n: int) -> int:
    # (triton.next_power_of_2 costs microseconds a call through its constexpr wrapper.)
    return 1 << max(0, n - 1).bit_length()


def _rank_pad(R: int) -> int:
    return max(16, _pow2_at_least(R))


def _m_bucket(M) -> int | None:
    """T bucket of the tuning cache: 16, 32, ..., 16384 (None for a symbolic T)."""
    if not isinstance(M, int):
        return None
    return min(max(16, _pow2_at_least(M)), _M_BUCKET_MAX)


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    n = _SMS.get(device)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _SMS[device] = n  # interpreter: a small "GPU", so small test shapes take the split paths
    return n


# TMA h·B (_hq_tma_kernel): Hopper and later, 16-bit operands. Descriptors built on the device take
# their workspace from triton's allocator, a per-thread setting (a ContextVar) that is unset by
# default: eager calls set one (_ensure_allocator); under torch.compile Inductor's launcher sets its
# own before it launches a kernel that asks for this workspace (torch 2.11 does).
try:
    from triton.runtime import _allocation

    if not hasattr(_allocation, "_allocator"):  # pragma: no cover - an allocator API this module does not know
        _allocation = None
except ImportError:  # pragma: no cover - triton without device-side tensor descriptors
    _allocation = None
# Tests set this to make every eligible forward plan use _hq_tma_kernel (at any T, untimed).
_HQ_TMA_FORCE = False
# Tests: the backward's dx and dA always through the one-pass _dxa where it applies (at any T).
_DXA_FORCE = False
# The plans time _dxa for 16-bit operands up to this padded rank (both A factors). Measured on the
# H200 (do_bench µs of dx and dA with their partial sums, two passes → best _dxa): bf16 8192², k =
# 16, T = 4096 52.3 → 45.8; 4096², k = 64 45.3 → 33.7 (T = 16384: 118.2 → 100.8); 768→3072, k = 64
# 19.8 → 16.1. At rank 256 (8192², L = 2, k = 64) it lost (87.8 → 126.1 at best: its (BLOCK_K ×
# 256) dA accumulator leaves narrow column blocks), and in fp32 (tf32x3) on all four layers.
_DXA_MAX_RANK = 128
_TMA_DEVICES: dict = {}


def _tma_device(device: torch.device) -> bool:
    """Whether _hq_tma_kernel can run on ``device`` (the interpreter runs it on the CPU)."""
    if _allocation is None:
        return False
    if _INTERPRET:
        return True
    ok = _TMA_DEVICES.get(device)
    if ok is None:
        ok = _TMA_DEVICES[device] = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return ok


def _workspace(size: int, alignment: int, stream) -> Tensor:
    # (The caching allocator's blocks are 512-byte aligned, above the 128 bytes a descriptor needs.)
    return torch.empty(size, dtype=torch.int8, device="cpu" if _INTERPRET else "cuda")


def _ensure_allocator() -> None:
    """Give triton an allocator for device-built descriptors in this thread, if it has none (a new
    thread, autograd's included, starts without one)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_workspace)


def _tma_rows(f: Factor) -> int | None:
    """Row stride of the B factor f read as a plain (R × long) row-major matrix through a TMA
    descriptor, or None where it is not one: terms not back to back, long dim not of unit stride,
    or rows not 16-byte aligned (16-bit elements)."""
    s_l, s_long, s_c = f.strides()
    if s_long != 1 or (2 * s_c) % 16:
        return None
    if f.dim_l is not None and f.t.shape[f.dim_l] > 1 and s_l != f.KT * s_c:
        return None
    return s_c


def _tma_layout(b: list[Factor], N: int, dtype: torch.dtype) -> tuple[int, int] | None:
    """(row stride of the B factors, largest rank slice dividing both ranks) where _hq_tma_kernel
    can read them, else None."""
    if dtype not in (torch.bfloat16, torch.float16) or (2 * N) % 16:
        return None
    rows = {_tma_rows(f) for f in b}
    if None in rows or len(rows) != 1:
        return None
    bk = next((bk for bk in (64, 32, 16) if all(f.R % bk == 0 for f in b)), None)
    return None if bk is None else (rows.pop(), bk)


def _offsets_aligned(*ts: Tensor) -> bool:
    """Whether each tensor's offset into its storage is a multiple of 16 bytes: under tracing, where
    there is no data pointer, what TMA's alignment rule can be checked against."""
    return all(t.storage_offset() * t.element_size() % 16 == 0 for t in ts)


# tl.dot input precision of an fp32 product when torch allows no TF32: 2, "tf32x3" (each operand
# split into a TF32 high part and a TF32 remainder, three tensor-core products, fp32 accumulation),
# whose error measured at or below that of fp32 FMAs ("ieee", 0) and of cuBLAS's fp32 GEMM on the
# H200 (headline layer, T = 4096: 2.9e-7 against 1.6e-6 and 5.9e-7), at up to twice the speed
# (docs/benchmarks.md). "ieee" stays selectable here.
_FP32_HIGHEST = 2


def _precision(dtype: torch.dtype) -> int:
    """The PREC constexpr for operands of ``dtype``: 1 (tf32) where torch allows TF32, else _FP32_HIGHEST."""
    if dtype != torch.float32:
        return 0
    return 1 if _tf32() else _FP32_HIGHEST


def _tf32() -> bool:
    """Whether torch allows TF32 for CUDA fp32 matmuls."""
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec is None:  # torch without the fp32_precision API
        return bool(matmul.allow_tf32)
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "none")
    return prec == "tf32"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pair(factors: list[Factor]) -> tuple[Factor, Factor, bool]:
    """The first factor, the second (or a zero-rank stand-in) and whether there is a second."""
    f1 = factors[0]
    if len(factors) == 2:
        return f1, factors[1], True
    return f1, f1._replace(R=0), False


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


class _XaCfg(NamedTuple):
    BLOCK_M: int
    BLOCK_K: int
    warps: int
    stages: int
    # Programs along the long dim (fp32 partials that the consumers sum); 0: the default, which
    # splits only at small T.
    split: int = 0


class _HqCfg(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    warps: int
    stages: int
    # Column blocks a program walks: 0, as many as spread the grid over ~4 programs an SM; 1, one
    # (a plain 2-D grid, the most programs).
    per_prog: int = 0


class _HqPCfg(NamedTuple):
    """A config of _hq_persistent_kernel: output tile, rank slice, and programs per SM."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    warps: int
    stages: int
    per_sm: int = 1


class _HqTCfg(NamedTuple):
    """A config of _hq_tma_kernel: output tile, rank slice, warps, stages, programs per SM, the
    number of TMA stores the epilogue splits a tile's columns into."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    warps: int
    stages: int
    per_sm: int = 1
    epi: int = 1


class _FusedCfg(NamedTuple):
    BLOCK_M: int
    BLOCK_K: int
    BLOCK_N: int
    warps: int
    stages: int


class _WgCfg(NamedTuple):
    BLOCK_N: int
    BLOCK_T: int
    warps: int
    stages: int


class _DxaCfg(NamedTuple):
    """A config of _dxa_kernel: rows a step, columns a program, warps, stages, and about how many
    programs an SM the split over T aims for."""

    BLOCK_T: int
    BLOCK_K: int
    warps: int
    stages: int
    per_sm: int = 2


_SMEM = 200 * 1024  # shared memory a config may plan for (the H100/H200 give a block 227 KB)


def _fit(stage_bytes: int, stages: int) -> int:
    """Pipeline depth that fits in _SMEM (at least 1)."""
    return max(1, min(stages, _SMEM // max(1, stage_bytes)))


def _xa_candidates(M, rp: int, es: int, splits: bool = False) -> list[_XaCfg]:
    """Configs of _xa for M rows, padded rank rp (both factors), element size es; with ``splits``
    (the forward, whose one consumer sums partials once per row block) also split-K variants for
    large T, where the row blocks alone leave SMs idle or too few bytes in flight."""
    if _INTERPRET:
        return [_XaCfg(16, 32, 4, 1)]
    fp32 = es == 4
    # Accumulator (BLOCK_M × rp fp32) at most 64 registers a thread (128 for 16-bit on 8 warps).
    if isinstance(M, int) and M < _TUNE_MIN_M:
        if not fp32 and rp >= 256 and M >= 256:
            # 64-row blocks read the (K × rp) factor a quarter as often as 16-row ones (H200 bf16,
            # 8192², L = 2, k = 64, T = 256: x·A 10.2 → 6.8 µs; its partials' sum 2.1 → 3.9 µs).
            cands = [_XaCfg(64, 64, 8, 3)]
        else:
            cands = [_XaCfg(16, 64 if fp32 else 128, 4, 3)]
    elif fp32:
        cands = [_XaCfg(32, 64, 4, 3), _XaCfg(64, 32, 4, 3), _XaCfg(16, 64, 4, 3)]
    elif rp >= 256:
        cands = [_XaCfg(64, 64, 8, 4), _XaCfg(32, 128, 4, 3), _XaCfg(64, 128, 8, 3), _XaCfg(128, 64, 8, 3)]
    else:
        cands = [_XaCfg(32, 128, 4, 4), _XaCfg(64, 128, 4, 4), _XaCfg(128, 64, 8, 4), _XaCfg(128, 128, 8, 3)]
    out = []
    for c in cands:
        bm = c.BLOCK_M
        while bm > 16 and bm * rp > (2048 if fp32 else 4096) * c.warps:
            bm //= 2
        bk = c.BLOCK_K
        out.append(_XaCfg(bm, bk, c.warps, _fit(es * (bm * bk + bk * rp), c.stages)))
    if splits and isinstance(M, int) and M >= _TUNE_MIN_M:
        # Split-K variants of the 64-row config and, for large ranks (compute-heavy, where bigger
        # tiles pay), of the 128-row one.
        # (128 rows: the factor tile is then a smaller share of each stage's bytes.)
        bases = [next((c for c in out if c.BLOCK_M == 64), out[0])]
        bases += [c for c in out if c.BLOCK_M == 128 and (rp >= 128 or c.BLOCK_K == 128)]
        out += [b._replace(split=s) for b in bases for s in (2, 4)]
    return list(dict.fromkeys(out))


def _hq_candidates(M, rp: int, es: int, summed: bool = False) -> list[_HqCfg]:
    """Configs of _hq for M rows and padded rank rp (both factors); ``summed``: its h is one
    tensor of the operand dtype that split partials were summed into (which changes the configs
    below _TUNE_MIN_M rows only)."""
    if _INTERPRET:
        return [_HqCfg(16, 32, 4, 1)]
    fp32 = es == 4
    if summed and not fp32 and 64 < rp < 256 and isinstance(M, int) and 256 <= M < _TUNE_MIN_M:
        # Rank 128 reading a summed h: 64 × 64 blocks re-read B a quarter as often as 16-row ones
        # (H200 bf16, 4096², k = 64, T = 256, graph µs: forward 10.6 → 9.5, forward+backward
        # 33.7 → 31.6 with the backward's dx = gh·Aᵀ on the same blocks).
        return [_HqCfg(64, 64, 4, 2)]
    if isinstance(M, int) and M < _TUNE_MIN_M:
        # Column-block width by rank, from a sweep on the H200 at T = 1, 16, 256 (8192², L = 2, k = 64
        # and 4096², k = 64): at rank 256 narrower blocks (more programs) took bf16 T = 256 from
        # 40.2 to 33.7 µs and fp32 from 160 to 86; fp32 at rank 128 was fastest at 32 columns.
        if fp32:
            bn = 32 if rp == 128 else 64
        elif rp >= 256 and M >= 64:
            # Rank 256 from 64 rows on: taller row blocks read the (rp × N) factor fewer times (H200
            # bf16, 8192², L = 2, k = 64: h·B at T = 256 11.9 → 5.5 µs in 128 × 128 blocks on 8 warps,
            # at T = 64 4.5 → 3.3 µs in 64 × 64 blocks). At ranks 32 and 128 those blocks were slower
            # (4096², k = 64, T = 256: 7.8 → 11.3-13.0 µs).
            return [_HqCfg(128, 128, 8, 2)] if M >= 256 else [_HqCfg(64, 64, 4, 2)]
        else:
            bn = 64 if rp >= 256 else 128
        return [_HqCfg(16, bn, 4, 2)]
    if fp32:
        cands = [_HqCfg(32, 128, 4, 2), _HqCfg(64, 64, 4, 2), _HqCfg(32, 64, 4, 3)]
    else:
        cands = [_HqCfg(64, 128, 4, 3), _HqCfg(128, 128, 8, 3), _HqCfg(64, 256, 8, 3)]
        if rp >= 128:
            # Large ranks: the product is compute-heavy, and 64-row tiles (4 warps) or 128-row ones
            # (8 warps) keep Hopper's warpgroup MMA whole (a 32-row tile falls back to mma.sync).
            cands += [_HqCfg(128, 128, 8, 3, per_prog=1), _HqCfg(64, 128, 4, 3, per_prog=1)]
    # h (BLOCK_M × rp) stays in registers, and the accumulator (BLOCK_M × BLOCK_N fp32): at most
    # ~160 registers (640 bytes) a thread for the two. Shared memory holds a (rp × BLOCK_N) tile of
    # B per stage and the epilogue's (BLOCK_M × BLOCK_N).
    out = []
    for c in cands:
        bm, bn = c.BLOCK_M, c.BLOCK_N
        while bm > 16 and es * bm * rp + 4 * bm * bn > 640 * 32 * c.warps:
            bm //= 2
        while bn > 64 and es * rp * bn + 4 * bm * bn > _SMEM // 2:
            bn //= 2
        stages = _fit(es * rp * bn, c.stages) if 4 * bm * bn < _SMEM else 1
        stages = max(1, min(stages, (_SMEM - 4 * bm * bn) // (es * rp * bn)))
        out.append(_HqCfg(bm, bn, c.warps, stages, c.per_prog))
    # The same first config on a plain 2-D grid, and for large ranks a smaller tile (more programs
    # resident per SM): the output writes need many in flight.
    out.append(out[0]._replace(per_prog=1))
    if rp >= 128:
        small = _HqCfg(64 if not fp32 else 32, 64, 4, 2)
        out += [small, small._replace(per_prog=1)]
    if rp >= 64:
        # The persistent GEMM over the rank (see _hq_persistent_kernel).
        if fp32:
            out += [_HqPCfg(64, 64, 32, 4, 3, 2), _HqPCfg(128, 64, 32, 8, 3, 1)]
        else:
            out += [_HqPCfg(128, 128, 64, 8, 3, 1), _HqPCfg(128, 128, 64, 4, 3, 1), _HqPCfg(64, 128, 64, 4, 3, 2),
                    _HqPCfg(128, 256, 64, 8, 2, 1)]  # fmt: skip
    return list(dict.fromkeys(out))


def _hq_tma_candidates(bk: int) -> list[_HqTCfg]:
    """Configs of _hq_tma_kernel for B factors whose ranks the slice ``bk`` divides (16-bit)."""
    if _INTERPRET:
        return [_HqTCfg(16, 32, 16, 4, 1, 1, 2)]
    if bk == 64:
        # From sweeps on the H200 (8192², L = 2, k = 64; 4096², k = 64; 768→3072, k = 64; T = 4096
        # and 16384): the 128 × 256 tile in 8 warps with two half-width stores won every time, by
        # 3-25% over 128 × 128 tiles two programs an SM; 3 or 4 stages within 3% of each other.
        return [_HqTCfg(128, 256, 64, 8, 4, 1, 2), _HqTCfg(128, 256, 64, 8, 3, 1, 2)]
    return [_HqTCfg(64, 256, bk, 4, 4, 2, 2), _HqTCfg(128, 128, bk, 4, 4, 2, 2)]


def _fused_candidates(rp: int, es: int) -> list[_FusedCfg]:
    if _INTERPRET:
        return [_FusedCfg(16, 32, 32, 4, 1)]
    if es == 4:
        return [_FusedCfg(32, 64, 64, 4, 3), _FusedCfg(16, 64, 128, 4, 3)]
    cands = [_FusedCfg(32, 128, 128, 4, 4), _FusedCfg(64, 128, 128, 4, 3), _FusedCfg(16, 128, 256, 4, 4)]
    return [c._replace(stages=_fit(es * (c.BLOCK_M * c.BLOCK_K + c.BLOCK_K * rp), c.stages)) for c in cands]


def _wg_candidates(M, rp: int, es: int) -> list[_WgCfg]:
    if _INTERPRET:
        return [_WgCfg(32, 32, 4, 1)]
    fp32 = es == 4
    if isinstance(M, int) and M < _TUNE_MIN_M:
        cands = [_WgCfg(64, 32, 4, 2)]
    elif fp32:
        cands = [_WgCfg(64, 32, 4, 3), _WgCfg(128, 32, 8, 3), _WgCfg(32, 64, 4, 3)]
    else:
        cands = [_WgCfg(128, 64, 4, 3), _WgCfg(256, 64, 8, 3), _WgCfg(64, 128, 4, 3)]
    out = []
    for c in cands:
        bn = c.BLOCK_N
        while bn > 32 and bn * rp > (2048 if fp32 else 4096) * c.warps:
            bn //= 2
        out.append(_WgCfg(bn, c.BLOCK_T, c.warps, _fit(c.BLOCK_T * (es * bn + 4 * rp), c.stages)))
    return list(dict.fromkeys(out))


def _dxa_candidates(rp: int, es: int) -> list[_DxaCfg]:
    """Configs of _dxa for a padded rank rp (both A factors), element size es: a (BLOCK_T × BLOCK_K)
    dx accumulator and a (BLOCK_K × rp) dA one, at most ~128 fp32 registers a thread together.

    From sweeps on the H200 (bf16; 8192², k = 16; 4096², k = 64; 768→3072, k = 64; T = 4096 and
    16384): 64-row steps on 4 warps won every time, 8 warps (64 × 128 or 128 × 64) never; two
    programs an SM at T = 4096, four at T = 16384 (8192², k = 16: 188.0 against 146.8 µs), eight
    never (150.7 there)."""
    if _INTERPRET:
        return [_DxaCfg(16, 32, 4, 1)]
    if es == 4:  # (the plans take _dxa in 16-bit only; fp32 here serves _DXA_FORCE)
        return [_DxaCfg(32, 64, 4, 3)]
    cands = [_DxaCfg(64, 128, 4, 3, per_sm=p) for p in (2, 4)]
    out = []
    for c in cands:
        bk = c.BLOCK_K
        while bk > 32 and 4 * (c.BLOCK_T * bk + bk * rp) > 512 * 32 * c.warps:
            bk //= 2
        out.append(c._replace(BLOCK_K=bk, stages=_fit(es * c.BLOCK_T * (bk + rp), c.stages)))
    return list(dict.fromkeys(out))


# Config picked per (kernel, layer dims, dtype, precision, T bucket) by timing the candidates once.
_TUNED: dict = {}
# What the timing saw: {key: {config: ms}} (read by the benchmark and the notes).
TUNE_LOG: dict = {}


def _can_time(trace: bool, M) -> bool:
    """Whether a plan for M rows may time candidates now: eager, not capturing a CUDA graph, and
    M large enough for the GPU time to matter."""
    return (
        _TUNE
        and not trace
        and isinstance(M, int)
        and M >= _TUNE_MIN_M
        and not torch.cuda.is_current_stream_capturing()
    )


def _pick(key, cands: list, make_run, allowed: bool):
    """The candidate to use for ``key``: the only one, the one timed before, or (first use, when
    ``allowed``) the fastest of ``make_run(c)()`` timed with do_bench; else the first.

    Inside _compile_ahead (a plan's dry build) it times nothing: it runs every candidate that the
    real build would time, so that their kernels compile together, and answers as above without
    the timing (a later choice that depends on this one may compile a candidate the real build
    never runs, or miss one, which then compiles when it is first launched)."""
    if _compiling_ahead():
        if allowed and key[-1] is not None and key not in _TUNED:
            for c in cands:
                try:
                    make_run(c)()
                except Exception:  # noqa: BLE001 - the real build times or drops it
                    pass
        return _tuned_among(key, cands)
    if len(cands) == 1:
        return cands[0]
    if key[-1] is None or not allowed:  # (the last entry is the T bucket: None for a symbolic T)
        return _tuned_among(key, cands)
    if key in _TUNED:
        return _TUNED[key]
    times = {}
    for c in cands:
        try:
            run = make_run(c)
            run()  # compile outside the timing
        except OutOfResources:  # (shared memory or registers): not a candidate
            continue
        times[c] = float(triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median"))
    if not times:
        return cands[0]
    best = min(times, key=times.get)
    _TUNED[key] = best
    TUNE_LOG[key] = times
    return best


# Calls already tuned on stand-ins while tracing: (function, operands' shapes/strides/dtypes, flags).
_TRACE_TUNED: set = set()


def _meta(a):
    return (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, Tensor) else a


def _tune_while_tracing(fn, *args, **kwargs) -> None:
    """Under tracing (torch.compile), where a plan cannot time anything: call ``fn`` once, outside
    every tracing mode, on real tensors of the traced operands' shapes, strides and dtypes (random
    values from a private generator, so the caller's RNG stream is untouched). Its eager plan times
    the candidates, and the traced plan built next takes the choices it recorded (_tuned_among) as
    if an eager call had come first (an eager plan of the same shapes shares them). Only for static shapes of
    ≥ _TUNE_MIN_M rows (args[0]'s) on CUDA, once per call signature; a failure here is logged and
    leaves the traced plan untuned."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if not _can_time(False, args[0].shape[0]) or any(t.device.type != "cuda" for t in tensors):
        return
    if not all(isinstance(d, int) for t in tensors for d in (*t.shape, *t.stride())):
        return  # (a symbolic shape: no T bucket to tune)
    key = (fn.__name__, tuple(_meta(a) for a in args), tuple((k, _meta(v)) for k, v in sorted(kwargs.items())))
    if key in _TRACE_TUNED:
        return
    _TRACE_TUNED.add(key)
    device = tensors[0].device

    def stand_in_call():
        with _disable_current_modes(), torch.cuda.device(device):
            gen = torch.Generator(device=device).manual_seed(0)

            def real(a):
                if not isinstance(a, Tensor):
                    return a
                t = torch.empty_strided(tuple(a.shape), a.stride(), dtype=a.dtype, device=a.device)
                return t.normal_(generator=gen)

            fn(*map(real, args), **{k: real(v) for k, v in kwargs.items()})

    try:
        # On a thread of its own: the tracer's thread-local state stays behind. On the tracing
        # thread every launch and do_bench step cost enough host time to show in the timings
        # (H200, bf16 8192², k = 16, T = 4096: the split-2 x·A timed 54.0 µs there, 28.4 eager), which
        # skewed the choices (4096², k = 64: the fused path, 72.5 µs compiled against 38.4 eager).
        with ThreadPoolExecutor(1) as pool:
            pool.submit(contextvars.copy_context().run, stand_in_call).result()
    except Exception as e:  # noqa: BLE001 - tracing goes on untuned
        _log.warning("panther: timing %s for a traced call failed (%s: %s); its plan takes untuned configs",
                     fn.__name__, type(e).__name__, e)  # fmt: skip


def _tuned_among(key, cands: list):
    """The config timed fastest for ``key`` among ``cands`` (the one recorded in _TUNED where it is
    among them), else the first."""
    best = _TUNED.get(key)
    if best in cands:
        return best
    times = TUNE_LOG.get(key, {})
    timed = [c for c in cands if c in times]
    return min(timed, key=times.get) if timed else cands[0]


# ---------------------------------------------------------------------------------------------
# Plans: the launches of one call, fixed for its shapes and strides
# ---------------------------------------------------------------------------------------------


def _contig_strides(shape) -> tuple[int, ...]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return tuple(reversed(out))


def _view_of(f: Factor, shape) -> tuple[tuple[int, int, int], int]:
    """((s_l, s_long, s_c), KT) of a contiguous tensor of ``shape`` read through f's view."""
    st = _contig_strides(shape)
    s_l = st[f.dim_l] if f.dim_l is not None else 0
    s_c = st[f.dim_c]
    whole = f.dim_l is None or shape[f.dim_l] == 1 or s_l == f.KT * s_c
    return (s_l, st[f.dim_long], s_c), (_rank_pad(f.R) if whole else f.KT)


def _ptrs(factors: list[Factor]) -> tuple[Tensor, Tensor]:
    """The two factor tensors a kernel takes (the first twice when there is one)."""
    return (factors[0].t, factors[1].t if len(factors) == 2 else factors[0].t)


def _sig(factors: list[Factor]) -> tuple:
    return tuple((f.R, f.KT, f.dim_long) for f in factors)


class _Xa:
    """h = scale·src·[P1 P2] for src (M × K): one _xa launch and the layout of the h it writes."""

    def __init__(
        self, M, K, s_src, a: list[Factor], scale, dtype, prec, n_sm, cfg: _XaCfg, fast, trace, granule=None
    ):
        # granule: the smallest slice of K a split program takes (_K_GRANULE by default).
        granule = granule or _K_GRANULE
        f1, f2, has2 = _pair(a)
        R1, R2 = f1.R, f2.R
        BM, BK = cfg.BLOCK_M, cfg.BLOCK_K
        row_blocks = _cdiv(M, BM)
        split = 1
        if cfg.split:
            split = max(1, min(cfg.split, K // _K_GRANULE))
        elif isinstance(M, int) and M < _TUNE_MIN_M and row_blocks < n_sm:
            # Too few row blocks to fill the GPU: split the reduction over K. (Not for large T,
            # where the row blocks nearly fill it: every consumer of h would read the partials.)
            split = max(1, min(_cdiv(2 * n_sm, row_blocks), _cdiv(K, granule)))
        k_per = _cdiv(_cdiv(K, split), granule) * granule
        split = _cdiv(K, k_per)
        R = R1 + R2
        self.cfg = cfg
        self.split = split
        # Unsplit, h is written in the operand dtype (as the reference rounds x·A); split, as fp32
        # partials (split, M, R) that the consumers sum.
        self.h_dtype = dtype if split == 1 else torch.float32
        self.h_shape = (M, R) if split == 1 else (split, M, R)
        self.s_hs, self.s_hm = M * R, R
        even_k = K % BK == 0 and k_per % BK == 0
        self.launch = _Launch(
            _xa_kernel, (row_blocks, split), 4,
            (M, K, R1, R2, k_per, *s_src, self.s_hs, self.s_hm, *f1.strides(), *f2.strides(), _f32_bits(scale)),
            {"KT1": f1.kt(), "KT2": f2.kt(), "HAS_SECOND": has2, "R1P": _rank_pad(R1), "R2P": _rank_pad(R2), "PREC": prec,
                 "EVEN_K": even_k, "BLOCK_M": BM, "BLOCK_K": BK},
            {"num_warps": cfg.warps, "num_stages": cfg.stages}, fast, trace,
        )  # fmt: skip

    def new_h(self, device) -> Tensor:
        return torch.empty(self.h_shape, device=device, dtype=self.h_dtype)


def _hq_groups(M, N, cfg: _HqCfg, n_sm: int) -> int:
    """Column ranges of an _hq_kernel grid, so the number of its programs that read each row of h.
    Each program keeps its rows of h and walks a range of column blocks: about 4 programs an SM (or,
    per_prog = 1, one column block each)."""
    col_blocks = _cdiv(N, cfg.BLOCK_N)
    if cfg.per_prog == 1:
        return col_blocks
    return max(1, min(col_blocks, _cdiv(4 * n_sm, _cdiv(M, cfg.BLOCK_M))))


def _hq_launch(
    M, N, xa: _Xa, b: list[Factor], s_y, has_bias, s_b, scale, prec, n_sm, cfg, fast, trace, write_h=False, s_q=0
) -> _Launch:
    """out (M × N, strides s_y) = scale·h·[Q1; Q2] + bias for the h ``xa`` writes (and, with
    ``write_h``, h summed over its partials into an (M × R) tensor of the operand dtype).
    ``cfg``: an _HqCfg (_hq_kernel), an _HqPCfg (_hq_persistent_kernel) or an _HqTCfg
    (_hq_tma_kernel: h unsplit, out contiguous, B factors of row stride ``s_q``, no write_h);
    same tensor arguments."""
    f1, f2, has2 = _pair(b)
    if isinstance(cfg, _HqTCfg):
        tiles = _cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_N)
        progs = max(1, min(tiles, cfg.per_sm * n_sm))
        return _Launch(
            _hq_tma_kernel, (progs,), 6, (M, N, f1.R, f2.R, progs, xa.s_hm, s_q, s_b, _f32_bits(scale)),
            {"HAS_SECOND": has2, "HAS_BIAS": has_bias, "PREC": prec, "BLOCK_M": cfg.BLOCK_M,
                 "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "EPI": cfg.epi},
            {"num_warps": cfg.warps, "num_stages": cfg.stages}, fast, trace,
        )  # fmt: skip
    if isinstance(cfg, _HqPCfg):
        tiles = _cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_N) if isinstance(M, int) else cfg.per_sm * n_sm
        progs = max(1, min(tiles, cfg.per_sm * n_sm))
        return _Launch(
            _hq_persistent_kernel, (progs,), 6,
            (M, N, f1.R, f2.R, progs, xa.s_hs, xa.s_hm, *s_y, s_b, *f1.strides(), *f2.strides(), _f32_bits(scale)),
            {"KT1": f1.kt(), "KT2": f2.kt(), "HAS_SECOND": has2, "HAS_BIAS": has_bias, "PREC": prec, "SPLIT_H": xa.split,
                 "WRITE_H": write_h, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K},
            {"num_warps": cfg.warps, "num_stages": cfg.stages}, fast, trace,
        )  # fmt: skip
    row_blocks = _cdiv(M, cfg.BLOCK_M)
    col_blocks = _cdiv(N, cfg.BLOCK_N)
    n_per = _cdiv(col_blocks, _hq_groups(M, N, cfg, n_sm)) * cfg.BLOCK_N
    return _Launch(
        _hq_kernel, (row_blocks, _cdiv(N, n_per)), 6,
        (M, N, f1.R, f2.R, n_per, xa.s_hs, xa.s_hm, *s_y, s_b, *f1.strides(), *f2.strides(), _f32_bits(scale)),
        {"KT1": f1.kt(), "KT2": f2.kt(), "HAS_SECOND": has2, "HAS_BIAS": has_bias, "R1P": _rank_pad(f1.R), "R2P": _rank_pad(f2.R),
             "PREC": prec, "SPLIT_H": xa.split, "WRITE_H": write_h, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N},
        {"num_warps": cfg.warps, "num_stages": cfg.stages}, fast, trace,
    )  # fmt: skip


def _ensure_tma(launch: _Launch) -> None:
    """Before a (timing) run of ``launch``: the allocator a TMA kernel needs."""
    if launch.fn is _hq_tma_kernel:
        _ensure_allocator()


def _fused_launch(M, K, N, s_x, s_y, a, b, has_bias, s_b, scale, prec, cfg: _FusedCfg, fast, trace, write_h=False) -> _Launch:
    p1, p2, has2 = _pair(a)
    q1, q2, _ = _pair(b)
    # One KT per pair serves its P and its Q: where they differ, the true columns per term.
    kt1 = p1.kt() if p1.kt() == q1.kt() else p1.KT
    kt2 = p2.kt() if p2.kt() == q2.kt() else p2.KT
    return _Launch(
        _fused_kernel, (_cdiv(M, cfg.BLOCK_M),), 8,
        (M, K, N, p1.R, p2.R, *s_x, *s_y, s_b, *p1.strides(), *p2.strides(), *q1.strides(), *q2.strides(),
         _f32_bits(scale)),
        {"KT1": kt1, "KT2": kt2, "HAS_SECOND": has2, "HAS_BIAS": has_bias, "R1P": _rank_pad(p1.R), "R2P": _rank_pad(p2.R),
             "PREC": prec, "EVEN_K": K % cfg.BLOCK_K == 0, "WRITE_H": write_h, "BLOCK_M": cfg.BLOCK_M, "BLOCK_K": cfg.BLOCK_K,
             "BLOCK_N": cfg.BLOCK_N},
        {"num_warps": cfg.warps, "num_stages": cfg.stages}, fast, trace,
    )  # fmt: skip


def _reduce_launch(segs: list[tuple[int, int, int]], fast: bool, trace: bool) -> _Launch:
    """One _reduce_kernel launch: for up to three (n, splits, split stride) sets of fp32 partials,
    o = Σ partials (n elements each), in the dtype of o. Tensors: (w1, w2, w3, o1, o2, o3)."""
    sb = min(_REDUCE_SB, _pow2_at_least(max(sp for _, sp, _ in segs)))
    block = 16 if _INTERPRET else max(128, _REDUCE_TILE // sb)
    ns, sps, sts = zip(*(list(segs) + [(0, 0, 0)] * (3 - len(segs))))
    nbs = [_cdiv(n, block) for n in ns]
    return _Launch(
        _reduce_kernel, (sum(nbs),), 6, (*ns, *sps, *sts, nbs[0], nbs[1]), {"NSEG": len(segs), "BLOCK": block, "SB": sb},
        {"num_warps": 4, "num_stages": 1}, fast, trace,
    )  # fmt: skip


def _run_reduce(red: _Launch, ws: list[Tensor], outs: list[Tensor]) -> None:
    """Launch ``red`` (_reduce_launch) on its partials' workspaces ``ws`` and outputs ``outs``, the
    unused slots filled with ws[0] (no code reads or writes them)."""
    red(*ws, *[ws[0]] * (3 - len(ws)), *outs, *[ws[0]] * (3 - len(outs)))


def _fine_split(M, rp: int, es: int) -> bool:
    """Whether an _xa over a factor pair of padded rank rp splits its long dim into slices of one
    BLOCK_K rather than _K_GRANULE: fp32 at ranks ≥ _XA_FP32_FINE_MIN_RANK below _TUNE_MIN_M rows,
    so each program loads its slice of the factor at once rather than in a chain of steps."""
    return es == 4 and rp >= _XA_FP32_FINE_MIN_RANK and isinstance(M, int) and M < _TUNE_MIN_M


def _sum_first(M, split: int, R: int, rows: int, limit: int) -> bool:
    """Whether ``split`` fp32 partials of an (M × R) h are summed once, by one _reduce launch,
    before their consumers rather than by every consumer program: below _TUNE_MIN_M rows, where
    ``rows`` rows of every partial come to ``limit`` bytes or more.

    Measured on the H200 (bf16, graph µs, without → with): the forward at 8192², L = 2, k = 64
    (rank 256) 19.6 → 9.2 at T = 1 (eager 9.5), 22.2 → 10.8 at T = 16, 35.0 → 25.9 at T = 256; but
    at rank 32 and 128 the extra launch cost more than it saved (8192², k = 16, T = 16: 6.9 → 8.0;
    4096², k = 64, T = 16: 7.1 → 8.1), hence a limit per row of h there. The backward gained at every
    T ≥ 16 of the four layers measured (its dA pass reads every partial of its rows too): 8192²,
    L = 2, k = 64, T = 256 80.3 → 40.1; 4096², k = 64, T = 256 55.3 → 25.3; 8192², k = 16, T = 16
    16.2 → 12.5."""
    return isinstance(M, int) and M < _TUNE_MIN_M and split > 1 and min(M, rows) * split * R * 4 >= limit


class _ForwardPlan:
    """y = scale·(x·A)·B + bias: the fused kernel, or _xa then _hq. With ``want_h`` a call returns
    (y, h), h = x·A (M × R, operand dtype) for the backward, which then makes no pass over x for it."""

    def __init__(
        self, x: Tensor, a: list[Factor], b: list[Factor], bias, scale, path, trace: bool, fast: bool, want_h=False
    ):
        if path not in (None, "fused", "split"):
            raise ValueError(f"path must be None, 'fused' or 'split', got {path!r}")
        M, K = x.shape
        N = b[0].n_long
        dtype = x.dtype
        es = dtype.itemsize
        rp = sum(_rank_pad(f.R) for f in a)
        prec = _precision(dtype)
        if es == 4 and rp <= _FWD_IEEE_MAX_RANK and isinstance(M, int) and M < _TUNE_MIN_M:
            # Small ranks below _TUNE_MIN_M rows: full fp32 FMA products (the most precise mode,
            # right under any TF32 setting) instead of three TF32 ones. H200, 8192², k = 16, graph
            # µs: forward 9.2 → 7.1 at T = 1, 21.9 → 17.9 at T = 256; at rank 128 FMAs were slower
            # (4096², k = 64, T = 1: 9.4 → 10.6), and so was the backward at rank 32.
            prec = 0
        s_x = (x.stride(0), x.stride(1))
        s_y = (N, 1)
        has_bias = bias is not None
        s_b = bias.stride(0) if has_bias else 0
        n_sm = _num_sms(x.device)
        self.M, self.N, self.dtype = M, N, dtype
        self.R = sum(f.R for f in a)
        self.want_h = want_h
        dims = (K, N, _sig(a), _sig(b), dtype, prec, _m_bucket(M))
        pa, pb = _ptrs(a), _ptrs(b)
        tune = _can_time(trace, M)
        if tune:  # buffers for the timing runs
            y_t = torch.empty((M, N), device=x.device, dtype=dtype)
            b_t = bias if has_bias else y_t

        def xa_for(cfg):
            fine = _fine_split(M, rp, es)
            return _Xa(M, K, s_x, a, 1.0, dtype, prec, n_sm, cfg, fast, trace, cfg.BLOCK_K if fine else None)

        # The TMA h·B, on Hopper, for B factors it can read, 16-byte aligned: an eager plan's
        # operands are (``fast``), a traced plan's where their storage offsets keep them so
        # (Inductor copies a graph input it compiled as aligned that comes misaligned). The kernel
        # checks the distance between the two factors itself; under torch.compile Inductor's
        # launcher gives it the workspace its descriptors are built in.
        tma = None
        if _tma_device(x.device) and (_HQ_TMA_FORCE or (isinstance(M, int) and M >= _TUNE_MIN_M)):
            if fast or (trace and _offsets_aligned(*pb)):
                tma = _tma_layout(b, N, dtype)

        def hq_for(xa, cfg):
            # (Unsplit, the h that _xa writes is already the one to keep.)
            write_h = want_h and xa.split > 1
            s_q = tma[0] if tma is not None else 0
            return _hq_launch(M, N, xa, b, s_y, has_bias, s_b, scale, prec, n_sm, cfg, fast, trace, write_h, s_q)

        def fused_for(cfg):
            return _fused_launch(M, K, N, s_x, s_y, a, b, has_bias, s_b, scale, prec, cfg, fast, trace, want_h)

        def run_xa(cfg):
            xa = xa_for(cfg)
            h = xa.new_h(x.device)
            return lambda: xa.launch(x, h, *pa)

        def run_hq(xa, cfg):
            h = xa.new_h(x.device)
            xa.launch(x, h, *pa)
            hq = hq_for(xa, cfg)
            _ensure_tma(hq)
            h_o = torch.empty((M, self.R), device=x.device, dtype=dtype) if want_h else y_t
            return lambda: hq(h, y_t, *pb, b_t, h_o)

        def run_pair(xa, hq, red=None):
            h = xa.new_h(x.device)
            _ensure_tma(hq)
            h_o = torch.empty((M, self.R), device=x.device, dtype=dtype) if want_h else y_t
            if red is None:
                return lambda: (xa.launch(x, h, *pa), hq(h, y_t, *pb, b_t, h_o))
            hr = torch.empty((M, self.R), device=x.device, dtype=dtype)
            return lambda: (xa.launch(x, h, *pa), red(h, h, h, hr, h, h), hq(hr, y_t, *pb, b_t, y_t))

        def run_fused(cfg):
            fl = fused_for(cfg)
            h_o = torch.empty((M, self.R), device=x.device, dtype=dtype) if want_h else y_t
            return lambda: fl(x, y_t, *pa, *pb, b_t, h_o)

        if path is None and rp > _FUSED_MAX_RANK[dtype]:
            path = "split"
        self.fused = self.xa = self.hq = self.red = None
        if path != "split":
            self.fused_cfg = _pick(("fused",) + dims, _fused_candidates(rp, es), run_fused, tune)
            self.fused = fused_for(self.fused_cfg)
        if path != "fused":
            # x·A and h·B are chosen together: a split-K x·A is faster alone, but its consumer sums
            # the partials. So the best x·A of each split count is paired with the best h·B for
            # its h, and the pairs are timed against each other.
            xa_c = _xa_candidates(M, rp, es, splits=True)
            hq_c = _hq_candidates(M, rp, es)
            groups = sorted({c.split for c in xa_c})
            pairs = {}
            for sp in groups:
                xa = xa_for(_pick(("xa_f", sp) + dims, [c for c in xa_c if c.split == sp], run_xa, tune))
                cands = hq_c
                if tma is not None and xa.split == 1:  # (the TMA kernel reads h unsplit)
                    tma_c = _hq_tma_candidates(tma[1])
                    cands = tma_c if _HQ_TMA_FORCE else hq_c + tma_c
                key = ("hq_f", xa.split) + dims
                hq_cfg = _pick(key, cands, lambda cfg, xa=xa: run_hq(xa, cfg), tune)
                pairs[sp] = (xa, hq_for(xa, hq_cfg), hq_cfg, None)
            n = M * self.R
            one = next((p for p in pairs.values() if p[0].split == 1 and isinstance(p[2], _HqTCfg)), None)
            if one is not None:
                # A split x·A whose partials one _reduce sums into h first, so that the TMA h·B,
                # which reads h unsplit, can follow it: at rank 256 a split x·A fills the GPU where
                # an unsplit one cannot, and the non-TMA h·B reading its partials was the slower
                # half (H200, bf16, 8192², L = 2, k = 64, T = 4096, do_bench µs: x·A 64.8 unsplit,
                # 44.1 in 4 splits; h·B 44.3 TMA, 97.1 over 4 partials).
                for sp in [g for g in groups if pairs[g][0].split > 1]:
                    red = _reduce_launch([(n, pairs[sp][0].split, n)], fast, trace)
                    hv = _HView(1, n, self.R)
                    pairs[f"sum{sp}"] = (pairs[sp][0], hq_for(hv, one[2]), one[2], red)
            sp = _pick(("xa_hq",) + dims, list(pairs), lambda sp: run_pair(*pairs[sp][:2], pairs[sp][3]), tune)
            self.xa, self.hq, hq_cfg, self.red = pairs[sp]
            split = self.xa.split
            summed = self.red is None and _sum_first(M, split, self.R, 1, _REDUCE_FWD_ROW_BYTES)
            if self.red is None and not summed and isinstance(hq_cfg, _HqCfg):
                # (The partials every h·B program reads, summed over the programs.)
                groups = _hq_groups(M, N, hq_cfg, n_sm)
                summed = _sum_first(M, split, self.R * groups, M, _REDUCE_FWD_READ_BYTES)
            if summed:
                # Sum the x·A partials once, into h in the operand dtype, for the h·B to read.
                self.red = _reduce_launch([(n, self.xa.split, n)], fast, trace)
                if isinstance(hq_cfg, _HqCfg):
                    hq_cfg = _hq_candidates(M, rp, es, summed=True)[0]
                self.hq = hq_for(_HView(1, n, self.R), hq_cfg)
        if path is None:
            # Below _TUNE_MIN_M rows the split path, whose split reduction fills the GPU at small
            # T; from there on the faster of the two, timed once per T bucket.
            def run_path(p):
                if p == "fused":
                    return run_fused(self.fused_cfg)
                return lambda: self._split(x, y_t, pa, pb, b_t)

            big = isinstance(M, int) and M >= _TUNE_MIN_M
            path = _pick(("path",) + dims, ["split", "fused"], run_path, tune) if big else "split"
        self.path = path

    def __call__(self, x: Tensor, pa, pb, bias: Tensor | None):
        y = torch.empty((self.M, self.N), device=x.device, dtype=self.dtype)
        b = bias if bias is not None else y
        h_o = None
        if self.path == "fused":
            if self.want_h:
                h_o = torch.empty((self.M, self.R), device=x.device, dtype=self.dtype)
            self.fused(x, y, *pa, *pb, b, h_o if h_o is not None else y)
        else:
            h_o = self._split(x, y, pa, pb, b)
        return (y, h_o) if self.want_h else y

    def _split(self, x: Tensor, y: Tensor, pa, pb, b: Tensor) -> Tensor | None:
        """The split path into y: x·A, the sum of its partials where planned, then h·B. Returns
        h = x·A in the operand dtype with ``want_h`` (else None)."""
        h = self.xa.new_h(x.device)
        self.xa.launch(x, h, *pa)
        h_o = None
        if self.red is not None:
            hr = torch.empty((self.M, self.R), device=x.device, dtype=self.dtype)
            self.red(h, h, h, hr, h, h)  # (unused slots: the partials, which NSEG = 1 never touches)
            h = hr
            h_o = hr if self.want_h else None
        elif self.want_h:
            h_o = h if self.xa.split == 1 else torch.empty((self.M, self.R), device=x.device, dtype=self.dtype)
        _ensure_tma(self.hq)
        self.hq(h, y, *pb, b, h_o if h_o is not None and self.red is None else y)
        return h_o


class _HView(NamedTuple):
    """Layout of an h a _Wgrad reads: ``split`` fp32 partials ``s_hs`` apart, or one (split = 1)
    tensor of the operand dtype; rows ``s_hm`` apart. (_Xa has the same fields.)"""

    split: int
    s_hs: int
    s_hm: int


class _Wgrad:
    """D = scale·srcᵀ·h[:, col0 : col0+R] laid out like factor ``f`` (a contiguous tensor of its
    shape), and db = Σ_t src when ``want_db``: one launch, into the final tensors or, split over
    T, into fp32 partials in workspaces of their own (summed by the backward's reduce launch)."""

    def __init__(self, M, N, s_src, xa: _Xa, col0, f: Factor, scale, want_db, prec, n_sm, cfg: _WgCfg | None, split=None):
        # split: the number of slices of T, when another kernel (_dxa) writes this gradient (cfg
        # None: then only the layout here is used).
        self.shape = tuple(f.t.shape)
        numel = 1
        for d in self.shape:
            numel *= d
        self.numel, self.N, self.want_db, self.cfg = numel, N, want_db, cfg
        if split is None:
            col_blocks = _cdiv(N, cfg.BLOCK_N)
            split = 1
            if col_blocks < 2 * n_sm:  # too few column blocks to fill the GPU: split the reduction over T
                split = max(1, min(_cdiv(2 * n_sm, col_blocks), _cdiv(M, _T_GRANULE)))
        t_per = _cdiv(_cdiv(M, split), _T_GRANULE) * _T_GRANULE
        split = _cdiv(M, t_per)
        self.split, self.t_per = split, t_per
        # Partial strides in fp32 elements, multiples of 16 so every partial stays 64-byte aligned.
        self.d_pad = _cdiv(numel, 16) * 16
        self.db_pad = _cdiv(N, 16) * 16
        (s_l, s_long, s_c), kt = _view_of(f, self.shape)
        s_dsplit = self.d_pad if split > 1 else 0
        s_dbsplit = self.db_pad if split > 1 else 0
        self.out_view = (s_dsplit, s_l, s_long, s_c)
        self.kt = kt
        self._scalars = (M, N, f.R, t_per, col0, *s_src, xa.s_hs, xa.s_hm, s_dsplit, s_l, s_long, s_c, s_dbsplit,
                         _f32_bits(scale))  # fmt: skip
        self._meta = {"KT": kt, "HAS_DB": want_db, "RP": _rank_pad(f.R), "PREC": prec, "SPLIT_H": xa.split,
                          **({"BLOCK_N": cfg.BLOCK_N, "BLOCK_T": cfg.BLOCK_T} if cfg is not None else {})}  # fmt: skip
        self.launch = None

    def build(self, fast: bool, trace: bool) -> None:
        self.launch = _Launch(
            _wgrad_kernel, (_cdiv(self.N, self.cfg.BLOCK_N), self.split), 4, self._scalars, self._meta,
            {"num_warps": self.cfg.warps, "num_stages": self.cfg.stages}, fast, trace,
        )  # fmt: skip

    def workspaces(self, device) -> tuple[Tensor | None, Tensor | None]:
        """fp32 partials of D and of db when split (None otherwise)."""
        if self.split == 1:
            return None, None
        wd = torch.empty(self.split * self.d_pad, device=device, dtype=torch.float32)
        wdb = torch.empty(self.split * self.db_pad, device=device, dtype=torch.float32) if self.want_db else None
        return wd, wdb

    def run(self, src: Tensor, h: Tensor, wd: Tensor | None, wdb: Tensor | None, d: Tensor, db: Tensor | None):
        if self.split > 1:
            self.launch(src, h, wd, wdb if wdb is not None else wd)
        else:
            self.launch(src, h, d, db if db is not None else d)


class _Dxa:
    """dx = gh·Aᵀ (M × K, contiguous) and dA_p = srcᵀ·gh_p for the A factors flagged in ``train``,
    in one _dxa launch over an unsplit gh (M × ΣR, operand dtype). The dA_p are laid out as
    :class:`_Wgrad` would write them (``self.wg``: (p, layout), into the final tensors or split over
    T into fp32 partials that the backward's reduce sums)."""

    def __init__(self, M, K, s_src, a: list[Factor], train: list[bool], prec, n_sm, cfg: _DxaCfg, fast, trace):
        f1, f2, has2 = _pair(a)
        R = f1.R + f2.R
        col_blocks = _cdiv(K, cfg.BLOCK_K)
        split = max(1, min(_cdiv(cfg.per_sm * n_sm, col_blocks), _cdiv(M, _T_GRANULE))) if isinstance(M, int) else 1
        ghv = _HView(1, M * R, R)
        self.wg: list[tuple[int, _Wgrad]] = []
        col = 0
        for p, f in enumerate(a):
            if train[p]:
                self.wg.append((p, _Wgrad(M, K, s_src, ghv, col, f, 1.0, False, prec, n_sm, None, split=split)))
            col += f.R
        if not self.wg:
            raise ValueError("_Dxa needs a trainable A factor")
        lay = dict(self.wg)
        w1, w2 = lay.get(0), lay.get(1)
        t_per = self.wg[0][1].t_per
        nil = (0, 0, 0, 0)
        self.cfg, self.split = cfg, self.wg[0][1].split
        self.launch = _Launch(
            _dxa_kernel, (col_blocks, self.split), 7,
            (M, K, f1.R, f2.R, t_per, R, *s_src, *f1.strides(), *f2.strides(), *(w1.out_view if w1 else nil),
             *(w2.out_view if w2 else nil)),
            {"KT1": f1.kt(), "KT2": f2.kt(), "DKT1": w1.kt if w1 else 16, "DKT2": w2.kt if w2 else 16, "HAS_SECOND": has2,
                 "TRAIN1": w1 is not None, "TRAIN2": w2 is not None, "R1P": _rank_pad(f1.R), "R2P": _rank_pad(f2.R),
                 "PREC": prec, "BLOCK_T": cfg.BLOCK_T, "BLOCK_K": cfg.BLOCK_K},
            {"num_warps": cfg.warps, "num_stages": cfg.stages}, fast, trace,
        )  # fmt: skip

    def run(self, gh: Tensor, src: Tensor, dx: Tensor, pa, outs: dict) -> None:
        """``outs``: {p: tensor dA_p writes into (its partials' workspace when split)}; an unused
        slot gets ``src``, which the kernel then never touches (under torch.compile every tensor a
        kernel writes must be an argument of its own)."""
        self.launch(gh, src, dx, *pa, outs.get(0, src), outs.get(1, src))


class _BackwardPlan:
    """dx, [dA_p], [dB_p], db of y = scale·(x·A)·B + b, for the factors flagged trainable.

    gh = scale·g·Bᵀ (one pass over g, _xa) feeds dx = gh·Aᵀ (_hq) and dA_p = xᵀ·gh_p (_wgrad), or
    both in one pass (_dxa, where timed faster).
    h_p = x·A_p (one pass over x, only for the pairs whose B factor trains; none when the forward
    kept h = x·A, ``have_h``) feeds dB_p = scale·h_pᵀ·g (_wgrad), whose pass over g also sums db.
    Weight gradients split over T write fp32 partials that one _reduce launch sums into the final
    tensors.
    """

    def __init__(self, grad, x, a, b, train_a, train_b, scale, need_dx, need_db, trace: bool, fast: bool, have_h=False):
        M, K = x.shape
        N = grad.shape[1]
        dtype = x.dtype
        prec = _precision(dtype)
        es = dtype.itemsize
        n_sm = _num_sms(x.device)
        dev = x.device
        s_x = (x.stride(0), x.stride(1))
        s_g = (grad.stride(0), grad.stride(1))
        bucket = _m_bucket(M)
        self.M, self.K, self.N, self.dtype = M, K, N, dtype
        self.n_a, self.n_b = len(a), len(b)
        self.need_db = need_db
        tune = _can_time(trace, M)
        pa, pb = _ptrs(a), _ptrs(b)

        def wgrad_for(Nw, s_src, xa, col0, f, sc, want_db, src, h, tag):
            cands = _wg_candidates(M, _rank_pad(f.R), es)

            def run(cfg):
                wg = _Wgrad(M, Nw, s_src, xa, col0, f, sc, want_db, prec, n_sm, cfg)
                wg.build(fast, trace)
                wd, wdb = wg.workspaces(dev)
                d = torch.empty(wg.shape, device=dev, dtype=dtype)
                db = torch.empty(Nw, device=dev, dtype=dtype) if want_db else None
                return lambda: wg.run(src, h, wd, wdb, d, db)

            key = ("wg", tag, Nw, _sig([f]), xa.split, want_db, dtype, prec, bucket)
            cfg = _pick(key, cands, run, tune and h is not None)
            return _Wgrad(M, Nw, s_src, xa, col0, f, sc, want_db, prec, n_sm, cfg)

        # gh = scale·g·Bᵀ, dx = gh·Aᵀ, dA_p = xᵀ·gh_p (the last two separate, or in one _dxa).
        self.gh = self.dx = self.gh_red = self.dxa = None
        self.wg_a: list[tuple[int, _Wgrad]] = []
        if need_dx or any(train_a):
            rp_b = sum(_rank_pad(f.R) for f in b)

            # fp32 at ranks ≥ 128: g·Bᵀ split by one BLOCK_K of `out` a program, as the forward's
            # x·A, and its (then many) partials always summed once before dx and dA read them
            # (H200, graph µs, forward+backward at T = 1: 768→3072 28.4 → 24.6, 4096² 34.1 →
            # 29.4, 8192², L = 2, k = 64 55.9 → 49.7; no row slower up to T = 256).
            fine = _fine_split(M, rp_b, es)
            r_b = sum(f.R for f in b)
            # From _TUNE_MIN_M rows, split-K candidates too, each timed with the reduce that sums
            # its partials into gh (M × R, operand dtype): their consumers then read the same gh
            # as after an unsplit g·Bᵀ (at rank 256 an unsplit one leaves most SMs idle, as the
            # forward's x·A does).
            big = isinstance(M, int) and M >= _TUNE_MIN_M

            def run_gh(cfg):
                xa = _Xa(M, N, s_g, b, scale, dtype, prec, n_sm, cfg, fast, trace)
                h = xa.new_h(dev)
                if xa.split == 1:
                    return lambda: xa.launch(grad, h, *pb)
                red = _reduce_launch([(M * r_b, xa.split, M * r_b)], fast, trace)
                hr = torch.empty((M, r_b), device=dev, dtype=dtype)
                return lambda: (xa.launch(grad, h, *pb), red(h, h, h, hr, h, h))

            key = ("xa_g", N, K, _sig(b), dtype, prec, bucket)
            cfg = _pick(key, _xa_candidates(M, rp_b, es, splits=big), run_gh, tune)
            self.gh = _Xa(M, N, s_g, b, scale, dtype, prec, n_sm, cfg, fast, trace, cfg.BLOCK_K if fine else None)
            # The consumers (dx, dA) read gh as ``ghv``: its partials, or where each of their
            # programs would read too many of them (or at large T, any), one (M × R) tensor they
            # are summed into first.
            ghv = self.gh
            hq_c = _hq_candidates(M, sum(_rank_pad(f.R) for f in a), es)
            split = self.gh.split
            if (big and split > 1) or _sum_first(
                M, split, r_b, hq_c[0].BLOCK_M if need_dx else M, 1 if fine else _REDUCE_BWD_BYTES
            ):
                self.gh_red = _reduce_launch([(M * r_b, split, M * r_b)], fast, trace)
                ghv = _HView(1, M * r_b, r_b)
                hq_c = _hq_candidates(M, sum(_rank_pad(f.R) for f in a), es, summed=True)
            gh_t = None
            if tune:  # a real gh, as its consumers read it, for the timing runs below
                gh_t = self.gh.new_h(dev)
                self.gh.launch(grad, gh_t, *pb)
                if self.gh_red is not None:
                    ghr = torch.empty((M, r_b), device=dev, dtype=dtype)
                    self.gh_red(gh_t, gh_t, gh_t, ghr, gh_t, gh_t)
                    gh_t = ghr
            if need_dx:
                def run_dx(cfg):
                    out = torch.empty((M, K), device=dev, dtype=dtype)
                    hq = _hq_launch(M, K, ghv, a, (K, 1), False, 0, 1.0, prec, n_sm, cfg, fast, trace)
                    return lambda: hq(gh_t, out, *pa, out, out)

                key = ("hq_dx", ghv.split, N, K, _sig(a), dtype, prec, bucket)
                cfg = _pick(key, hq_c, run_dx, tune)
                self.dx = _hq_launch(M, K, ghv, a, (K, 1), False, 0, 1.0, prec, n_sm, cfg, fast, trace)
            col = 0
            for p, f in enumerate(a):
                if train_a[p]:
                    self.wg_a.append((p, wgrad_for(K, s_x, ghv, col, f, 1.0, False, x, gh_t, "a")))
                col += f.R
            rp_a = sum(_rank_pad(f.R) for f in a)
            if need_dx and self.wg_a and ghv.split == 1 and (_DXA_FORCE or (big and es < 4 and rp_a <= _DXA_MAX_RANK)):
                # dx and dA in one pass (_dxa) against the two above, timed with the sums of their
                # split dA partials: the one pass reads x while it writes dx.
                def dxa_for(cfg):
                    return _Dxa(M, K, s_x, a, list(train_a), prec, n_sm, cfg, fast, trace)

                def run_dxa(cfg):
                    out = torch.empty((M, K), device=dev, dtype=dtype)
                    if cfg == "sep":
                        wgs = self.wg_a
                        for _, wg in wgs:
                            wg.build(fast, trace)
                    else:
                        d = dxa_for(cfg)
                        wgs = d.wg
                    work = {p: (wg.workspaces(dev)[0], torch.empty(wg.shape, device=dev, dtype=dtype)) for p, wg in wgs}
                    split = [(wg.numel, wg.split, wg.d_pad) for _, wg in wgs if wg.split > 1]
                    red = _reduce_launch(split, fast, trace) if split else None
                    ws = [w for w, _ in work.values() if w is not None]
                    outs = [o for w, o in work.values() if w is not None]

                    def run():
                        if cfg == "sep":
                            self.dx(gh_t, out, *pa, out, out)
                            for p, wg in wgs:
                                wg.run(x, gh_t, work[p][0], None, work[p][1], None)
                        else:
                            d.run(gh_t, x, out, pa, {p: w if w is not None else o for p, (w, o) in work.items()})
                        if red is not None:
                            _run_reduce(red, ws, outs)

                    return run

                cands = _dxa_candidates(rp_a, es)
                key = ("dxa", N, K, _sig(a), tuple(train_a), dtype, prec, bucket)
                cfg = _pick(key, cands if _DXA_FORCE else ["sep"] + cands, run_dxa, tune)
                if cfg != "sep":
                    self.dxa = dxa_for(cfg)
                    self.dx, self.wg_a = None, []

        # h_p = x·A_p, dB_p = scale·h_pᵀ·g (+ db).
        self.sel = [p for p in range(len(b)) if train_b[p]]
        self.h = None
        self.wg_b: list[tuple[int, _Wgrad]] = []
        if self.sel and have_h:
            # The forward's h = x·A, all pairs side by side (M × ΣR, operand dtype).
            view = _HView(1, M * sum(f.R for f in a), sum(f.R for f in a))
            h_t = torch.zeros((M, view.s_hm), device=dev, dtype=dtype) if tune else None
            for i, p in enumerate(self.sel):
                want_db = need_db and i == 0
                col = sum(f.R for f in a[:p])
                self.wg_b.append((p, wgrad_for(N, s_g, view, col, b[p], scale, want_db, grad, h_t, "b")))
        elif self.sel:
            fa = [a[p] for p in self.sel]
            pa_sel = _ptrs(fa)

            def run_h(cfg):
                xa = _Xa(M, K, s_x, fa, 1.0, dtype, prec, n_sm, cfg, fast, trace)
                h = xa.new_h(dev)
                return lambda: xa.launch(x, h, *pa_sel)

            key = ("xa_h", K, N, _sig(fa), dtype, prec, bucket)
            cfg = _pick(key, _xa_candidates(M, sum(_rank_pad(f.R) for f in fa), es), run_h, tune)
            self.h = _Xa(M, K, s_x, fa, 1.0, dtype, prec, n_sm, cfg, fast, trace)
            h_t = None
            if tune:
                h_t = self.h.new_h(dev)
                self.h.launch(x, h_t, *pa_sel)
            col = 0
            for i, p in enumerate(self.sel):
                want_db = need_db and i == 0
                self.wg_b.append((p, wgrad_for(N, s_g, self.h, col, b[p], scale, want_db, grad, h_t, "b")))
                col += b[p].R
        self.db_here = need_db and bool(self.sel)

        # One reduce launch sums the partials of every split weight gradient.
        self.segs: list[tuple[str, int, _Wgrad]] = []  # ("a"|"b"|"db", factor index, wgrad)
        for side, lst in (("a", self.wg_a), ("b", self.wg_b), ("a", self.dxa.wg if self.dxa is not None else [])):
            for p, wg in lst:
                if wg.cfg is not None:  # (else _dxa writes it)
                    wg.build(fast, trace)
                if wg.split > 1:
                    self.segs.append((side, p, wg))
                    if wg.want_db:
                        self.segs.append(("db", p, wg))
        self.reduce = None
        if self.segs:
            if len(self.segs) > 3:
                raise AssertionError(f"{len(self.segs)} split weight gradients, the reduce takes 3")
            cols = [
                (wg.N, wg.split, wg.db_pad) if side == "db" else (wg.numel, wg.split, wg.d_pad) for side, _, wg in self.segs
            ]
            self.reduce = _reduce_launch(cols, fast, trace)

    def __call__(self, grad, x, pa, pb, fa_t, h_saved=None):
        dev = x.device
        dtype = self.dtype
        dx = db = None
        da: list[Tensor | None] = [None] * self.n_a
        dbs: list[Tensor | None] = [None] * self.n_b
        work: dict = {}  # wgrad -> its workspaces
        if self.gh is not None:
            gh = self.gh.new_h(dev)
            self.gh.launch(grad, gh, *pb)
            if self.gh_red is not None:
                ghr = torch.empty((self.M, gh.shape[-1]), device=dev, dtype=dtype)
                self.gh_red(gh, gh, gh, ghr, gh, gh)  # (unused slots: NSEG = 1 never touches them)
                gh = ghr
            if self.dxa is not None:
                dx = torch.empty((self.M, self.K), device=dev, dtype=dtype)
                outs = {}
                for p, wg in self.dxa.wg:
                    da[p] = torch.empty(wg.shape, device=dev, dtype=dtype)
                    wd, wdb = work[wg] = wg.workspaces(dev)
                    outs[p] = wd if wd is not None else da[p]
                self.dxa.run(gh, x, dx, pa, outs)
            if self.dx is not None:
                dx = torch.empty((self.M, self.K), device=dev, dtype=dtype)
                self.dx(gh, dx, *pa, dx, dx)
            for p, wg in self.wg_a:
                da[p] = torch.empty(wg.shape, device=dev, dtype=dtype)
                wd, wdb = work[wg] = wg.workspaces(dev)
                wg.run(x, gh, wd, wdb, da[p], None)
        if self.wg_b:
            if self.h is not None:
                sel = self.sel
                h = self.h.new_h(dev)
                self.h.launch(x, h, fa_t[sel[0]], fa_t[sel[-1]])
            else:
                h = h_saved
            for p, wg in self.wg_b:
                dbs[p] = torch.empty(wg.shape, device=dev, dtype=dtype)
                if wg.want_db:
                    db = torch.empty(self.N, device=dev, dtype=dtype)
                wd, wdb = work[wg] = wg.workspaces(dev)
                wg.run(grad, h, wd, wdb, dbs[p], db if wg.want_db else None)
        if self.reduce is not None:
            ws, outs = [], []
            for side, p, wg in self.segs:
                wd, wdb = work[wg]
                ws.append(wdb if side == "db" else wd)
                outs.append(db if side == "db" else da[p] if side == "a" else dbs[p])
            _run_reduce(self.reduce, ws, outs)
        if self.need_db and not self.db_here:
            db = grad.sum(0)
        return dx, da, dbs, db


# ---------------------------------------------------------------------------------------------
# Entry points (signatures of reference.py)
# ---------------------------------------------------------------------------------------------

_PLANS: dict = {}


def _plan(key, make, M: int):
    """The cached plan for ``key``, else ``make()``'s. A plan for M rows that times candidates
    (M ≥ _TUNE_MIN_M) is built twice: once dry, so that the kernels its timing runs compile in
    parallel (_compile_ahead), then for real."""
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        if _can_time(False, M):
            _compile_ahead(make)
        plan = _PLANS[key] = make()
    return plan


def _aligned(*ts: Tensor | None) -> bool:
    bits = 0
    for t in ts:
        if t is not None:
            bits |= t.data_ptr()
    return bits & 15 == 0


def supported(x: Tensor, *weights: Tensor | None) -> bool:
    """Whether the kernels take these operands: fp32/bf16/fp16 throughout, one device."""
    if x.dtype not in _DTYPES:
        return False
    return all(w is None or (w.dtype == x.dtype and w.device == x.device) for w in weights)


def _forward_empty(x: Tensor, N: int, R: int, bias: Tensor | None) -> Tensor | None:
    M, K = x.shape
    if M == 0 or N == 0:
        return torch.empty((M, N), device=x.device, dtype=x.dtype)
    if K == 0 or R == 0:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    return None


def _key(*ts: Tensor | None) -> tuple:
    return tuple((t.shape, t.stride()) if t is not None else None for t in ts)


def sklinear_forward(
    x: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    bias: Tensor | None,
    *,
    want_h: bool = False,
    path: str | None = None,
):
    """y = 1/(2L) Σᵢ (x·S1ᵢ·U1ᵢ + x·U2ᵢ·S2ᵢ) + bias, or (y, h) with ``want_h``; see
    reference.sklinear_forward.

    ``path``: None (choose), ``"fused"`` (one kernel) or ``"split"`` (two kernels).
    """
    L, _, k = S1s.shape
    if L * k > MAX_RANK:
        return reference.sklinear_forward(x, S1s, S2s, U1s, U2s, bias, want_h=want_h)
    empty = _forward_empty(x, U1s.shape[2], L * k, bias)
    if empty is not None:
        return (empty, x.new_zeros(x.shape[0], 2 * L * k)) if want_h else empty
    scale = 1.0 / (2 * L)

    def make(trace: bool, fast: bool) -> _ForwardPlan:
        a = [_stacked_long_mid(S1s), _stacked_long_mid(U2s)]
        b = [_stacked_long_last(U1s), _stacked_long_last(S2s)]
        return _ForwardPlan(x, a, b, bias, scale, path, trace, fast, want_h)

    if _traced(x):
        _tune_while_tracing(sklinear_forward, x, S1s, S2s, U1s, U2s, bias, want_h=want_h, path=path)
        return make(True, False)(x, (S1s, U2s), (U1s, S2s), bias)
    aligned = _aligned(x, S1s, S2s, U1s, U2s, bias)
    key = ("skf", _key(x, S1s, S2s, U1s, U2s, bias), x.dtype, x.device, _precision(x.dtype), path, want_h, aligned)
    return _plan(key, lambda: make(False, aligned), x.shape[0])(x, (S1s, U2s), (U1s, S2s), bias)


def lowrank_forward(
    x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, scale: float, *, want_h: bool = False, path: str | None = None
):
    """y = scale·(x·A)·B + bias, or (y, h = x·A) with ``want_h``; see reference.lowrank_forward.
    ``path`` as in sklinear_forward."""
    if A.shape[1] > MAX_RANK:
        return reference.lowrank_forward(x, A, B, bias, scale, want_h=want_h)
    empty = _forward_empty(x, B.shape[1], A.shape[1], bias)
    if empty is not None:
        return (empty, x.new_zeros(x.shape[0], A.shape[1])) if want_h else empty
    scale = float(scale)

    def make(trace: bool, fast: bool) -> _ForwardPlan:
        return _ForwardPlan(x, [_plain_a(A)], [_plain_b(B)], bias, scale, path, trace, fast, want_h)

    if _traced(x):
        _tune_while_tracing(lowrank_forward, x, A, B, bias, scale, want_h=want_h, path=path)
        return make(True, False)(x, (A, A), (B, B), bias)
    aligned = _aligned(x, A, B, bias)
    key = ("lrf", _key(x, A, B, bias), x.dtype, x.device, _precision(x.dtype), path, scale, want_h, aligned)
    return _plan(key, lambda: make(False, aligned), x.shape[0])(x, (A, A), (B, B), bias)


def _backward(
    grad: Tensor,
    x: Tensor,
    fa_t: tuple[Tensor, ...],
    fb_t: tuple[Tensor, ...],
    make_factors,
    train_a: list[bool],
    train_b: list[bool],
    scale: float,
    need_dx: bool,
    need_db: bool,
    tag: str,
    h: Tensor | None = None,
) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None], Tensor | None]:
    """dx, [dA_p], [dB_p], db of y = scale·(x·A)·B + b for the factor tensors fa_t (A side) and
    fb_t (B side), the gradients only of those flagged trainable. ``h``: the forward's x·A
    (M × ΣR, x's dtype), if it kept it; else the weight gradients of the B side recompute it."""
    if x.shape[0] == 0 or x.shape[1] == 0 or grad.shape[1] == 0:  # empty: nothing to launch
        dx = torch.zeros_like(x) if need_dx else None
        da = [torch.zeros_like(t) if tr else None for t, tr in zip(fa_t, train_a)]
        dbs = [torch.zeros_like(t) if tr else None for t, tr in zip(fb_t, train_b)]
        db = grad.sum(0) if need_db else None
        return dx, da, dbs, db
    pa = (fa_t[0], fa_t[-1])
    pb = (fb_t[0], fb_t[-1])

    if h is not None and (h.dtype != x.dtype or h.stride() != (h.shape[1], 1)):
        h = None  # (not a layout the kernels read: recompute)
    have_h = h is not None

    def make(trace: bool, fast: bool) -> _BackwardPlan:
        a, b = make_factors()
        return _BackwardPlan(grad, x, a, b, train_a, train_b, scale, need_dx, need_db, trace, fast, have_h)

    if _traced(x):
        return make(True, False)(grad, x, pa, pb, fa_t, h)
    aligned = _aligned(grad, x, *fa_t, *fb_t, h)
    flags = (tuple(train_a), tuple(train_b), need_dx, need_db, have_h)
    key = (tag, _key(grad, x, *fa_t, *fb_t), x.dtype, x.device, _precision(x.dtype), flags, scale, aligned)
    return _plan(key, lambda: make(False, aligned), x.shape[0])(grad, x, pa, pb, fa_t, h)


def sklinear_backward(
    grad: Tensor,
    x: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    need_dx: bool,
    need_dS: bool,
    need_db: bool,
    h: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dS1s, dS2s, db); see reference.sklinear_backward. No gradient for U1s, U2s."""
    L, _, k = S1s.shape
    if L * k > MAX_RANK:
        return reference.sklinear_backward(grad, x, S1s, S2s, U1s, U2s, need_dx, need_dS, need_db, h)
    if _traced(x):
        _tune_while_tracing(sklinear_backward, grad, x, S1s, S2s, U1s, U2s, need_dx, need_dS, need_db, h)

    def make_factors():
        return (
            [_stacked_long_mid(S1s), _stacked_long_mid(U2s)],
            [_stacked_long_last(U1s), _stacked_long_last(S2s)],
        )

    dx, da, dbs, db = _backward(
        grad, x, (S1s, U2s), (U1s, S2s), make_factors, [need_dS, False], [False, need_dS], 1.0 / (2 * L), need_dx,
        need_db, "skb", h,
    )  # fmt: skip
    return dx, da[0], dbs[1], db


def lowrank_backward(
    grad: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_db: bool,
    h: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dA, dB, db); see reference.lowrank_backward."""
    if A.shape[1] > MAX_RANK:
        return reference.lowrank_backward(grad, x, A, B, scale, need_dx, need_dA, need_dB, need_db, h)
    if _traced(x):
        _tune_while_tracing(lowrank_backward, grad, x, A, B, scale, need_dx, need_dA, need_dB, need_db, h)
    dx, da, dbs, db = _backward(
        grad, x, (A,), (B,), lambda: ([_plain_a(A)], [_plain_b(B)]), [need_dA], [need_dB], float(scale), need_dx,
        need_db, "lrb", h,
    )  # fmt: skip
    return dx, da[0], dbs[0], db
