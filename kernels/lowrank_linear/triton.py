"""Triton kernels for the low-rank linear y = scale·((x·A)·B) + b (the math is in README.md).

Layers, top to bottom: ``@triton.jit`` kernels → host launchers (``_xa``, ``_hq``, ``_wgrad``,
``_fused``: plan, allocate, launch) → the four functions the panther ops register, with the
signatures of ``reference.py`` (``sklinear_forward`` …, ``lowrank_backward``).

**Factors.** A is one or two factors P (long dim × R), B one or two factors Q (R × long dim):
SKLinear's (S1s, U2s) / (U1s, S2s) or the plain (A, B). Each is read in place through a
:class:`Factor` view: rank column j = l·KT + c (term l, column c inside the term) of long row i
lives at ``t + l·s_l + i·s_long + c·s_c``. The same view serves a factor and its transpose, so the
backward reuses the forward kernels: gh = g·Bᵀ is ``_xa`` over the B factors, dx = gh·Aᵀ is
``_hq`` over the A factors. No concatenated copy of the weights is ever made.

**Kernels.**

* ``_xa_kernel``     h = scale·X·[P1 P2] (T × R, fp32); the reduction over the long dim is split
  across programs (fp32 atomics) when there are too few row blocks to fill the GPU.
* ``_hq_kernel``     Y = scale·h·[Q1; Q2] + bias, h rounded to the operand dtype first (as the
  reference does: it computes h = x·A in x's dtype).
* ``_fused_kernel``  both in one pass: each program keeps its rows of h in registers, so x is read
  once and y written once with no launch in between (rank ≤ ``_FUSED_MAX_RANK``).
* ``_wgrad_kernel``  D = scale·Xᵀ·h (N × R) for dS1/dS2 (dA/dB), split over T with fp32 atomics
  when there are too few column blocks; optionally the column sums of X (db) in the same pass.

fp32 accumulation everywhere; an fp32 product follows torch's TF32 setting for CUDA matmuls.
Autotuning is keyed on a bucket of T (next power of two, 16 … 16384), never on T itself.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor
from torch.library import wrap_triton

from . import reference

try:  # torch's own switch: off while a triton_op runs eagerly on real tensors
    from torch._library.triton import is_wrap_triton_enabled
except ImportError:  # pragma: no cover - other torch versions
    def is_wrap_triton_enabled() -> bool:
        return True


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
# (R × BLOCK_N) tiles of B. Up to these padded ranks its configs compile without spills (ptxas,
# sm_90, triton 3.6); fp32 ("ieee" FMA products) needs the most registers.
_FUSED_MAX_RANK = {torch.float32: 32, torch.bfloat16: 128, torch.float16: 128}
# Smallest slice of a split reduction (over the long dim in _xa, over T in _wgrad).
_K_GRANULE = 256
_T_GRANULE = 256
_M_BUCKET_MAX = 16384
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Autotune configs: a handful each, so a new shape costs seconds. Under the interpreter, one.
# ---------------------------------------------------------------------------------------------


def _quick_bench(fn, quantiles):
    # Each config is timed for ~25 ms instead of triton's default ~125 ms: the configs differ by
    # far more than that resolves.
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# triton.autotune takes a do_bench since triton 3.0; older versions keep their default.
_AUTOTUNE_KW = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


def _xa_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # (BLOCK_K 32 for fp32 at large rank, where the wider tiles run out of shared memory.)
    return [
        triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
    ]


def _hq_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_R": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_R": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_R": 16}, num_warps=8, num_stages=3),
    ]


def _fused_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 128, "BLOCK_N": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 256, "BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    ]


def _wgrad_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_T": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
    ]


# Only T is not specialized (no recompile per divisibility of T). The long dims, ranks and strides
# are: masks along a dim of known divisibility and unit strides are what make 16-byte loads. KT
# (columns per term) is a constexpr, so the rank gather (j // KT, j % KT) stays contiguous in runs
# of KT columns.

# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


# Triton's interpreter multiplies bf16 operands as their raw 16-bit patterns (its dot hands numpy
# the storage integers; seen with triton 3.9), so under the interpreter 16-bit operands are widened
# to fp32 first: the same products (exact in fp32) and the same fp32 accumulation.
_WIDEN_DOT = tl.constexpr(_INTERPRET)


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
def _load_p(p_ptr, rows, j, n_rows, R, KT, s_l, s_long, s_c):
    # P[rows, j] as a (len(rows) × len(j)) tile; zero outside [0, n_rows) × [0, R).
    ptrs = p_ptr + rows[:, None] * s_long + _rank_off(j, KT, s_l, s_c)[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (j[None, :] < R), other=0.0)


@triton.jit
def _load_q(q_ptr, j, cols, R, n_cols, KT, s_l, s_long, s_c):
    # Q[j, cols] as a (len(j) × len(cols)) tile; zero outside [0, R) × [0, n_cols).
    ptrs = q_ptr + _rank_off(j, KT, s_l, s_c)[:, None] + cols[None, :] * s_long
    return tl.load(ptrs, mask=(j[:, None] < R) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _xa_rows(
    x_ptr, s_xm, s_xk, offs_m, M, k_lo, k_hi,
    p1_ptr, R1, KT1, s_p1l, s_p1i, s_p1c,
    p2_ptr, R2, KT2, s_p2l, s_p2i, s_p2c,
    HAS_SECOND: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # (x[offs_m, k_lo:k_hi] · P1, · P2) accumulated in fp32: (BLOCK_M × R1P), (BLOCK_M × R2P).
    j1 = tl.arange(0, R1P)
    j2 = tl.arange(0, R2P)
    acc1 = tl.zeros((BLOCK_M, R1P), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, R2P), dtype=tl.float32)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm
    m_mask = offs_m[:, None] < M
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :] * s_xk, mask=m_mask & (offs_k[None, :] < k_hi), other=0.0)
        p1 = _load_p(p1_ptr, offs_k, j1, k_hi, R1, KT1, s_p1l, s_p1i, s_p1c)
        acc1 = _dot(x, p1, acc1, PREC)
        if HAS_SECOND:
            p2 = _load_p(p2_ptr, offs_k, j2, k_hi, R2, KT2, s_p2l, s_p2i, s_p2c)
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
def _store_y(acc, scale, bias_ptr, s_b, y_ptr, s_ym, s_yn, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    # Epilogue: y = scale·acc + bias, rounded once to y's dtype.
    acc = acc * scale
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * s_b, mask=offs_n < N, other=0.0)
        acc = acc + b.to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :] * s_yn
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_xa_configs(), key=["M_BUCKET", "K", "R1", "R2", "K_PER_SPLIT", "PREC"], reset_to_zero=["h_ptr"], **_AUTOTUNE_KW
)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _xa_kernel(
    x_ptr, h_ptr, p1_ptr, p2_ptr,
    M, K, R1, R2, M_BUCKET, K_PER_SPLIT,
    s_xm, s_xk, s_hm,
    s_p1l, s_p1i, s_p1c, s_p2l, s_p2i, s_p2c,
    scale,
    KT1: tl.constexpr,
    KT2: tl.constexpr,
    HAS_SECOND: tl.constexpr, ATOMIC: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # h[:, 0:R1] (+)= scale·x·P1, h[:, R1:R1+R2] (+)= scale·x·P2, over this program's slice of K.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc1, acc2 = _xa_rows(
        x_ptr, s_xm, s_xk, offs_m, M, k_lo, k_hi,
        p1_ptr, R1, KT1, s_p1l, s_p1i, s_p1c, p2_ptr, R2, KT2, s_p2l, s_p2i, s_p2c,
        HAS_SECOND, R1P, R2P, PREC, BLOCK_M, BLOCK_K,
    )
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * s_hm
    m_mask = offs_m[:, None] < M
    j1 = tl.arange(0, R1P)
    mask1 = m_mask & (j1[None, :] < R1)
    if ATOMIC:
        tl.atomic_add(h_rows + j1[None, :], acc1 * scale, mask=mask1)
    else:
        tl.store(h_rows + j1[None, :], acc1 * scale, mask=mask1)
    if HAS_SECOND:
        j2 = tl.arange(0, R2P)
        mask2 = m_mask & (j2[None, :] < R2)
        if ATOMIC:
            tl.atomic_add(h_rows + R1 + j2[None, :], acc2 * scale, mask=mask2)
        else:
            tl.store(h_rows + R1 + j2[None, :], acc2 * scale, mask=mask2)


@triton.jit
def _hq_chunks(
    acc, h_rows, m_mask, h_col0, q_ptr, R, KT, s_l, s_long, s_c, offs_n, N,
    PREC: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # acc += h[:, h_col0 : h_col0+R] · Q[:, offs_n], BLOCK_R rank columns at a time (h read as fp32,
    # rounded to Q's dtype).
    op_ty = q_ptr.dtype.element_ty
    for r0 in range(0, R, BLOCK_R):
        j = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_rows + h_col0 + j[None, :], mask=m_mask & (j[None, :] < R), other=0.0).to(op_ty)
        q = _load_q(q_ptr, j, offs_n, R, N, KT, s_l, s_long, s_c)
        acc = _dot(h, q, acc, PREC)
    return acc


@triton.autotune(configs=_hq_configs(), key=["M_BUCKET", "N", "R1", "R2", "PREC"], **_AUTOTUNE_KW)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _hq_kernel(
    h_ptr, y_ptr, q1_ptr, q2_ptr, bias_ptr,
    M, N, R1, R2, M_BUCKET,
    s_hm, s_ym, s_yn, s_b,
    s_q1l, s_q1n, s_q1c, s_q2l, s_q2n, s_q2c,
    scale,
    KT1: tl.constexpr,
    KT2: tl.constexpr,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # y[offs_m, offs_n] = scale·(h[:, :R1]·Q1 + h[:, R1:R1+R2]·Q2) + bias.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * s_hm
    m_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _hq_chunks(acc, h_rows, m_mask, 0, q1_ptr, R1, KT1, s_q1l, s_q1n, s_q1c, offs_n, N, PREC, BLOCK_R)
    if HAS_SECOND:
        acc = _hq_chunks(acc, h_rows, m_mask, R1, q2_ptr, R2, KT2, s_q2l, s_q2n, s_q2c, offs_n, N, PREC, BLOCK_R)
    _store_y(acc, scale, bias_ptr, s_b, y_ptr, s_ym, s_yn, offs_m, offs_n, M, N, HAS_BIAS)


@triton.autotune(configs=_fused_configs(), key=["M_BUCKET", "K", "N", "R1", "R2", "PREC"], **_AUTOTUNE_KW)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fused_kernel(
    x_ptr, y_ptr, p1_ptr, p2_ptr, q1_ptr, q2_ptr, bias_ptr,
    M, K, N, R1, R2, M_BUCKET,
    s_xm, s_xk, s_ym, s_yn, s_b,
    s_p1l, s_p1i, s_p1c, s_p2l, s_p2i, s_p2c,
    s_q1l, s_q1n, s_q1c, s_q2l, s_q2n, s_q2c,
    scale,
    KT1: tl.constexpr,
    KT2: tl.constexpr,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One row block: h = x·[P1 P2] over all of K (registers), then y = scale·h·[Q1; Q2] + bias
    # streamed out in column blocks. x is read once and y written once.
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc1, acc2 = _xa_rows(
        x_ptr, s_xm, s_xk, offs_m, M, 0, K,
        p1_ptr, R1, KT1, s_p1l, s_p1i, s_p1c, p2_ptr, R2, KT2, s_p2l, s_p2i, s_p2c,
        HAS_SECOND, R1P, R2P, PREC, BLOCK_M, BLOCK_K,
    )
    op_ty = q1_ptr.dtype.element_ty
    h1 = acc1.to(op_ty)
    h2 = acc2.to(op_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = _hq_tile(
            h1, h2, offs_n, N, q1_ptr, R1, KT1, s_q1l, s_q1n, s_q1c, q2_ptr, R2, KT2, s_q2l, s_q2n, s_q2c,
            HAS_SECOND, R1P, R2P, PREC, BLOCK_M, BLOCK_N,
        )
        _store_y(acc, scale, bias_ptr, s_b, y_ptr, s_ym, s_yn, offs_m, offs_n, M, N, HAS_BIAS)


@triton.autotune(
    configs=_wgrad_configs(), key=["M_BUCKET", "N", "R", "T_PER_SPLIT", "PREC"], reset_to_zero=["d_ptr", "db_ptr"], **_AUTOTUNE_KW
)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _wgrad_kernel(
    x_ptr, h_ptr, d_ptr, db_ptr,
    M, N, R, M_BUCKET, T_PER_SPLIT,
    s_xm, s_xn, s_hm, s_dl, s_dn, s_dc,
    scale,
    KT: tl.constexpr,
    HAS_DB: tl.constexpr, ATOMIC: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # D[offs_n, j] (+)= scale·Σ_t x[t, offs_n]·h[t, j] over this program's slice of T, written
    # through the factor view (l, n, c); db[offs_n] (+)= Σ_t x[t, offs_n] when HAS_DB.
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
        h = tl.load(h_ptr + rows * s_hm + j[None, :], mask=t_mask & (j[None, :] < R), other=0.0).to(op_ty)
        acc = _dot(tl.trans(x), h, acc, PREC)
        if HAS_DB:
            colsum += tl.sum(x.to(tl.float32), axis=0)
    acc = acc * scale
    ptrs = d_ptr + offs_n[:, None] * s_dn + _rank_off(j, KT, s_dl, s_dc)[None, :]
    mask = n_mask[:, None] & (j[None, :] < R)
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(d_ptr.dtype.element_ty), mask=mask)
    if HAS_DB:
        if ATOMIC:
            tl.atomic_add(db_ptr + offs_n, colsum, mask=n_mask)
        else:
            tl.store(db_ptr + offs_n, colsum.to(db_ptr.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------------------------------------
# Host side: factor views, plans, launchers
# ---------------------------------------------------------------------------------------------


def _launcher(kernel):
    """``wrap_triton(kernel)`` while tracing (Inductor sees the kernel), the kernel itself in eager
    mode: what wrap_triton returns there too, without its ~10 µs of checks per launch."""
    return wrap_triton(kernel) if is_wrap_triton_enabled() else kernel


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


def _m_bucket(M: int) -> int:
    # Autotune key for T: 16, 32, ..., 16384. Shapes in one bucket share one tuning.
    return min(max(16, _pow2_at_least(M)), _M_BUCKET_MAX)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small "GPU", so small test shapes take the split paths


# tl.dot input precision of an fp32 product when torch allows no TF32: 0 "ieee" (fp32 FMAs, what
# torch's "highest" means). 2 ("tf32x3": three TF32 products, ~fp32 accuracy on tensor cores) is
# the faster alternative, kept for measurements.
_FP32_HIGHEST = 0


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


def _pair_args(factors: list[Factor]) -> tuple:
    """Kernel arguments of a factor pair: pointers, ranks, strides, padded ranks and KTs."""
    f1, f2, has_second = _pair(factors)
    return (
        (f1.t, f2.t),
        (f1.R, f2.R),
        f1.strides() + f2.strides(),
        has_second,
        _rank_pad(f1.R),
        _rank_pad(f2.R),
        {"KT1": f1.kt(), "KT2": f2.kt()},
    )


def _xa(x: Tensor, factors: list[Factor], scale: float) -> Tensor:
    """h = scale·x·[P1 P2] as fp32 (M × R1+R2). x: (M, K) with any strides."""
    M, K = x.shape
    (p1, p2), (R1, R2), strides, has_second, R1P, R2P, kts = _pair_args(factors)
    n_sm = _num_sms(x.device)
    BLOCK_M = 16 if M <= 16 else (32 if M <= 32 else 64)
    row_blocks = _cdiv(M, BLOCK_M)
    split = 1
    if row_blocks < n_sm:  # too few row blocks to fill the GPU: split the reduction over K
        split = max(1, min(_cdiv(2 * n_sm, row_blocks), _cdiv(K, _K_GRANULE)))
    k_per = _cdiv(_cdiv(K, split), _K_GRANULE) * _K_GRANULE
    split = _cdiv(K, k_per)
    atomic = split > 1
    h = (torch.zeros if atomic else torch.empty)((M, R1 + R2), device=x.device, dtype=torch.float32)
    _launcher(_xa_kernel)[(row_blocks, split)](
        x, h, p1, p2,
        M, K, R1, R2, _m_bucket(M), k_per,
        x.stride(0), x.stride(1), h.stride(0),
        *strides,
        scale,
        **kts, HAS_SECOND=has_second, ATOMIC=atomic, R1P=R1P, R2P=R2P, PREC=_precision(x.dtype), BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return h


def _hq(h: Tensor, factors: list[Factor], bias: Tensor | None, scale: float, out: Tensor) -> Tensor:
    """out = scale·h·[Q1; Q2] + bias. h: fp32 (M × R1+R2); out: (M, N) in the factors' dtype."""
    M, N = out.shape
    (q1, q2), (R1, R2), strides, has_second, _, _, kts = _pair_args(factors)
    b = bias if bias is not None else out
    _launcher(_hq_kernel)[lambda META: (_cdiv(M, META["BLOCK_M"]), _cdiv(N, META["BLOCK_N"]))](
        h, out, q1, q2, b,
        M, N, R1, R2, _m_bucket(M),
        h.stride(0), out.stride(0), out.stride(1), b.stride(0) if bias is not None else 0,
        *strides,
        scale,
        **kts, HAS_SECOND=has_second, HAS_BIAS=bias is not None, PREC=_precision(out.dtype),
    )  # fmt: skip
    return out


def _fused(x: Tensor, a: list[Factor], b: list[Factor], bias: Tensor | None, scale: float, out: Tensor) -> Tensor:
    """out = scale·(x·A)·B + bias in one kernel (a and b pair up: same ranks)."""
    M, K = x.shape
    N = out.shape[1]
    (p1, p2), (R1, R2), p_strides, has_second, R1P, R2P, p_kts = _pair_args(a)
    (q1, q2), _, q_strides, _, _, _, q_kts = _pair_args(b)
    # One KT per pair serves its P and its Q: where they differ, the true columns per term.
    kts = {name: p_kts[name] if p_kts[name] == q_kts[name] else a[0].KT for name in p_kts}
    bb = bias if bias is not None else out
    _launcher(_fused_kernel)[lambda META: (_cdiv(M, META["BLOCK_M"]),)](
        x, out, p1, p2, q1, q2, bb,
        M, K, N, R1, R2, _m_bucket(M),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), bb.stride(0) if bias is not None else 0,
        *p_strides,
        *q_strides,
        scale,
        **kts, HAS_SECOND=has_second, HAS_BIAS=bias is not None, R1P=R1P, R2P=R2P, PREC=_precision(x.dtype),
    )  # fmt: skip
    return out


def _wgrad(x: Tensor, h: Tensor, f: Factor, scale: float, want_db: bool) -> tuple[Tensor, Tensor | None]:
    """(D, db): D = scale·xᵀ·h laid out like factor ``f`` (a fresh tensor of f.t's shape), db = Σ_t x.

    x: (M, N) any strides; h: fp32 (M, ≥ f.R) with unit column stride.
    """
    M, N = x.shape
    n_sm = _num_sms(x.device)
    BLOCK_N = 64
    col_blocks = _cdiv(N, BLOCK_N)
    split = 1
    if col_blocks < 2 * n_sm:  # too few column blocks to fill the GPU: split the reduction over T
        split = max(1, min(_cdiv(2 * n_sm, col_blocks), _cdiv(M, _T_GRANULE)))
    t_per = _cdiv(_cdiv(M, split), _T_GRANULE) * _T_GRANULE
    split = _cdiv(M, t_per)
    atomic = split > 1
    acc_dtype = torch.float32 if atomic else f.t.dtype
    alloc = torch.zeros if atomic else torch.empty
    d = alloc(f.t.shape, device=x.device, dtype=acc_dtype)
    db = alloc((N,), device=x.device, dtype=acc_dtype) if want_db else d
    _launcher(_wgrad_kernel)[(col_blocks, split)](
        x, h, d, db,
        M, N, f.R, _m_bucket(M), t_per,
        x.stride(0), x.stride(1), h.stride(0), *f.strides(d),
        scale,
        KT=f.kt(d), HAS_DB=want_db, ATOMIC=atomic, RP=_rank_pad(f.R), PREC=_precision(x.dtype), BLOCK_N=BLOCK_N,
    )  # fmt: skip
    if atomic:
        d = d.to(f.t.dtype)
        db = db.to(f.t.dtype)
    return d, (db if want_db else None)


# ---------------------------------------------------------------------------------------------
# Entry points (signatures of reference.py)
# ---------------------------------------------------------------------------------------------


def supported(x: Tensor, *weights: Tensor | None) -> bool:
    """Whether the kernels take these operands: fp32/bf16/fp16 throughout, one device."""
    if x.dtype not in _DTYPES:
        return False
    return all(w is None or (w.dtype == x.dtype and w.device == x.device) for w in weights)


def _fits(a: list[Factor]) -> bool:
    return all(f.R <= MAX_RANK for f in a)


def _forward(x: Tensor, a: list[Factor], b: list[Factor], bias: Tensor | None, scale: float, path: str | None):
    M, K = x.shape
    N = b[0].n_long
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0 or a[0].R == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    if path is None:
        # One pass when each program can hold its rows of h in registers and the row blocks
        # alone fill the GPU; otherwise two kernels (the first splits its reduction over K).
        rank = sum(_rank_pad(f.R) for f in a)
        path = "fused" if rank <= _FUSED_MAX_RANK[x.dtype] and M >= 24 * _num_sms(x.device) else "split"
    if path == "fused":
        return _fused(x, a, b, bias, scale, y)
    if path != "split":
        raise ValueError(f"path must be None, 'fused' or 'split', got {path!r}")
    return _hq(_xa(x, a, 1.0), b, bias, scale, y)


def sklinear_forward(
    x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Tensor | None, *, path: str | None = None
) -> Tensor:
    """y = 1/(2L) Σᵢ (x·S1ᵢ·U1ᵢ + x·U2ᵢ·S2ᵢ) + bias; see reference.sklinear_forward.

    ``path``: None (choose), ``"fused"`` (one kernel) or ``"split"`` (two kernels).
    """
    a = [_stacked_long_mid(S1s), _stacked_long_mid(U2s)]
    if not _fits(a):
        return reference.sklinear_forward(x, S1s, S2s, U1s, U2s, bias)
    b = [_stacked_long_last(U1s), _stacked_long_last(S2s)]
    return _forward(x, a, b, bias, 1.0 / (2 * S1s.shape[0]), path)


def lowrank_forward(
    x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, scale: float, *, path: str | None = None
) -> Tensor:
    """y = scale·(x·A)·B + bias; see reference.lowrank_forward. ``path`` as in sklinear_forward."""
    a = [_plain_a(A)]
    if not _fits(a):
        return reference.lowrank_forward(x, A, B, bias, scale)
    return _forward(x, a, [_plain_b(B)], bias, scale, path)


def _backward(
    grad: Tensor,
    x: Tensor,
    a: list[Factor],
    b: list[Factor],
    train_a: list[bool],
    train_b: list[bool],
    scale: float,
    need_dx: bool,
    need_db: bool,
) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None], Tensor | None]:
    """dx, [dA_p], [dB_p], db of y = scale·(x·A)·B + b, for the factors flagged trainable.

    gh = scale·g·Bᵀ (one pass over g) feeds dx = gh·Aᵀ and dA_p = xᵀ·gh_p. h_p = x·A_p (one pass
    over x, only for the pairs whose B factor trains) feeds dB_p = scale·h_pᵀ·g, whose pass over g
    also sums db.
    """
    dx = None
    da: list[Tensor | None] = [None] * len(a)
    dbs: list[Tensor | None] = [None] * len(b)
    db = None
    if x.shape[0] == 0 or x.shape[1] == 0 or grad.shape[1] == 0:  # empty: nothing to launch
        dx = torch.zeros_like(x) if need_dx else None
        da = [torch.zeros_like(f.t) if t else None for f, t in zip(a, train_a)]
        dbs = [torch.zeros_like(f.t) if t else None for f, t in zip(b, train_b)]
        db = grad.sum(0) if need_db else None
        return dx, da, dbs, db
    if need_dx or any(train_a):
        gh = _xa(grad, b, scale)
        if need_dx:
            dx = _hq(gh, a, None, 1.0, torch.empty(x.shape, device=x.device, dtype=x.dtype))
        col = 0
        for p, f in enumerate(a):
            if train_a[p]:
                da[p] = _wgrad(x, gh[:, col : col + f.R], f, 1.0, False)[0]
            col += f.R
    sel = [p for p in range(len(b)) if train_b[p]]
    if sel:
        h = _xa(x, [a[p] for p in sel], 1.0)
        col = 0
        for p in sel:
            dbs[p], d_bias = _wgrad(grad, h[:, col : col + b[p].R], b[p], scale, need_db and db is None)
            db = d_bias if db is None else db
            col += b[p].R
    if need_db and db is None:
        db = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, da, dbs, db


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
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dS1s, dS2s, db); see reference.sklinear_backward. No gradient for U1s, U2s."""
    a = [_stacked_long_mid(S1s), _stacked_long_mid(U2s)]
    if not _fits(a):
        return reference.sklinear_backward(grad, x, S1s, S2s, U1s, U2s, need_dx, need_dS, need_db)
    b = [_stacked_long_last(U1s), _stacked_long_last(S2s)]
    scale = 1.0 / (2 * S1s.shape[0])
    dx, da, dbs, db = _backward(grad, x, a, b, [need_dS, False], [False, need_dS], scale, need_dx, need_db)
    return dx, da[0], dbs[1], db


def lowrank_backward(
    grad: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float, need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dA, dB, db); see reference.lowrank_backward."""
    a = [_plain_a(A)]
    if not _fits(a):
        return reference.lowrank_backward(grad, x, A, B, scale, need_dx, need_dA, need_dB, need_db)
    dx, da, dbs, db = _backward(grad, x, a, [_plain_b(B)], [need_dA], [need_dB], scale, need_dx, need_db)
    return dx, da[0], dbs[0], db
