"""Causal backward of the chunk-parallel Performer kernels (kernels/performer/chunked_bwd.py).

Kernel-level tests feed the chunk kernels states built in float64 PyTorch from the reference
feature map (several segments, so both parts of the state layout are read); end-to-end tests run
``ChunkedBackwardPlan`` (scans included). Everything is compared with the reference backward in
float64 on the same rounded inputs. Without CUDA the kernels run under ``TRITON_INTERPRET=1``
(conftest), so shapes are tiny: chunks and feature tiles of 16, m = 40 (three tiles, the last
partial), N = 45 (three chunks, the last cut short). Every test runs with fresh allocations
poisoned.
"""

from __future__ import annotations

import math

import pytest
import torch
from panther.kernels.performer import reference as ref

triton_kernels = pytest.importorskip("panther.kernels.performer.triton")
chunked_bwd = pytest.importorskip("panther.kernels.performer.chunked_bwd")

from panther_testing import RTOL, assert_close
from performer_testing import LOG2E, chunk_ends, key_max2, logits2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = 16
TILE = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(B, H, N, D, E, m, dtype, mask, all_off=False, seed_shift=0, lead_off=0):
    q = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    k = torch.randn(B, H, N, D, device=DEVICE).to(dtype)
    v = torch.randn(B, H, N, E, device=DEVICE).to(dtype)
    omega = torch.randn(H, m, D, device=DEVICE).to(dtype)
    key_mask = None
    if mask:
        key_mask = torch.rand(B, N, device=DEVICE) > 0.3
        key_mask[:, 0] = True
        if all_off:
            key_mask[-1] = False  # every key of the last batch masked: every gradient is 0 there
        if lead_off:  # the last batch's first keys masked: no key yet (MX = NO_KEY) for their queries
            key_mask[-1, :lead_off] = False
    grad = torch.randn(B, H, N, E, device=DEVICE).to(dtype)
    return grad, q, k, v, omega, key_mask


def _expected(grad, q, k, v, omega, key_mask, kernel_fn, scale):
    up = [t.double() for t in (grad, q, k, v, omega)]
    return ref.performer_attention_backward(*up, key_mask, kernel_fn, True, scale)


def _assert_grads(got, want, inputs, zero=(), gmax=1.0):
    """Gradients named in zero are 0 in exact arithmetic (both sides hold rounding noise only):
    checked to be tiny against the largest upstream gradient gmax instead."""
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        if name in zero:
            assert torch.isfinite(g).all() and g.abs().max() <= 1e-5 * gmax, name
        else:
            assert_close(g, w, name=name)


# ---------------------------------------------------------------------------------------------
# states in float64 PyTorch, in the layout of kernels/performer/chunked.py
# ---------------------------------------------------------------------------------------------








def _states(phi, vals, zw, mx, C, CPS, reverse, MP, BE, sdt):
    """SL (BH, NC, MP, BE) sdt, ZL (BH, NC, MP), SG (BH, P, MP, BE), ZG (BH, P, MP) fp32, built in
    float64 from φ (B, H, N, m) (masked keys 0), vals (B, H, N, E) and the z weights zw (B, H, N),
    at the scales the chunk kernels read. mx (BH, N): the causal key stabilizer MX (softmax: keys'
    φ each at its own MX, queries' at mq), None for no factors (relu). With E(c) = MX at chunk
    c's last position: keys (prefix) SL[c] = Σ φⱼ·2^(MXⱼ − E(c − 1)) ⊗ valsⱼ over the earlier
    chunks of c's segment and SG[s] the same over the chunks before segment s, at E(s·CPS − 1);
    queries (reverse, suffix) SL[c] = Σ φᵢ·2^(E(c) − MXᵢ) ⊗ valsᵢ over the later chunks of c's
    segment and SG[s] the same over the chunks after segment s, at E(its last chunk)."""
    B, H, N, m = phi.shape
    BH, E = B * H, vals.shape[-1]
    NC = -(-N // C)
    P = -(-NC // CPS)
    dev = phi.device
    pos = torch.arange(N, device=dev) // C  # each position's chunk
    c = torch.arange(NC, device=dev)
    s = torch.arange(P, device=dev)
    first = (c // CPS) * CPS  # first and last chunk of c's segment, last chunk of segment s
    last = torch.clamp(first + CPS, max=NC) - 1
    s_last = torch.clamp((s + 1) * CPS, max=NC) - 1
    if reverse:
        parts = (
            ((pos[None] > c[:, None]) & (pos[None] <= last[:, None]), c),
            (pos[None] > s_last[:, None], s_last),
        )
    else:
        parts = (
            ((pos[None] < c[:, None]) & (pos[None] >= first[:, None]), c - 1),
            (pos[None] < (s * CPS)[:, None], s * CPS - 1),
        )
    f, x, w = phi.reshape(BH, N, m), vals.reshape(BH, N, E), zw.reshape(BH, N)
    out = []
    for summed, at in parts:  # summed (K, N): the positions each part sums; at: the chunk of its scale
        if mx is None:
            wt = summed.double().expand(BH, -1, -1)
        else:
            e = chunk_ends(mx, C)[:, at + 1, None]  # (BH, K, 1)
            expo = e - mx[:, None, :] if reverse else mx[:, None, :] - e
            assert torch.all(expo[:, summed] <= 0)
            wt = torch.where(summed, torch.exp2(expo), 0.0)
        out += [torch.einsum("bkn,bnf,bne->bkfe", wt, f, x), torch.einsum("bkn,bnf,bn->bkf", wt, f, w)]

    def pad(t, last2):
        return torch.nn.functional.pad(t, (0, BE - E, 0, MP - m) if last2 else (0, MP - m)).contiguous()

    SL, ZL, SG, ZG = out
    return pad(SL, True).to(sdt), pad(ZL, False).float(), pad(SG, True).float(), pad(ZG, False).float()


def _pair_weights(q, k, omega, key_mask, kernel_fn, scale, mq, mx):
    """(B, H, N, N) float64: [i, j] = φq_i·φk_j, masked keys 0. Softmax: φq = exp2(lg_q − mq),
    φk = exp2(lg_k − MX) and the pair's factor exp2(min(MX_j − MX_i, 0)), with mq, mx (B, H, N)
    the stabilizers the kernel used (log2 units, log2 √m folded in); relu: relu(ω·xs)/√m + eps
    (mq, mx not read). Causal sums take its lower triangle."""
    m = omega.shape[1]
    if kernel_fn == "softmax":
        lgk = logits2(k, omega, scale)
        if key_mask is not None:
            lgk = lgk.masked_fill(~key_mask[:, None, :, None], float("-inf"))
        phq = torch.exp2(logits2(q, omega, scale) - mq[..., None])
        phk = torch.exp2(lgk - mx[..., None])
        rel = torch.exp2((mx[..., None, :] - mx[..., :, None]).clamp_max(0.0))
    else:
        proj = [torch.einsum("bhnd,hmd->bhnm", x.double() * math.sqrt(scale), omega.double()) for x in (q, k)]
        phq, phk = (torch.relu(p) / math.sqrt(m) + ref.RELU_EPS for p in proj)
        if key_mask is not None:
            phk = phk * key_mask[:, None, :, None]
        rel = 1.0
    return (phq @ phk.transpose(-1, -2)) * rel


def _scores_want(q, k, omega, key_mask, kernel_fn, scale, mq, mx, C):
    """The intra-chunk scores A (B, H, N, C) in float64, in the layout of chunked.stats_scores:
    [i, j] = the pair weight (:func:`_pair_weights`) of query i and key c0 + j ≤ i of its chunk
    (c0 = its first position), else 0."""
    B, H, N, _ = q.shape
    full = _pair_weights(q, k, omega, key_mask, kernel_fn, scale, mq, mx)
    i = torch.arange(N, device=q.device)[:, None]
    j = (i // C) * C + torch.arange(C, device=q.device)[None, :]  # key positions of i's chunk
    keep = j <= i
    got = full.gather(-1, j.clamp(max=N - 1).expand(B, H, N, C))
    return torch.where(keep, got, 0.0)


def _kernel_run(grad, q, k, v, omega, key_mask, kernel_fn, scale, CPS, which):
    """Run one chunk kernel on states built in float64 from the reference (CPS chunks per
    segment), with the causal key stabilizer MX of reference.causal_key_max (in the kernels'
    units, fp32): which = "q" gives dq, "k" gives (dk, dv). The dq pass recomputes the forward
    and writes its intra-chunk scores into a stats workspace: "q" returns them too, in float64
    with the expected values; "k" reads them from stats built in float64."""
    cfg = triton_kernels._Cfg(q, k, v, omega, key_mask, kernel_fn, True, scale, CHUNK, False, False)
    B, H, N, m = cfg.B, cfg.H, cfg.N, cfg.m
    NC = -(-N // CHUNK)
    P = -(-NC // CPS)
    MP = -(-m // TILE) * TILE
    bwd_q, bwd_k = chunked_bwd._chunk_launches(cfg, grad, None, q, k, v, CHUNK, TILE, 4, NC, CPS, P, MP)
    sdt = torch.float32 if cfg.feat_f32 else torch.bfloat16
    mptr = key_mask if key_mask is not None else q
    up = [t.double() for t in (q, k, v, omega)]
    phiq, phik, _, out, den, km = ref._forward(*up, key_mask, kernel_fn, True, scale, CHUNK)
    softmax = kernel_fn == "softmax"
    MX, mx = torch.zeros(1, device=DEVICE), None  # relu: MX is not read
    stats = torch.empty(B, H, chunked.stats_rows(cfg.feat_f32, CHUNK), N, device=DEVICE)
    scores = chunked.stats_scores(stats, cfg.feat_f32, CHUNK)
    if softmax:  # log2 units, log2 √m folded in; the states use the fp32 numbers the kernels read
        MX = (km * LOG2E + 0.5 * math.log2(m)).clamp_min(ref.NO_KEY).float().reshape(B * H, N).contiguous()
        mx = MX.double()
    if which == "q":
        if softmax:  # each key at its own MX
            lg = logits2(k, omega, scale)
            if key_mask is not None:
                lg = lg.masked_fill(~key_mask[:, None, :, None], float("-inf"))
            phik = torch.exp2(lg - mx.view(B, H, N, 1))
        st = _states(phik, up[2], torch.ones_like(phik[..., 0]), mx, CHUNK, CPS, False, MP, cfg.BE, sdt)
        f32 = {"device": DEVICE, "dtype": torch.float32}
        gs, gd, mq = (
            torch.empty(B * H, N, cfg.BE, **f32),
            torch.empty(B * H, N, **f32),
            torch.empty(B * H, N, **f32),
        )
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        bwd_q(grad, q, k, v, omega, mptr, *st, dq, gs, gd, mq, grad, stats, MX)  # O: not read
        want = _scores_want(q, k, omega, key_mask, kernel_fn, scale, mq.double().view(B, H, N), mx.view(B, H, N) if softmax else None, CHUNK)
        return dq, (gs, gd, mq), (scores.double(), want)
    g = grad.double()
    gs = g / den
    gd = -(g * out).sum(-1) / den[..., 0]
    # The query stabilizer in log2 units, log2 √m folded in (fp32, as the kernel reads it):
    # φq = exp2(lg − mq).
    if softmax:
        lg = logits2(q, omega, scale)
        mq = (lg.amax(-1) + 0.5 * math.log2(m)).float()
        phiq = torch.exp2(lg - mq.double()[..., None])
    else:
        mq = torch.zeros(B, H, N, device=DEVICE, dtype=torch.float32)
    st = _states(phiq, gs, gd, mx, CHUNK, CPS, True, MP, cfg.BE, sdt)
    mxv = mx.view(B, H, N) if softmax else None
    scores.copy_(_scores_want(q, k, omega, key_mask, kernel_fn, scale, mq.double(), mxv, CHUNK))
    gs_t = torch.nn.functional.pad(gs, (0, cfg.BE - cfg.E)).reshape(B * H, N, cfg.BE).float().contiguous()
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    bwd_k(
        q,
        k,
        v,
        omega,
        mptr,
        *st,
        gs_t,
        gd.reshape(B * H, N).float(),
        mq.reshape(B * H, N),
        dk,
        dv,
        MX,
        stats,
    )
    return dk, dv


# Kernel-level cases: (kernel_fn, dtype, (B, H, N, D, E, m), mask); ids read as shapes. mask
# "lead": also the last batch's first 20 keys masked (the causal key stabilizer is NO_KEY for a
# whole chunk and part of the next).
# N = 61: four chunks, so that with CPS = 2 the second segment has two chunks and chunk 3 reads
# the key state of segment 0 through the segment factor (three chunks never do: chunk 2 is the
# first of its segment).
KERNEL_CASES = {
    "softmax-fp32-N45-D20-E12-m40": ("softmax", "fp32", (2, 2, 45, 20, 12, 40), True),
    "softmax-fp32-N61-D20-E12-m40-leadmask": ("softmax", "fp32", (2, 2, 61, 20, 12, 40), "lead"),
    "relu-fp32-N45-D20-E12-m40": ("relu", "fp32", (2, 2, 45, 20, 12, 40), True),
    "softmax-bf16-N45-D20-E20-m40": ("softmax", "bf16", (2, 2, 45, 20, 20, 40), True),
    "softmax-fp16-N33-D16-E16-m24-nomask": (
        "softmax",
        "fp16",
        (1, 2, 33, 16, 16, 24),
        False,
    ),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES), ids=list(KERNEL_CASES))
def test_bwd_k_kernel_on_reference_states(poison, case):
    """dk and dv from exact suffix states (two segments: CPS = 2 over three or four chunks)."""
    kernel_fn, dtype, shape, mask = KERNEL_CASES[case]
    args = _inputs(*shape, DTYPES[dtype], mask=bool(mask), lead_off=20 if mask == "lead" else 0)
    scale = shape[3] ** -0.5
    dk, dv = _kernel_run(*args, kernel_fn, scale, 2, "k")
    _, dk_want, dv_want = _expected(*args, kernel_fn, scale)
    assert_close(dk, dk_want, name="dk")
    assert_close(dv, dv_want, name="dv")


@pytest.mark.parametrize("case", list(KERNEL_CASES), ids=list(KERNEL_CASES))
def test_bwd_q_kernel_on_reference_states(poison, case):
    """dq, and the G' and stabilizer it stores, from exact prefix states (two segments)."""
    kernel_fn, dtype, shape, mask = KERNEL_CASES[case]
    args = _inputs(*shape, DTYPES[dtype], mask=bool(mask), lead_off=20 if mask == "lead" else 0)
    grad, q, k, v, omega, key_mask = args
    scale = shape[3] ** -0.5
    dq, (gs, gd, mq), (scores, scores_want) = _kernel_run(*args, kernel_fn, scale, 2, "q")
    dq_want = _expected(*args, kernel_fn, scale)[0]
    assert_close(dq, dq_want, name="dq")
    C = scores.shape[-1]
    later = torch.arange(C, device=DEVICE)[None, :] > (torch.arange(q.shape[2], device=DEVICE) % C)[:, None]
    assert torch.all(scores[..., later] == 0)  # keys after the query in its chunk: written, as 0
    assert_close(scores, scores_want, rtol=RTOL[q.dtype], name="scores")
    B, H, N, E = v.shape
    up = [t.double() for t in (q, k, v, omega)]
    _, _, _, out, den, _ = ref._forward(*up, key_mask, kernel_fn, True, scale, CHUNK)
    g = grad.double()
    gs_want = (g / den).reshape(B * H, N, E)
    gd_want = (-(g * out).sum(-1) / den[..., 0]).reshape(B * H, N)
    tol = RTOL[q.dtype]  # fp32 numbers, but from products of the inputs' operand precision
    assert_close(gs[..., :E], gs_want, rtol=tol, name="gs")
    assert torch.all(gs[..., E:] == 0)
    assert_close(gd, gd_want, rtol=tol, name="gd")
    if kernel_fn == "softmax":
        xs = up[0] * math.sqrt(scale)
        lg = (torch.einsum("bhnd,hmd->bhnm", xs, up[3]) - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.log(2)
        assert_close(
            mq,
            (lg.amax(-1) + 0.5 * math.log2(omega.shape[1])).reshape(B * H, N),
            rtol=1e-6,
            name="mq",
        )
    else:
        assert torch.all(mq == 0)


# ---------------------------------------------------------------------------------------------
# end to end: ChunkedBackwardPlan (key scan, dq pass, reverse query scan, dk/dv pass)
# ---------------------------------------------------------------------------------------------

chunked = pytest.importorskip("panther.kernels.performer.chunked")


@pytest.fixture
def small_tiles(monkeypatch):
    """Feature tiles of 16 (m = 40: three, the last partial) and enough interpreter programs that
    the scans cut N = 45 (three chunks of 16) into two segments."""
    monkeypatch.setattr(chunked, "M_TILE", TILE)
    monkeypatch.setattr(triton_kernels, "_target_programs", lambda device, per_sm=None: 24)  # the same segments on CPU and GPU
    monkeypatch.setattr(triton_kernels, "_PLANS", {})


def _last_plan():
    return list(triton_kernels._PLANS.values())[-1]


def _run_backward(grad, q, k, v, omega, key_mask, kernel_fn, scale, chunk=CHUNK, zero=()):
    got = chunked_bwd.chunked_performer_attention_backward(
        grad, q, k, v, omega, key_mask, kernel_fn, True, scale, chunk
    )
    want = _expected(grad, q, k, v, omega, key_mask, kernel_fn, scale)
    _assert_grads(got, want, (q, k, v), zero, float(grad.abs().max()))
    return got


# (kernel_fn, dtype, (B, H, N, D, E, m), mask); ids read as shapes.
E2E_CASES = {
    "softmax-fp32-N45-D20-E28-m40": ("softmax", "fp32", (2, 2, 45, 20, 28, 40), True),
    "relu-fp32-N45-D20-E28-m40": ("relu", "fp32", (2, 2, 45, 20, 28, 40), True),
    "softmax-bf16-N45-D20-E20-m40": ("softmax", "bf16", (2, 2, 45, 20, 20, 40), True),
    "relu-bf16-N45-D16-E16-m40-nomask": ("relu", "bf16", (2, 2, 45, 16, 16, 40), False),
    "softmax-fp16-N45-D20-E28-m40-nomask": (
        "softmax",
        "fp16",
        (2, 2, 45, 20, 28, 40),
        False,
    ),
}


@pytest.mark.parametrize("case", list(E2E_CASES), ids=list(E2E_CASES))
def test_backward_matches_reference(poison, small_tiles, case):
    kernel_fn, dtype, shape, mask = E2E_CASES[case]
    _run_backward(*_inputs(*shape, DTYPES[dtype], mask=mask), kernel_fn, shape[3] ** -0.5)
    plan = _last_plan()
    assert isinstance(plan, chunked_bwd.ChunkedBackwardPlan)
    # Several chunks, segments and feature tiles (the last partial) were exercised.
    scan = plan.key_scan
    assert (scan.NC, scan.CPS, scan.P, scan.BMT, scan.MP) == (3, 2, 2, TILE, 48)


def test_all_keys_masked_gives_zero(poison, small_tiles):
    """Every key of the last batch masked: its out is 0 and so is every gradient, exactly."""
    args = _inputs(2, 2, 45, 16, 16, 40, torch.float32, mask=True, all_off=True)
    dq, dk, dv = _run_backward(*args, "softmax", 0.25)
    assert torch.all(dq[-1] == 0) and torch.all(dk[-1] == 0) and torch.all(dv[-1] == 0)


def test_leading_keys_masked(poison, small_tiles):
    """The last batch's first 20 keys masked: its causal key stabilizer (the pre-pass) is NO_KEY
    over a whole chunk and part of the next. Those queries see no key and those keys get no
    gradient (dq, dk, dv exactly 0 there); the rest match the reference."""
    args = _inputs(2, 2, 45, 16, 16, 40, torch.float32, mask=True, lead_off=20)
    dq, dk, dv = _run_backward(*args, "softmax", 0.25)
    assert torch.all(dq[-1, :, :20] == 0) and torch.all(dk[-1, :, :20] == 0) and torch.all(dv[-1, :, :20] == 0)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_single_position(poison, small_tiles, kernel_fn):
    """N = 1: a lone query over a lone key gives out = v, so dq = dk = 0."""
    _run_backward(
        *_inputs(2, 2, 1, 16, 16, 40, torch.float32, mask=False),
        kernel_fn,
        0.25,
        zero=("dq", "dk"),
    )


def test_strided_inputs_and_default_knobs(poison, monkeypatch):
    """(B, N, H, D) tensors viewed as (B, H, N, D), as a module's projections give them, with the
    default chunk (one chunk of 64 over N = 45) and feature tile (clamped to the padded m)."""
    monkeypatch.setattr(triton_kernels, "_PLANS", {})
    B, H, N, D, m = 2, 2, 45, 16, 24
    q, k, v, grad = (torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2) for _ in range(4))
    omega = torch.randn(H, m, D, device=DEVICE)
    assert not q.is_contiguous() and not grad.is_contiguous()
    _run_backward(grad, q, k, v, omega, None, "softmax", 0.3, chunk=None)
    scan = _last_plan().key_scan
    assert (scan.BN, scan.NC, scan.BMT) == (chunked.CHUNK, 1, 32)


def test_int64_offsets_where_buffers_pass_int32(poison, small_tiles, monkeypatch):
    """Shapes whose buffers reach 2³¹ elements take int64 offsets (the kernels' I64), others not;
    and the I64 kernels give the same training forward and backward (the GPU test
    test_offsets_past_int32 runs a shape that needs them; here they are forced by pretending
    the inputs span 2³¹ elements)."""

    def needs(B, H, N):
        x = torch.empty(1, 1, 1, 64, device=DEVICE).expand(B, H, N, 64)
        omega = torch.empty(H, 256, 64, device=DEVICE)
        return triton_kernels._Cfg(x, x, x, omega, None, "softmax", True, 0.125, None, False, False).i64

    assert not needs(4, 12, 16384)
    assert needs(1, 520, 16384)  # the key scan's per-chunk states: 520·256·256·64 elements
    monkeypatch.setattr(triton_kernels, "_extent", lambda t: 2**31)
    grad, q, k, v, omega, key_mask = _inputs(2, 2, 45, 20, 20, 40, torch.bfloat16, mask=True)
    out, stats = triton_kernels.performer_attention_train(q, k, v, omega, key_mask, "softmax", True, 0.2, CHUNK)
    up = [t.double() for t in (q, k, v, omega)]
    assert_close(out, ref.performer_attention(*up, key_mask, "softmax", True, 0.2), name="out")
    got = triton_kernels.performer_attention_backward(
        grad, q, k, v, omega, key_mask, "softmax", True, 0.2, CHUNK, out=out, stats=stats
    )
    plan = _last_plan()
    assert plan.bwd_q.meta["I64"] and plan.bwd_k.meta["I64"] and plan.key_scan.meta["I64"]
    _assert_grads(got, _expected(grad, q, k, v, omega, key_mask, "softmax", 0.2), (q, k, v))


def test_plan_is_cached_and_follows_the_knobs(poison, small_tiles, monkeypatch):
    """A second call of the signature reuses its plan; changing chunked.M_TILE starts over."""
    args = _inputs(1, 2, 45, 16, 16, 40, torch.float32, mask=True)
    _run_backward(*args, "softmax", 0.25)
    plan = _last_plan()
    _run_backward(*args, "softmax", 0.25)
    assert len(triton_kernels._PLANS) == 1 and _last_plan() is plan
    monkeypatch.setattr(chunked, "M_TILE", 32)
    _run_backward(*args, "softmax", 0.25)
    assert len(triton_kernels._PLANS) == 1 and _last_plan().key_scan.BMT == 32


def test_rejects_bad_arguments():
    grad, q, k, v, omega, _ = _inputs(1, 2, 17, 16, 16, 16, torch.float32, mask=False)
    with pytest.raises(ValueError, match="causal=False"):
        chunked_bwd.ChunkedBackwardPlan(grad, q, k, v, omega, None, "softmax", False, 0.25, None, False, False)
    with pytest.raises(ValueError, match="causal=False"):
        chunked_bwd.chunked_performer_attention_backward(grad, q, k, v, omega, None, "softmax", False, 0.25)
    with pytest.raises(ValueError, match="kernel_fn"):
        chunked_bwd.chunked_performer_attention_backward(grad, q, k, v, omega, None, "gelu", True, 0.25)
    with pytest.raises(ValueError, match="grad"):
        chunked_bwd.chunked_performer_attention_backward(grad[..., :8], q, k, v, omega, None, "softmax", True, 0.25)
    with pytest.raises(ValueError, match="head dim"):  # fp32 features: whole head dims up to 64
        wide = torch.randn(1, 2, 17, 80)
        chunked_bwd.chunked_performer_attention_backward(
            grad, wide, wide, v, torch.randn(2, 16, 80), None, "softmax", True, 0.25
        )


# ---------------------------------------------------------------------------------------------
# the forward's saved stats (performer_attention_train), reused by the dq pass
# ---------------------------------------------------------------------------------------------


def _stats_want(q, k, omega, key_mask, kernel_fn, scale):
    """(mq, den, MX) (B, H, N) in float64 as the kernels define them: φq = exp2(lg_q − mq) with mq the
    row max of lg_q plus log2 √m, and (softmax) each key at its own running key max MX (the row
    max of lg_k over unmasked keys j' ≤ j plus log2 √m, NO_KEY before the first), φk = exp2(lg_k −
    MX), key j entering query i's den times exp2(MX_j − MX_i); or relu features and mq = 0.
    den = Σ_{j ≤ i} φq_i·φk_j (·exp2(MX_j − MX_i)) over unmasked keys. MX is None for relu."""
    B, H, N, _ = q.shape
    if kernel_fn == "softmax":
        mq = logits2(q, omega, scale).amax(-1) + 0.5 * math.log2(omega.shape[1])
        mx = key_max2(k, omega, scale, key_mask)
    else:
        mq, mx = torch.zeros(B, H, N, dtype=torch.float64, device=q.device), None
    den = torch.tril(_pair_weights(q, k, omega, key_mask, kernel_fn, scale, mq, mx)).sum(-1)
    return mq, den, mx


@pytest.mark.parametrize("case", list(E2E_CASES), ids=list(E2E_CASES))
def test_backward_from_saved_stats(poison, small_tiles, case):
    """performer_attention_train's out and stats (mq, den and, softmax, the causal key stabilizer
    MX, against float64), then the backward given them: the dq pass reads them instead of
    recomputing (SAVED), and the gradients match the float64 reference."""
    kernel_fn, dtype, shape, mask = E2E_CASES[case]
    grad, q, k, v, omega, key_mask = _inputs(*shape, DTYPES[dtype], mask=mask)
    scale = shape[3] ** -0.5
    out, stats = triton_kernels.performer_attention_train(q, k, v, omega, key_mask, kernel_fn, True, scale, CHUNK)
    B, H, N = q.shape[:3]
    feat_f32 = q.dtype != torch.bfloat16
    assert stats.shape == (B, H, chunked.stats_rows(feat_f32, CHUNK), N) and stats.dtype == torch.float32
    up = [t.double() for t in (q, k, v, omega)]
    assert_close(out, ref.performer_attention(*up, key_mask, kernel_fn, True, scale), name="out")
    mq, den, mx = _stats_want(q, k, omega, key_mask, kernel_fn, scale)
    assert_close(stats[:, :, 0], mq, rtol=1e-6, name="mq")
    assert_close(stats[:, :, 1], den, rtol=RTOL[q.dtype], name="den")
    if mx is not None:  # (relu: row 2 is not used)
        none = mx == ref.NO_KEY
        assert torch.all(stats[:, :, 2][none] == ref.NO_KEY)
        assert_close(stats[:, :, 2][~none], mx[~none], rtol=RTOL[torch.float32], name="key max")
    # The intra-chunk scores, at the stabilizers just checked (relu: none).
    stab = [stats[:, :, r].double() for r in (0, 2)] if mx is not None else [None, None]
    scores = chunked.stats_scores(stats, feat_f32, CHUNK).double()
    assert_close(scores, _scores_want(q, k, omega, key_mask, kernel_fn, scale, *stab, CHUNK), rtol=RTOL[q.dtype], name="scores")
    got = triton_kernels.performer_attention_backward(
        grad, q, k, v, omega, key_mask, kernel_fn, True, scale, CHUNK, out=out, stats=stats
    )
    plan = _last_plan()
    assert isinstance(plan, chunked_bwd.ChunkedBackwardPlan) and plan.bwd_q.meta["SAVED"]
    _assert_grads(got, _expected(grad, q, k, v, omega, key_mask, kernel_fn, scale), (q, k, v))


def test_train_without_chunked_kernels_saves_nothing(poison, small_tiles):
    """Non-causal calls (and causal ones on the segment kernels) return empty stats, and the
    backward given them recomputes (the same gradients)."""
    grad, q, k, v, omega, _ = _inputs(1, 2, 45, 16, 16, 40, torch.float32, mask=False)
    for causal in (False, True):
        ctx = pytest.MonkeyPatch.context()
        with ctx as mp:
            if causal:
                mp.setattr(triton_kernels, "PATH", "segments")
            out, stats = triton_kernels.performer_attention_train(q, k, v, omega, None, "softmax", causal, 0.25)
            assert stats.numel() == 0
            want = triton_kernels.performer_attention_backward(grad, q, k, v, omega, None, "softmax", causal, 0.25)
            got = triton_kernels.performer_attention_backward(
                grad, q, k, v, omega, None, "softmax", causal, 0.25, out=out, stats=stats
            )
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_rejects_bad_stats(small_tiles):
    grad, q, k, v, omega, _ = _inputs(1, 2, 17, 16, 16, 16, torch.float32, mask=False)
    out, stats = triton_kernels.performer_attention_train(q, k, v, omega, None, "softmax", True, 0.25)
    args = (grad, q, k, v, omega, None, "softmax", True, 0.25)
    rows = chunked.stats_rows(True)  # fp32, the default chunk
    with pytest.raises(ValueError, match=rf"stats must be .* \(1, 2, {rows}, 17\)"):
        triton_kernels.performer_attention_backward(*args, out=out, stats=stats[:, :, :1])
    with pytest.raises(ValueError, match="stats must be"):
        triton_kernels.performer_attention_backward(*args, out=out, stats=stats.double())
    with pytest.raises(ValueError, match="out must be"):
        triton_kernels.performer_attention_backward(*args, out=None, stats=stats)
    with pytest.raises(ValueError, match="stats=True needs causal"):
        chunked.ChunkedForwardPlan(q, k, v, omega, None, "softmax", False, 0.25, None, False, False, stats=True)
