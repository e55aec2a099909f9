"""Chunk-parallel Performer kernels (kernels/performer/chunked.py): the scan and the forward.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by conftest): tiny odd shapes with
chunks of 16 and feature tiles of 16, so N = 45 spans three chunks (the last cut short), m = 40
three feature tiles (the last partial), and with more interpreter programs the scan cuts the
chunks into two segments (the last one short). References run in float64 on the same rounded
inputs. Every test runs with fresh allocations poisoned (NaN).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import triton
import triton.language as tl
from panther.kernels.performer import reference as ref

chunked = pytest.importorskip("panther.kernels.performer.chunked")
from panther.kernels.performer import chunked_bwd
from panther.kernels.performer import triton as triton_kernels
from panther_testing import RTOL, assert_close
from performer_testing import LOG2E, chunk_ends, key_max2, logits2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = 16
TILE = 16


@pytest.fixture
def small(monkeypatch):
    """Feature tiles of 16 rows, and enough interpreter programs that the scan of the usual
    shape (B·H = 4, three feature tiles, three chunks) runs two segments of two chunks."""
    monkeypatch.setattr(chunked, "M_TILE", TILE)
    monkeypatch.setattr(triton_kernels, "_target_programs", lambda device, per_sm=None: 16)  # the same segments on CPU and GPU
    monkeypatch.setattr(triton_kernels, "_PLANS", {})


def _inputs(B, H, N, Nk, D, E, m, dtype, mask):
    q = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    k = torch.randn(B, H, Nk, D, device=DEVICE).to(dtype)
    v = torch.randn(B, H, Nk, E, device=DEVICE).to(dtype)
    omega = torch.randn(H, m, D, device=DEVICE).to(dtype)
    key_mask = None
    if mask:
        key_mask = torch.rand(B, Nk, device=DEVICE) > 0.3
        key_mask[:, 0] = True
    return q, k, v, omega, key_mask


def _check(q, k, v, omega, key_mask, kernel_fn, causal, chunk=CHUNK, scale=None):
    """The chunked forward against the reference in float64 on the same rounded inputs."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = chunked.chunked_performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale, chunk_size=chunk)
    exp = ref.performer_attention(*(t.double() for t in (q, k, v, omega)), key_mask, kernel_fn, causal, scale)
    assert out.dtype == v.dtype and out.shape == exp.shape
    assert_close(out, exp, name="out")
    return out


def _last_plan():
    return list(triton_kernels._PLANS.values())[-1]


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_fp32_forward_matches_reference(poison, small, causal, kernel_fn):
    """B2 H2 N45 D20 E28 m40 with a key mask: three chunks, three feature tiles (the last holds 8
    features), two scan segments."""
    _check(*_inputs(2, 2, 45, 45, 20, 28, 40, torch.float32, True), kernel_fn, causal)
    plan = _last_plan()
    assert plan.fwd.meta["BMT"] == TILE and plan.fwd.grid[:2] == (3, 4)
    if causal:
        assert (plan.scan.NC, plan.scan.P, plan.scan.CPS, plan.scan.MP) == (3, 2, 2, 48)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_low_precision_forward_matches_reference(poison, small, dtype, causal):
    _check(*_inputs(2, 2, 45, 45, 20, 28, 40, dtype, True), "softmax", causal)
    if causal:  # the scan's state dtype: bf16 for bf16 inputs (the operand dtype), else fp32
        assert _last_plan().scan.state_dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


# (B, H, N, Nk, D, E, m): ids read as shapes.
SHAPES = {
    "B2H2-N1-Nk9-D16-E16-m16": (2, 2, 1, 9, 16, 16, 16),  # one query (causal: one key)
    "B1H2-N45-Nk30-D20-E28-m24": (1, 2, 45, 30, 20, 28, 24),  # cross attention (causal: Nk = N)
    "B1H3-N33-D32-E20-m12": (1, 3, 33, 33, 32, 20, 12),  # m under one tile
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_forward_shapes(poison, small, shape, causal):
    B, H, N, Nk, D, E, m = SHAPES[shape]
    Nk = N if causal else Nk
    _check(*_inputs(B, H, N, Nk, D, E, m, torch.float32, N > 1), "softmax", causal)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_strided_inputs_and_default_knobs(poison, causal):
    """(B, N, H, D) tensors viewed as (B, H, N, D), default chunk (64) and tile (64): m = 80 is two
    feature tiles, the second holding 16 features."""
    B, H, N, D, m = 2, 2, 45, 16, 80
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))
    omega = torch.randn(H, m, D, device=DEVICE)
    assert not q.is_contiguous()
    _check(q, k, v, omega, None, "softmax", causal, chunk=None, scale=0.3)
    plan = _last_plan()
    assert plan.fwd.meta["BN"] == chunked.CHUNK == 64 and plan.fwd.meta["BMT"] == chunked.M_TILE == 64


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_all_keys_masked_gives_zero(poison, small, causal):
    q, k, v, omega, mask = _inputs(2, 2, 17, 17, 16, 16, 16, torch.float32, True)
    mask[-1] = False
    out = _check(q, k, v, omega, mask, "softmax", causal)
    assert torch.all(out[-1] == 0)


def test_causal_output_ignores_later_keys(poison, small):
    q, k, v, omega, _ = _inputs(1, 2, 45, 45, 16, 16, 40, torch.float32, False)
    out = chunked.chunked_performer_attention(q, k, v, omega, None, "softmax", True, 0.25, chunk_size=CHUNK)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 30:] *= 3.0
    v2[:, :, 30:] = -v2[:, :, 30:]
    out2 = chunked.chunked_performer_attention(q, k2, v2, omega, None, "softmax", True, 0.25, chunk_size=CHUNK)
    torch.testing.assert_close(out2[:, :, :30], out[:, :, :30], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out2[:, :, 30:], out[:, :, 30:])


# ---------------------------------------------------------------------------------------------
# _chunk_attend's contract (the forward, and the backward recomputing it): num, den, mq and mk
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attend_probe(
    Q, K, V, W, MASK, SL, ZL, SG, ZG, NUM, DEN, MQ, MK, MX, EL, EG,
    N, D, E, M, H, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, sve, smb, smn,
    rs, log2_sqrt_m, inv_sqrt_m, eps, CPS, NC, P, MP,
    BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BMT: tl.constexpr, SOFTMAX: tl.constexpr,
    HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, ONLINE: tl.constexpr, FEAT_F32: tl.constexpr,
    PREC: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Grid (chunks, B·H): _chunk_attend's causal num (BH, N, BE), den, mq and mk (BH, N), given
    the causal key stabilizer MX (BH, N) fp32 (read for softmax without ONLINE), or with ONLINE
    the online scan's stabilizers EL, EG."""
    rs, log2_sqrt_m, inv_sqrt_m, eps = triton_kernels._f32(rs, log2_sqrt_m, inv_sqrt_m, eps)
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    num, den, mq, mk, _ = chunked._chunk_attend(
        Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, W, MASK, SL, ZL, SG, ZG,
        b, h, bh, c, CPS, NC, P, MP, N, D, E, M, sqn, sqd, skn, skd, svn, sve, smb, smn,
        rs, log2_sqrt_m, inv_sqrt_m, eps, MX, EL, EG,
        BN, BD, BE, BMT, SOFTMAX, True, HAS_MASK, EVEN_M, ONLINE, FEAT_F32, PREC, INTERP,
    )  # fmt: skip
    rows = c * BN + tl.arange(0, BN)
    offs_e = tl.arange(0, BE)
    tl.store(
        NUM + bh * N * BE + rows[:, None] * BE + offs_e[None, :],
        num,
        mask=rows[:, None] < N,
    )
    tl.store(DEN + bh * N + rows, den, mask=rows < N)
    tl.store(MQ + bh * N + rows, mq, mask=rows < N)
    tl.store(MK + bh * N + rows, mk, mask=rows < N)









def _phi64(x, omega, kernel_fn, scale, stab=None, mask=None):
    """φ in float64 (B, H, N, m): softmax 2^(lg − stab) with stab (B, H, N, 1) in log2 units;
    relu max(ω·xs, 0)/√m + eps. Masked keys 0 (softmax: masked before 2^, where a stabilizer of
    NO_KEY would overflow)."""
    if kernel_fn == "softmax":
        lg = logits2(x, omega, scale)
        if mask is not None:
            lg = lg.masked_fill(~mask[:, None, :, None], float("-inf"))
        return torch.exp2(lg - stab)
    proj = torch.einsum("bhnd,hmd->bhnm", x.double() * math.sqrt(scale), omega.double())
    phi = torch.relu(proj) / math.sqrt(omega.shape[1]) + ref.RELU_EPS
    if mask is not None:
        phi = phi * mask[:, None, :, None].double()
    return phi


@pytest.mark.parametrize("m", [40, 48], ids=["m40-padded-tile", "m48-even"])
@pytest.mark.parametrize(
    "kernel_fn, online", [("softmax", False), ("softmax", True), ("relu", False)], ids=["softmax", "softmax-online", "relu"]
)
def test_chunk_attend_num_den_and_stabilizer(poison, small, kernel_fn, online, m):
    """num, den, mq and mk of _chunk_attend (causal) in the units the backward relies on: mq is
    the row max of the logits over all m features plus log2 √m (0 for relu), and
    [num, den]ᵢ = Σ_{j ≤ i} (φq_i·φk_j)·2^(MX_j − MX_i)·[v_j, 1] with φq = 2^(lg − mq) and, for
    softmax, φk = 2^(lg − MX) each key at its own running key max MX (float64, given to the scan
    and the kernel in fp32): key j enters query i's sums as 2^(lg_j − MX_i), whether through the
    state or inside the chunk. Batch 1's first 20 keys are masked (MX = NO_KEY there, a whole
    chunk and part of the next, and those queries get 0). N = 61: four chunks in two segments of
    two, so chunk 3 reads segment 0's state through the segment factor. Tiles of 16 features:
    m = 40 ends in a partly padded tile (masked), m = 48 has none (EVEN_M, unmasked).

    online (the forward's path): the scan and the kernel are given no MX and find the stabilizers
    themselves (ChunkScan's ``online``); the same sums come out, at an mk that must equal MX (the
    backward reads it from the training stats). Otherwise (the backward's recompute) MX is given,
    and mk returns it."""
    B, H, N, D, E = 2, 2, 61, 20, 12
    q, k, v, omega, mask = _inputs(B, H, N, N, D, E, m, torch.float32, True)
    mask[1, :20] = False
    mask[1, 20] = True
    scale = D**-0.5
    softmax = kernel_fn == "softmax"
    mx = key_max2(k, omega, scale, mask).float().reshape(B * H, N)
    assert torch.all(mx.view(B, H, N)[1, :, :20] == ref.NO_KEY) and torch.all(mx.view(B, H, N)[:, :, 20:] > ref.NO_KEY)
    plan = chunked.ChunkedForwardPlan(q, k, v, omega, mask, kernel_fn, True, scale, CHUNK, False, False)
    cfg = plan.cfg
    sc = chunked.ChunkScan(
        k, v, omega, kernel_fn=kernel_fn, scale=scale, chunk=CHUNK, m_tile=TILE, mask_strides=cfg.mask_strides,
        has_mask=True, online=online, feat_f32=True, prec="ieee",
    )  # fmt: skip
    assert (sc.NC, sc.P) == (4, 2)
    if online:
        SL, ZL, SG, ZG, EL, EG = sc(k, v, omega, mask, None, None, None)
    else:
        SL, ZL, SG, ZG = sc(k, v, omega, mask, None, None, mx if softmax else None)
        EL = EG = mx
    BH, BE = B * H, cfg.BE
    num = torch.empty(BH, N, BE, device=DEVICE)
    den = torch.empty(BH, N, device=DEVICE)
    mq = torch.empty(BH, N, device=DEVICE)
    mk = torch.empty(BH, N, device=DEVICE)
    _attend_probe[(sc.NC, BH)](
        q, k, v, omega, mask, SL, ZL, SG, ZG, num, den, mq, mk, mx, EL, EG,
        N, D, E, m, H, *q.stride(), *k.stride(), *v.stride(), *cfg.mask_strides, *cfg.scal,
        sc.CPS, sc.NC, sc.P, sc.MP,
        BN=CHUNK, BD=cfg.BD, BE=BE, BMT=sc.BMT, SOFTMAX=softmax, HAS_MASK=True,
        EVEN_M=m % sc.BMT == 0, ONLINE=online, FEAT_F32=True, PREC="ieee", INTERP=cfg.interp,
    )  # fmt: skip
    if softmax:
        want_mq = logits2(q, omega, scale).amax(-1) + 0.5 * math.log2(m)
        assert_close(mq, want_mq.reshape(BH, N), name="mq")
        assert_close(mk, mx, name="mk")
        mx64 = mx.double().reshape(B, H, N)
        phq = _phi64(q, omega, kernel_fn, scale, mq.double().reshape(B, H, N, 1))
        phk = _phi64(k, omega, kernel_fn, scale, mx64[..., None], mask)
        # (query i, key j): 2^(MX_j − MX_i), ≤ 1 where j ≤ i (clamped above, where tril drops it)
        rel = torch.exp2((mx64[..., None, :] - mx64[..., :, None]).clamp_max(0.0))
    else:
        assert torch.all(mq == 0) and torch.all(mk == 0)
        phq = _phi64(q, omega, kernel_fn, scale)
        phk = _phi64(k, omega, kernel_fn, scale, mask=mask)
        rel = 1.0
    a = ((phq @ phk.transpose(-1, -2)) * rel).tril()
    assert_close(num[:, :, :E], (a @ v.double()).reshape(BH, N, E), name="num")
    assert torch.all(num[:, :, E:] == 0)
    assert_close(den, a.sum(-1).reshape(BH, N), name="den")
    assert torch.all(num.view(B, H, N, BE)[1, :, :20] == 0) and torch.all(den.view(B, H, N)[1, :, :20] == 0)


# ---------------------------------------------------------------------------------------------
# the scan alone: chunk c's state SL[c] + SG[c // CPS]·f against float64 sums over earlier
# (later) positions
# ---------------------------------------------------------------------------------------------

# id: (query, reverse, weighted, kernel_fn, dtype). Softmax scans come as keys-prefix (the forward's
# and the backward's key scan) and queries-suffix (the backward's R) only: the causal key
# stabilizer's scales (_scan_kernel) are defined for those two, the only ones the plans run.
SCANS = {
    "keys-prefix-softmax-mask-fp32": (False, False, False, "softmax", torch.float32),
    "keys-suffix-relu-mask-fp32": (False, True, False, "relu", torch.float32),
    "keys-prefix-softmax-mask-bf16": (False, False, False, "softmax", torch.bfloat16),
    "queries-suffix-softmax-weighted-fp32": (True, True, True, "softmax", torch.float32),
    "queries-prefix-relu-weighted-fp32": (True, False, True, "relu", torch.float32),
    "queries-suffix-softmax-weighted-bf16": (True, True, True, "softmax", torch.bfloat16),
}


@pytest.mark.parametrize("case", list(SCANS), ids=list(SCANS))
def test_scan_matches_cumsum(poison, small, case):
    """Chunk c's state SL[c] + SG[c // CPS]·f (f: the factor of chunked._segment_factor; 1 for
    relu) against float64 sums over the chunks before c (after c, reversed). Keys scan v (strided
    (B, H, N, E)) under the key mask; queries scan a (B·H, N, BE) fp32 buffer whose columns past E
    are NaN (never read) with a given per-row stabilizer and weighted z, as the backward's gs / gd.
    Softmax scans take the causal key stabilizer MX (float64 from the scanned keys, or from other
    keys for queries, with batch 1's first 20 keys masked so that it starts at NO_KEY for more
    than a chunk; given in fp32). With E(c) = MX at chunk c's last position: keys sum
    2^(lg_j − E(c − 1)) ⊗ v_j over j < c·C; queries sum 2^(lg_i − stab_i)·2^(E(c) − MX_i) ⊗ vals_i
    over the chunks after c. N = 61: four chunks (the last cut short) in two segments of two, so
    a non-trivial segment factor meets a nonzero SG for keys (chunk 3) and queries (chunk 0)."""
    query, reverse, weighted, kernel_fn, dtype = SCANS[case]
    softmax = kernel_fn == "softmax"
    assert not softmax or query == reverse  # (see SCANS)
    B, H, N, D, E, m = 2, 2, 61, 20, 12, 40
    BH, BE, scale = B * H, 16, 0.3
    x = torch.randn(B, N, H, D, device=DEVICE).to(dtype).transpose(1, 2)  # strided
    omega = torch.randn(H, m, D, device=DEVICE).to(dtype)
    feat_f32 = dtype != torch.bfloat16
    kmask = torch.rand(B, N, device=DEVICE) > 0.3
    kmask[1, :20] = False
    mask = stab = zw = mx = None
    if softmax:
        keys = torch.randn(B, H, N, D, device=DEVICE).to(dtype) if query else x
        mx = key_max2(keys, omega, scale, kmask).float().reshape(BH, N)
        assert torch.all(mx[H:, :20] == ref.NO_KEY)
    if query:
        vals = torch.full((BH, N, BE), float("nan"), device=DEVICE)
        vals[:, :, :E] = torch.randn(BH, N, E, device=DEVICE)
        vals64 = vals[:, :, :E].double()
        zw = torch.randn(BH, N, device=DEVICE)
        if softmax:
            stab = (logits2(x, omega, scale).amax(-1) + 0.5 * math.log2(m)).float().reshape(BH, N)
        phi = _phi64(x, omega, kernel_fn, scale, None if stab is None else stab.double().reshape(B, H, N, 1))
    else:
        vals = torch.randn(B, N, H, E, device=DEVICE).to(dtype).transpose(1, 2)
        vals64 = vals.double().reshape(BH, N, E)
        mask = kmask
        phi = _phi64(x, omega, kernel_fn, scale, None if mx is None else mx.double().reshape(B, H, N, 1), mask)
    scan = chunked.ChunkScan(
        x, vals, omega, kernel_fn=kernel_fn, scale=scale, chunk=CHUNK, m_tile=TILE, e=E,
        mask_strides=mask.stride() if mask is not None else (0, 0), has_mask=mask is not None, query=query,
        weighted=weighted, reverse=reverse, feat_f32=feat_f32, prec="ieee" if dtype == torch.float32 else "tf32",
    )  # fmt: skip
    NC, P, CPS, MP = scan.NC, scan.P, scan.CPS, scan.MP
    assert (NC, P, CPS, MP, scan.BE) == (4, 2, 2, 48, BE)
    SL, ZL, SG, ZG = scan(x, vals, omega, mask, stab, zw, mx)
    assert SL.dtype == (torch.float32 if feat_f32 else torch.bfloat16) and SL.shape == (BH, NC, MP, BE)
    assert ZL.shape == (BH, NC, MP) and SG.shape == (BH, P, MP, BE) and ZG.shape == (BH, P, MP)
    # Chunk c's weight of each position (BH, NC, N) in float64: the positions it sums, times the
    # factor to its scale (softmax).
    c = torch.arange(NC, device=DEVICE)
    pos_chunk = torch.arange(N, device=DEVICE) // CHUNK
    summed = pos_chunk[None, :] > c[:, None] if reverse else pos_chunk[None, :] < c[:, None]  # (NC, N)
    seg = c // CPS
    if softmax:
        mx64 = mx.double()
        ends = chunk_ends(mx64, CHUNK)  # E(c) at c + 1
        if query:  # 2^(E(c) − MX_i); chunk c's SG at E(last chunk of its segment)
            expo = ends[:, 1:, None] - mx64[:, None, :]
            f = torch.exp2(ends[:, c + 1] - ends[:, torch.clamp((seg + 1) * CPS, max=NC)])
        else:  # 2^(MX_j − E(c − 1)); SG at E(s·CPS − 1), the chunk before the segment
            expo = mx64[:, None, :] - ends[:, :-1, None]
            f = torch.exp2(ends[:, seg * CPS] - ends[:, c])
        assert torch.all(expo[:, summed] <= 0) and torch.all(f <= 1)
        wgt = torch.where(summed, torch.exp2(expo), 0.0)
    else:
        wgt = summed.double().expand(BH, NC, N)
        f = torch.ones(BH, NC, dtype=torch.float64, device=DEVICE)
    phi = phi.reshape(BH, N, m)
    wz = zw.double() if weighted else torch.ones(BH, N, dtype=torch.float64, device=DEVICE)
    want_s = torch.einsum("bcn,bnf,bne->bcfe", wgt, phi, vals64)
    want_z = torch.einsum("bcn,bnf,bn->bcf", wgt, phi, wz)
    got_s = SL.double() + SG.double()[:, seg] * f[..., None, None]
    got_z = ZL.double() + ZG.double()[:, seg] * f[..., None]
    tol = RTOL[torch.float32] if feat_f32 else RTOL[torch.bfloat16]
    assert_close(got_s[:, :, :m, :E], want_s, rtol=tol, name="S")
    assert_close(got_z[:, :, :m], want_z, rtol=tol, name="z")
    # Padded features and columns hold exact zeros; each segment's first chunk (last, reversed)
    # holds a zero local state, its SG the other segments' sum.
    assert torch.all(got_s[:, :, m:] == 0) and torch.all(got_s[:, :, :, E:] == 0) and torch.all(got_z[:, :, m:] == 0)
    first = [min(s * CPS + CPS, NC) - 1 if reverse else s * CPS for s in range(P)]
    assert torch.all(SL[:, first] == 0) and torch.all(ZL[:, first] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_online_scan_stabilizers_and_states(poison, small, dtype):
    """The forward's key scan with ``online`` (no MX given): each program's stabilizer is the
    largest logit (+ log2 √m) of its feature tile over the keys it has summed, and the states are
    at it. Against float64 from the same rounded inputs, per chunk c and feature tile t:

    * EL[c, t] = max over the unmasked keys j of c's segment before c and the features f of tile
      t of lg_jf + log2 √m (NO_KEY where there is none), SL[c, f] = Σ those j of
      2^(lg_jf − EL[c, t])/√m·v_j (z: Σ 2^(…)/√m);
    * after the segment scan, EG[s, t] = the same max over the keys of the segments before s, and
      SG[s] their sum at it.

    Every factor is then ≤ 1, and SL·2^(EL) + SG·2^(EG) is the plain prefix sum. Batch 1's first
    20 keys are masked (NO_KEY through chunk 0 and into segment 1's first chunk); N = 61: four
    chunks in two segments of two; m = 40: three tiles of 16, the last partly padded."""
    B, H, N, D, E, m = 2, 2, 61, 20, 12, 40
    BH, scale = B * H, 0.3
    k = torch.randn(B, N, H, D, device=DEVICE).to(dtype).transpose(1, 2)  # strided
    v = torch.randn(B, N, H, E, device=DEVICE).to(dtype).transpose(1, 2)
    omega = torch.randn(H, m, D, device=DEVICE).to(dtype)
    mask = torch.rand(B, N, device=DEVICE) > 0.3
    mask[1, :20] = False
    mask[0, 0] = True
    feat_f32 = dtype != torch.bfloat16
    scan = chunked.ChunkScan(
        k, v, omega, kernel_fn="softmax", scale=scale, chunk=CHUNK, m_tile=TILE, mask_strides=mask.stride(),
        has_mask=True, online=True, feat_f32=feat_f32, prec="ieee" if dtype == torch.float32 else "tf32",
    )  # fmt: skip
    NC, P, CPS, MP, NT = scan.NC, scan.P, scan.CPS, scan.MP, scan.NT
    assert (NC, P, CPS, MP, NT) == (4, 2, 2, 48, 3)
    SL, ZL, SG, ZG, EL, EG = scan(k, v, omega, mask, None, None, None)
    assert EL.shape == (BH, NC, NT) and EG.shape == (BH, P, NT) and EL.dtype == EG.dtype == torch.float32
    lg = logits2(k, omega, scale).masked_fill(~mask[:, None, :, None], float("-inf")).reshape(BH, N, m)
    lg = torch.nn.functional.pad(lg, (0, MP - m), value=float("-inf"))  # padded features: none
    v64 = v.double().reshape(BH, N, E)
    pos = torch.arange(N, device=DEVICE)
    tol = RTOL[torch.float32] if feat_f32 else RTOL[torch.bfloat16]

    def at_stabilizer(keys, got_e, got_s, got_z, name):
        # keys (N,) bool: the positions summed. Stabilizer per feature tile, then the sums at it.
        lk = lg.masked_fill(~keys[None, :, None], float("-inf"))
        want_e = (lk.reshape(BH, N, NT, TILE).amax((1, 3)) + 0.5 * math.log2(m)).clamp_min(ref.NO_KEY)  # (BH, NT)
        none = want_e == ref.NO_KEY
        assert torch.all(got_e[none] == ref.NO_KEY), name
        assert_close(got_e[~none], want_e[~none], rtol=RTOL[torch.float32], name=f"{name} stabilizer")
        stab = want_e.repeat_interleave(TILE, 1)[:, None, :] - 0.5 * math.log2(m)  # (BH, 1, MP)
        phi = torch.exp2(lk - stab) / math.sqrt(m)
        assert torch.all(phi <= 1 / math.sqrt(m) + 1e-12)
        assert_close(got_s.double()[:, :, :E], torch.einsum("bnf,bne->bfe", phi, v64), rtol=tol, name=name)
        assert_close(got_z.double(), phi.sum(1), rtol=tol, name=f"{name} z")
        assert torch.all(got_s[:, m:] == 0) and torch.all(got_s[:, :, E:] == 0)

    for c in range(NC):
        s = c // CPS
        at_stabilizer((pos >= s * CPS * CHUNK) & (pos < c * CHUNK), EL[:, c], SL[:, c], ZL[:, c], f"chunk {c}")
    for s in range(P):
        at_stabilizer(pos < s * CPS * CHUNK, EG[:, s], SG[:, s], ZG[:, s], f"segment {s}")
    assert torch.all(EL[H:, 0] == ref.NO_KEY) and torch.all(EG[:, 0] == ref.NO_KEY)


@pytest.mark.parametrize(
    "dtype,D,ND",
    [(torch.float32, 20, 1), (torch.float32, 80, 3), (torch.bfloat16, 80, 1), (torch.bfloat16, 160, 3)],
    ids=["fp32-D20-whole", "fp32-D80-blocks", "bf16-D80-whole", "bf16-D160-blocks"],
)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_key_max_prepass_matches_reference(poison, monkeypatch, dtype, D, ND, masked):
    """triton.py's causal softmax key stabilizer (the pre-pass of _Cfg.key_max: each key's
    largest logit, then the running max over positions) against reference.causal_key_max in
    float64, in the kernels' units (× log2 e, log2 √m added). Chunks of 16 keys (N = 45: three,
    the last cut short; the running max crosses them) and feature tiles of 16 (m = 40: the last
    partial); the head dim whole (ND = 1) or in blocks (fp32: 32 columns, bf16: 64; the last
    partial). With the mask, batch 1's first 20 keys are masked (a whole chunk and part of the
    next): no key there yet, so exactly NO_KEY."""
    monkeypatch.setattr(triton_kernels, "KEY_MAX_ROWS", 16)
    monkeypatch.setattr(triton_kernels, "KEY_MAX_FEATURES", 16)
    B, H, N, E, m = 2, 2, 45, 12, 40
    q, k, v, omega, mask = _inputs(B, H, N, N, D, E, m, dtype, True)
    mask[1, :20] = False
    key_mask = mask if masked else None
    scale = D**-0.5
    cfg = triton_kernels._Cfg(q, k, v, omega, key_mask, "softmax", True, scale, CHUNK, False, False)
    assert cfg.ND == ND
    plan = types.SimpleNamespace(key_max=cfg.key_max_launch(k))
    mx = cfg.key_max(plan, k, omega, mask if masked else q)
    assert mx.shape == (B * H, N) and mx.dtype == torch.float32
    km = ref.causal_key_max(k.double(), omega.double(), scale, key_mask).reshape(B * H, N)
    none = km == ref.NO_KEY
    assert bool(none.any()) == masked and bool(none[H:, :20].all()) == masked
    assert torch.all(mx[none] == ref.NO_KEY)
    assert_close(mx[~none], km[~none] * LOG2E + 0.5 * math.log2(m), rtol=RTOL[torch.float32], name="key max")
    assert torch.all(mx[:, 1:] >= mx[:, :-1])
    # Relu and non-causal calls run no pre-pass.
    for kernel_fn, causal in (("relu", True), ("softmax", False)):
        other = triton_kernels._Cfg(q, k, v, omega, None, kernel_fn, causal, scale, CHUNK, False, False)
        assert other.key_max_launch(k) is None


@pytest.mark.parametrize("m", [40, 64])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_key_pass_state_matches_reference(poison, monkeypatch, kernel_fn, dtype, masked, m):
    """The non-causal key pass and its reduce: S = Σ φ(k)ᵀv and z = Σ φ(k) over the unmasked keys,
    in three segments (one chunk each) and four feature tiles (m = 40: the third partial, the
    fourth all padding; m = 64: four full tiles, EVEN_M). Softmax keys come out scaled by 2^−C
    with C the largest logit (log2 units) of their (batch, head), however the programs' own maxima
    differed. With the mask, batch 1 keeps keys in its first chunk only, so two of its segments
    see no key at all; without it, the first two segments take the path with no element mask
    and the third holds the last 13 rows."""
    monkeypatch.setattr(chunked, "M_TILE", TILE)
    monkeypatch.setattr(triton_kernels, "_target_programs", lambda device, per_sm=None: 48)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    q, k, v, omega, mask = _inputs(2, 2, 45, 45, 20, 28, m, dt, True)
    mask[1, 16:] = False
    if not masked:
        mask = torch.ones_like(mask)
    scale = 20**-0.5
    kmask = mask if masked else None
    plan = chunked.ChunkedForwardPlan(q, k, v, omega, kmask, kernel_fn, False, scale, CHUNK, False, False)
    assert plan.P_state == 3 and plan.state.grid[0] == 4  # segments, feature tiles
    assert plan.state.meta["EVEN_M"] == (m == 64) and plan.state.meta["HAS_MASK"] == masked
    S, z, _ = plan.cfg.run_state(plan, k, v, omega, mask if masked else q, plan.cfg.BM)
    assert S.shape == (4, 64, 32) and S.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
    kd, vd, od = (t.double() for t in (k, v, omega))
    xs = kd * math.sqrt(scale)
    proj = torch.einsum("bhnd,hmd->bhnm", xs, od)
    valid = mask[:, None, :, None]
    if kernel_fn == "softmax":
        lg = (proj - 0.5 * (xs * xs).sum(-1, keepdim=True)) * LOG2E
        lg = lg.masked_fill(~valid, float("-inf"))
        phi = torch.exp2(lg - lg.amax((-1, -2), keepdim=True))
    else:
        phi = (torch.relu(proj) / math.sqrt(m) + ref.RELU_EPS) * valid
    S_want = (phi.transpose(-1, -2) @ vd).reshape(4, m, 28)
    z_want = phi.sum(-2).reshape(4, m)
    assert_close(S[:, :m, :28], S_want, rtol=RTOL[dt], name="S")
    assert_close(z[:, :m], z_want, rtol=RTOL[dt], name="z")
    assert torch.all(S[:, m:] == 0) and torch.all(S[..., 28:] == 0) and torch.all(z[:, m:] == 0)


# ---------------------------------------------------------------------------------------------
# plans, knobs, shapes
# ---------------------------------------------------------------------------------------------


def test_plans_are_cached_and_knobs_take_effect(poison, monkeypatch):
    monkeypatch.setattr(triton_kernels, "_PLANS", {})
    q, k, v, omega, mask = _inputs(1, 2, 33, 33, 16, 12, 24, torch.float32, True)
    args = (omega, mask, "softmax", True, 0.3)
    exp = ref.performer_attention(*(t.double() for t in (q, k, v, omega)), *args[1:])
    for _ in range(2):
        assert_close(
            chunked.chunked_performer_attention(q, k, v, *args, chunk_size=CHUNK),
            exp,
            name="out",
        )
    assert len(triton_kernels._PLANS) == 1
    plan = _last_plan()
    assert isinstance(plan, chunked.ChunkedForwardPlan) and plan.fwd.opts["num_warps"] == chunked.WARPS
    assert plan.fwd.meta["BMT"] == 32  # M_TILE = 64 clamped to the padded m
    monkeypatch.setattr(chunked, "M_TILE", 16)
    monkeypatch.setattr(chunked, "CHUNK", 32)
    monkeypatch.setattr(chunked, "WARPS", 2)
    monkeypatch.setattr(chunked, "SCAN_WARPS", 1)
    assert_close(chunked.chunked_performer_attention(q, k, v, *args), exp, name="out (knobs)")
    plan = _last_plan()
    assert len(triton_kernels._PLANS) == 1 and plan.fwd.meta["BMT"] == 16 and plan.fwd.meta["BN"] == 32
    assert plan.fwd.opts["num_warps"] == 2 and plan.scan.scan.opts["num_warps"] == 1


# (B, H, N, D, E, m): ids read as shapes. Under ``small`` (chunks and feature tiles of 16, 16
# interpreter programs) the output pass takes 16 // (B·H) programs per (batch, head).
OUT_SHAPES = {
    "B2H2-N100-D20-E28-m40": (2, 2, 100, 20, 28, 40),  # 7 chunks in groups of 2 (the last alone); 3 tiles, the last partial
    "B1H2-N45-D16-E16-m64": (1, 2, 45, 16, 16, 64),  # 4 whole tiles; 3 chunks, one a program
    "B1H1-N1-D32-E20-m12": (1, 1, 1, 32, 20, 12),  # one query, one partial tile
}


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", list(OUT_SHAPES), ids=list(OUT_SHAPES))
def test_out_pass_kernel_matches_reference(poison, small, monkeypatch, shape, dtype, kernel_fn):
    """The non-causal output pass with the feature tiles held across query chunks
    (_out_pass_kernel, forced for every dtype), against float64, with a key mask."""
    monkeypatch.setattr(chunked, "OUT_PERSIST", True)
    monkeypatch.setattr(chunked, "OUT_MAX_TILES", 4)  # (the most the kernel holds)
    B, H, N, D, E, m = OUT_SHAPES[shape]
    _check(*_inputs(B, H, N, N + 3, D, E, m, dtype, True), kernel_fn, False)
    plan = _last_plan()
    nc = triton.cdiv(N, CHUNK)
    cpp = triton.cdiv(nc, min(nc, 16 // (B * H)))
    assert plan.out_pass is not None and plan.out_pass.grid[:2] == (triton.cdiv(nc, cpp), B * H)
    assert plan.out_pass.meta["NT"] == triton.cdiv(m, TILE) and plan.out_pass.scalars[-3] == cpp


def test_out_pass_kernel_choice(poison, small, monkeypatch):
    """Auto (None): the held-tiles output pass for bf16 (bf16 features and state) with padded
    D = 64, padded E ≤ 64, m in ≤ OUT_MAX_TILES tiles (2 by default; the kernel holds up to 4) and
    ≥ OUT_MIN_CHUNKS chunks a program; False: never; True: any dtype; never causal. The plan then
    has no _fwd_chunk_kernel launch."""
    # N = 130: 9 chunks of 16, 16 // (B·H = 2) = 8 programs: 2 chunks a program (the last 1).
    monkeypatch.setattr(chunked, "OUT_MIN_CHUNKS", 2)

    def out_pass(dtype, m=32, D=40, E=40, causal=False, N=130):
        _check(*_inputs(1, 2, N, N, D, E, m, dtype, False), "softmax", causal)
        plan = _last_plan()
        assert (plan.out_pass is None) != (plan.fwd is None)
        return plan.out_pass is not None

    assert out_pass(torch.bfloat16) and not out_pass(torch.float16) and not out_pass(torch.float32)
    assert not out_pass(torch.bfloat16, m=40)  # 3 tiles of 16
    assert not out_pass(torch.bfloat16, D=80, E=80) and not out_pass(torch.bfloat16, D=20)  # padded D 128, 32
    assert not out_pass(torch.bfloat16, N=100)  # 7 chunks: 1 a program
    assert not out_pass(torch.bfloat16, causal=True)
    monkeypatch.setattr(chunked, "OUT_MAX_TILES", 8)
    assert out_pass(torch.bfloat16, m=64) and not out_pass(torch.bfloat16, m=80)  # 4 tiles; 5
    monkeypatch.setattr(chunked, "OUT_PERSIST", False)
    assert not out_pass(torch.bfloat16)
    monkeypatch.setattr(chunked, "OUT_PERSIST", True)
    assert out_pass(torch.float32) and not out_pass(torch.float32, m=80)


@pytest.mark.parametrize(
    "D,E,dtype,ok",
    [
        (64, 64, torch.bfloat16, True),
        (128, 128, torch.bfloat16, True),
        (100, 60, torch.bfloat16, False),  # E below D (padded 64 < 128): see chunked_supports
        (60, 100, torch.bfloat16, True),
        (64, 32, torch.bfloat16, False),
        (64, 64, torch.float32, True),
        (100, 64, torch.float32, False),  # fp32 features: whole head dims up to 64
        (128, 64, torch.float16, False),
        (200, 64, torch.bfloat16, False),
        (64, 256, torch.bfloat16, False),
    ],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_chunked_supports(D, E, dtype, ok):
    q, v, omega = (
        torch.empty(1, 1, 2, D, dtype=dtype),
        torch.empty(1, 1, 2, E, dtype=dtype),
        torch.empty(1, 512, D),
    )
    assert chunked.chunked_supports(q, v, omega) is ok


def test_rejects_bad_arguments():
    q, k, v, omega, _ = _inputs(1, 2, 17, 17, 16, 16, 16, torch.float32, False)
    with pytest.raises(ValueError, match="kernel_fn"):
        chunked.chunked_performer_attention(q, k, v, omega, None, "gelu", True, 0.25)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked.chunked_performer_attention(q, k, v, omega, None, "softmax", True, 0.25, chunk_size=24)
    wide = torch.randn(1, 2, 17, 100)
    with pytest.raises(ValueError, match="head dim 100"):
        chunked.chunked_performer_attention(wide, wide, v, torch.randn(2, 16, 100), None, "softmax", True, 0.25)
    with pytest.raises(ValueError, match="m_tile"):
        chunked.ChunkScan(
            k,
            v,
            omega,
            kernel_fn="softmax",
            scale=0.25,
            chunk=16,
            m_tile=24,
            feat_f32=True,
            prec="ieee",
        )


def test_dispatch_between_kernel_families(poison, monkeypatch):
    """triton.py's PATH: "auto" runs causal calls of up to CHUNKED_MAX_N positions and every
    non-causal forward on the chunked kernels, the rest (longer causal calls, the non-causal
    backward, heads wider than one tile) on the segment kernels; "segments"/"chunked" force a family
    where it applies. Every path matches the reference."""
    monkeypatch.setattr(triton_kernels, "_PLANS", {})
    monkeypatch.setattr(triton_kernels, "CHUNKED_MAX_N", 40)
    seg_f, seg_b = triton_kernels._ForwardPlan, triton_kernels._BackwardPlan
    chk_f, chk_b = chunked.ChunkedForwardPlan, chunked_bwd.ChunkedBackwardPlan

    def run(N, causal, D=16):
        q, k, v, omega, mask = _inputs(1, 2, N, N, D, 12, 24, torch.float32, True)
        args = (omega, mask, "softmax", causal, 0.3)
        up = [t.double() for t in (q, k, v, omega)]
        assert_close(
            triton_kernels.performer_attention(q, k, v, *args, chunk_size=CHUNK),
            ref.performer_attention(*up, *args[1:]),
            name="out",
        )
        fwd = type(_last_plan())
        grad = torch.randn(1, 2, N, 12, device=DEVICE)
        got = triton_kernels.performer_attention_backward(grad, q, k, v, *args, chunk_size=CHUNK)
        want = ref.performer_attention_backward(grad.double(), *up, *args[1:])
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert_close(a, b, name=name)
        return fwd, type(_last_plan())

    assert run(33, True) == (chk_f, chk_b)
    assert run(45, True) == (seg_f, seg_b)  # past CHUNKED_MAX_N
    assert run(45, False) == (chk_f, seg_b)
    assert run(33, True, D=80) == (seg_f, seg_b)  # fp32 features: one tile holds D ≤ 64
    monkeypatch.setattr(triton_kernels, "PATH", "segments")
    assert run(33, True) == (seg_f, seg_b) and run(33, False) == (seg_f, seg_b)
    monkeypatch.setattr(triton_kernels, "PATH", "chunked")
    assert run(45, True) == (chk_f, chk_b) and run(45, False) == (chk_f, seg_b)
