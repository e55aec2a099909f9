"""GPU-only checks of the low-rank linear at full sizes (skipped without CUDA).

Through the ops (``torch.ops.panther.sklinear`` / ``lowrank_linear``, which dispatch to the Triton
kernels on CUDA), against the reference in float64: forward and backward in every dtype, odd
shapes, non-contiguous input, T = 1; plans that time their candidate configs (T ≥ 1024); repeated
calls that launch the compiled kernels directly; forward and backward captured in a CUDA graph; an
SKLinear training step; ``torch.compile`` of a model that holds SKLinear. Run through the device
tool: ``scripts/gpu_linear.sh tests``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from panther.kernels.lowrank_linear import reference as ref
from panther.kernels.lowrank_linear import triton as tk
from panther_testing import RTOL_TF32, assert_close

import panther  # noqa: F401  (registers torch.ops.panther)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, in, out, L, k): the headline layer, odd sizes, T = 1, rank 256 (L=2, k=64).
SHAPES = [(4096, 8192, 8192, 1, 16), (333, 771, 3001, 1, 64), (1, 4096, 4096, 2, 64), (2500, 1000, 1500, 3, 5)]


@pytest.fixture(autouse=True)
def _untuned(request, monkeypatch):
    """No timing of candidate configs (each would compile): the first candidate, which is what a
    plan uses under torch.compile or CUDA-graph capture. ``test_tuned_plans`` times them."""
    if "tuned" not in request.node.name:
        monkeypatch.setattr(tk, "_TUNE", False)
    tk._PLANS.clear()
    tk._TUNED.clear()
    yield
    tk._PLANS.clear()
    tk._TUNED.clear()


def _id(s):
    return "T{}_{}x{}_L{}_k{}".format(*s)


def _factors(n_in, n_out, L, k, dtype):
    dev = "cuda"
    S1s = torch.randn(L, n_in, k, device=dev) * n_in**-0.5
    S2s = torch.randn(L, k, n_out, device=dev) * n_in**-0.5
    U1s = torch.randint(0, 2, (L, k, n_out), device=dev).float().mul(2).sub(1).mul(k**-0.5)
    U2s = torch.randint(0, 2, (L, n_in, k), device=dev).float().mul(2).sub(1).mul(k**-0.5)
    b = torch.randn(n_out, device=dev) * 0.1
    return [t.to(dtype) for t in (S1s, S2s, U1s, U2s, b)]


def _f64(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("train", [False, True], ids=["sklinear", "sklinear_train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_sklinear_op_forward_backward(shape, dtype, train, poison):
    # train: the op SKLinear calls under autograd, whose backward reads the forward's h = x·A.
    T, n_in, n_out, L, k = shape
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    # x as (2, T/2 …, in) when T is even, and non-contiguous (every other column of a wider tensor).
    x = torch.randn(T, 2 * n_in, device="cuda", dtype=dtype)[:, ::2]
    x = x.reshape(2, T // 2, n_in) if T % 2 == 0 else x
    xg, S1g, S2g, bg = (t.detach().requires_grad_() for t in (x, S1s, S2s, b))
    if train:
        y, h = torch.ops.panther.sklinear_train(xg, S1g, S2g, U1s, U2s, bg)
    else:
        y = torch.ops.panther.sklinear(xg, S1g, S2g, U1s, U2s, bg)
    assert y.shape == (*x.shape[:-1], n_out) and y.dtype == dtype
    y_ref, h_ref = ref.sklinear_forward(*_f64([x.reshape(-1, n_in), S1s, S2s, U1s, U2s, b]), want_h=True)
    assert_close(y.reshape(-1, n_out), y_ref, name="y")
    if train:
        assert_close(h.reshape(-1, 2 * L * k), h_ref, name="h")
    g = torch.randn_like(y)
    y.backward(g)
    want = ref.sklinear_backward(*_f64([g.reshape(-1, n_out), x.reshape(-1, n_in), S1s, S2s, U1s, U2s]), True, True, True)
    for name, got, w in zip(("dx", "dS1s", "dS2s", "db"), (xg.grad.reshape(-1, n_in), S1g.grad, S2g.grad, bg.grad), want):
        assert_close(got, w, name=name)


@pytest.mark.parametrize("train", [False, True], ids=["lowrank_linear", "lowrank_linear_train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_op_forward_backward(dtype, train, poison):
    T, n_in, n_out, r = 777, 2049, 1023, 96
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    A = (torch.randn(n_in, r, device="cuda") * n_in**-0.5).to(dtype)
    B = (torch.randn(r, n_out, device="cuda") * r**-0.5).to(dtype)
    b = torch.randn(n_out, device="cuda", dtype=dtype)
    leaves = [t.detach().requires_grad_() for t in (x, A, B, b)]
    if train:
        y, h = torch.ops.panther.lowrank_linear_train(*leaves, 0.5)
        assert_close(h, x.double() @ A.double(), name="h")
    else:
        y = torch.ops.panther.lowrank_linear(*leaves, 0.5)
    assert_close(y, ref.lowrank_forward(*_f64([x, A, B, b]), 0.5), name="y")
    g = torch.randn_like(y)
    y.backward(g)
    want = ref.lowrank_backward(*_f64([g, x, A, B]), 0.5, True, True, True, True)
    for name, leaf, w in zip(("dx", "dA", "dB", "db"), leaves, want):
        assert_close(leaf.grad, w, name=name)


def test_fp32_with_tf32_allowed():
    T, n_in, n_out, L, k = 4096, 8192, 8192, 1, 16
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, torch.float32)
    x = torch.randn(T, n_in, device="cuda")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        y = torch.ops.panther.sklinear(x, S1s, S2s, U1s, U2s, b)
    finally:
        torch.set_float32_matmul_precision(old)
    assert_close(y, ref.sklinear_forward(*_f64([x, S1s, S2s, U1s, U2s, b])), rtol=RTOL_TF32)


def _sklinear(*args, **kwargs):
    from panther.nn import SKLinear

    return SKLinear(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sklinear_training_step(dtype):
    torch.manual_seed(0)
    n_in, n_out = 1024, 768
    layer = _sklinear(n_in, n_out, num_terms=2, low_rank=32, dtype=dtype, device="cuda")
    target = torch.nn.Linear(n_in, n_out, device="cuda", dtype=dtype)
    x = torch.randn(512, n_in, device="cuda", dtype=dtype)
    with torch.no_grad():
        y_target = target(x)
    # Gradients of one step against the float64 reference.
    y = layer(x)
    loss = torch.nn.functional.mse_loss(y.float(), y_target.float())
    loss.backward()
    g = (2.0 / y.numel()) * (y.double() - y_target.double())  # ∂loss/∂y
    want = ref.sklinear_backward(*_f64([g, x, layer.S1s, layer.S2s, layer.U1s, layer.U2s]), True, True, True)
    assert_close(layer.S1s.grad, want[1], name="dS1s")
    assert_close(layer.S2s.grad, want[2], name="dS2s")
    assert_close(layer.bias.grad, want[3], name="db")
    # A few steps: the loss goes down.
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x).float(), y_target.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_torch_compile_of_a_model_with_sklinear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        _sklinear(1024, 2048, num_terms=1, low_rank=16, device="cuda"),
        torch.nn.GELU(),
        _sklinear(2048, 512, num_terms=2, low_rank=8, device="cuda"),
    )
    x = torch.randn(4, 300, 1024, device="cuda")
    want = model(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    assert_close(got, want, rtol=1e-5, name="compiled y")
    for p, w in zip(model.parameters(), want_grads):
        assert_close(p.grad, w, rtol=1e-5, name="compiled grad")
    # Inductor saw the Triton kernels (user-defined kernels in the generated code), not a call
    # into an opaque op.
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(torch.compile(model[0], fullgraph=True), x)
    assert any("_fused_kernel" in c or "_xa_kernel" in c for c in codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tuned_plans(dtype, poison):
    """T ≥ _TUNE_MIN_M: the first call times the candidates (configs, fused against split); the
    chosen plan is right, and a T of the same bucket reuses the choice without timing again."""
    n_in, n_out, L, k = 1024, 1536, 1, 16
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    for T in (2048, 1500):
        x = torch.randn(T, n_in, device="cuda", dtype=dtype)
        xg, S1g, S2g, bg = (t.detach().requires_grad_() for t in (x, S1s, S2s, b))
        y = torch.ops.panther.sklinear(xg, S1g, S2g, U1s, U2s, bg)
        assert_close(y, ref.sklinear_forward(*_f64([x, S1s, S2s, U1s, U2s, b])), name=f"y T={T}")
        g = torch.randn_like(y)
        y.backward(g)
        want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
        for name, got, w in zip(("dx", "dS1s", "dS2s", "db"), (xg.grad, S1g.grad, S2g.grad, bg.grad), want):
            assert_close(got, w, name=f"{name} T={T}")
        if T == 2048:
            timed = len(tk.TUNE_LOG)
            assert timed > 0 and any(key[0] == "path" for key in tk._TUNED)
    assert len(tk.TUNE_LOG) == timed  # T = 1500 is in the bucket of 2048


def test_torch_compile_takes_tuned_configs(poison, monkeypatch):
    """torch.compile of a model whose SKLinear sees T ≥ _TUNE_MIN_M rows: while tracing (where no
    plan can time anything) the forward and backward ops time their candidates once on stand-in
    tensors, and the traced plans take those choices, with the caller's RNG stream untouched. The
    compiled model's output and gradients against eager; the stand-in timing ran once per op."""
    monkeypatch.setattr(tk, "_TRACE_TUNED", set())
    torch.manual_seed(0)
    layer = _sklinear(1200, 1400, num_terms=1, low_rank=24, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 700, 1200, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(tk, "_TUNE", False)  # (the eager reference times nothing)
    want = layer(x)
    want.float().sum().backward()
    want_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    monkeypatch.setattr(tk, "_TUNE", True)
    monkeypatch.setattr(tk, "TUNE_LOG", {})
    tk._PLANS.clear()
    tk._TUNED.clear()
    from panther.kernels import _launch

    picks = []  # (key, choice, whether it was timed) of every untimed pick outside compile_ahead
    tuned_among = tk._tuned_among

    def record(key, cands):
        choice = tuned_among(key, cands)
        if not _launch.compiling_ahead():  # (a dry build's picks come before any timing)
            picks.append((key, choice, key in tk._TUNED or key in tk.TUNE_LOG))
        return choice

    monkeypatch.setattr(tk, "_tuned_among", record)
    rng = torch.cuda.get_rng_state()
    # dynamic=False: the stand-in timing needs static shapes, which Dynamo's automatic dynamic
    # shapes would drop had another test compiled SKLinear.forward at other shapes first.
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    got = compiled(x)
    got.float().sum().backward()
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert {k[0] for k in tk._TUNED} >= {"xa_hq", "xa_g"}
    assert sorted(f for f, *_ in tk._TRACE_TUNED) == ["sklinear_backward", "sklinear_forward"]
    traced = [p for p in picks if p[0][0] in ("xa_f", "hq_f", "xa_g", "hq_dx", "wg")]
    assert traced and all(timed for *_, timed in traced), traced
    assert_close(got, want, name="compiled y")
    for p, w in zip(layer.parameters(), want_grads):
        assert_close(p.grad, w, name="compiled grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_compile_runs_the_tma_hq(dtype, poison, monkeypatch):
    """Under torch.compile the traced plans take the TMA h·B (the span of its one B descriptor
    checked by the kernel) where the timing picks it (forced here through that choice): its descriptors are
    built on the device in a workspace that Inductor's launcher allocates. SKLinear's op (two B
    factors) with its backward, and the plain op (one), against float64; B factors the one
    descriptor cannot span (the same memory twice) take the kernel's fallback; a B factor that
    starts off a 16-byte boundary keeps its traced plan off TMA; each still right."""
    if not tk._tma_device(torch.device("cuda")):
        pytest.skip("the TMA h·B needs a Hopper GPU")
    pick = tk._pick

    def prefer_tma(key, cands, make_run, allowed):
        tma = [c for c in cands if isinstance(c, tk._HqTCfg)]
        if tma:
            return tma[0]
        return cands[0] if key[0] == "xa_hq" else pick(key, cands, make_run, allowed)  # (unsplit x·A first)

    built = []

    class Recorded(tk._ForwardPlan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(tk, "_pick", prefer_tma)
    monkeypatch.setattr(tk, "_ForwardPlan", Recorded)
    torch.manual_seed(0)
    T, n_in, n_out, L, k = 1500, 1000, 1032, 2, 32
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    g = torch.randn(T, n_out, device="cuda", dtype=dtype)
    leaves = [t.detach().requires_grad_() for t in (x, S1s, S2s, b)]
    f = torch.compile(lambda x, S1, S2, bb: torch.ops.panther.sklinear(x, S1, S2, U1s, U2s, bb), fullgraph=True)
    y = f(*leaves)
    y.backward(g)
    traced = [p for p in built if p.hq is not None and p.hq.trace]
    assert traced and all(p.hq.fn is tk._hq_tma_kernel for p in traced)
    assert_close(y, ref.sklinear_forward(*_f64([x, S1s, S2s, U1s, U2s, b])), name="compiled y")
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
    for name, t, w in zip(("dx", "dS1s", "dS2s", "db"), leaves, want):
        assert_close(t.grad, w, name=f"compiled {name}")
    A = (torch.randn(n_in, 96, device="cuda") * n_in**-0.5).to(dtype)
    B = (torch.randn(96, n_out, device="cuda") * 96**-0.5).to(dtype)
    built.clear()
    y = torch.compile(lambda x, B: torch.ops.panther.lowrank_linear(x, A, B, b, 0.5), fullgraph=True)(x, B)
    tma = [p.hq.fn is tk._hq_tma_kernel for p in built if p.hq is not None and p.hq.trace]
    assert tma and all(tma)  # (one plan each time the op is traced)
    assert_close(y, ref.lowrank_forward(*_f64([x, A, B, b]), 0.5), name="compiled y (one factor)")
    built.clear()
    alias = U1s.view(U1s.shape)  # (S2 and U1 in one memory: distance 0, the kernel's fallback)
    y = torch.compile(lambda x, S2: torch.ops.panther.sklinear(x, S1s, S2, U1s, U2s, b), fullgraph=True)(x, alias)
    tma = [p.hq.fn is tk._hq_tma_kernel for p in built if p.hq is not None and p.hq.trace]
    assert tma and all(tma)
    assert_close(y, ref.sklinear_forward(*_f64([x, S1s, U1s, U1s, U2s, b])), name="compiled y (aliased factors)")
    buf = torch.empty(S2s.numel() + 1, device="cuda", dtype=dtype)
    S2m = buf[1:].view(S2s.shape).copy_(S2s)
    built.clear()
    y = torch.compile(lambda x, S2: torch.ops.panther.sklinear(x, S1s, S2, U1s, U2s, b), fullgraph=True)(x, S2m)
    tma = [p.hq.fn is tk._hq_tma_kernel for p in built if p.hq is not None and p.hq.trace]
    assert tma and not any(tma)
    assert_close(y, ref.sklinear_forward(*_f64([x, S1s, S2s, U1s, U2s, b])), name="compiled y (misaligned S2s)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tuned_plans_compile_their_candidates_ahead(dtype, poison, monkeypatch):
    """A tuning plan's first call builds it dry first (kernels._launch.compile_ahead): every kernel
    its timing runs compiles then, in one parallel batch, and none compiles in the real build that
    follows (its timing runs included). Forward and backward against float64."""
    from triton import knobs

    from panther.kernels import _launch

    if _launch._async_compile is None or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this triton has no AsyncCompileMode or compile hook")
    monkeypatch.setenv("PANTHER_COMPILE_THREADS", "4")
    compiles = []  # (kernel, inside compile_ahead)
    built = []  # len(compiles) when each plan's real build had finished

    def hook(*args, **kwargs):
        compiles.append((kwargs["fn"].name, _launch.compiling_ahead()))
        return False

    class Plans(dict):
        def __setitem__(self, key, plan):
            built.append(len(compiles))
            super().__setitem__(key, plan)

    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", hook)
    monkeypatch.setattr(tk, "_PLANS", Plans())
    # Dimensions no other test uses, so that the kernels are new to this process.
    T, n_in, n_out, L, k = 1040, 1128, 1352, 1, 24
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    y, h = tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b, want_h=True)
    n_fwd = len(compiles)
    g = torch.randn_like(y)
    got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True, h)
    assert len(built) == 2 and len(tk._TUNED) > 0
    for start, end in ((0, built[0]), (n_fwd, built[1])):  # (dry build, then real build)
        assert end - start > 1 and all(inside for _, inside in compiles[start:end]), compiles[start:end]
    _check_kept_h(x, S1s, S2s, U1s, U2s, b, y, h)
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)


def _check_kept_h(x, S1s, S2s, U1s, U2s, b, y, h):
    """y and the kept h against float64, then the backward that reads h."""
    y_ref, h_ref = ref.sklinear_forward(*_f64([x, S1s, S2s, U1s, U2s, b]), want_h=True)
    assert_close(y, y_ref, name="y")
    assert_close(h, h_ref, name="h")
    g = torch.randn_like(y)
    got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True, h)
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True, h.double())
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)


@pytest.mark.parametrize("split_k", [0, 4], ids=["unsplit", "splitK4"])
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_keeps_h_on_every_path(dtype, path, split_k, poison, monkeypatch):
    """want_h at the headline layer: h from the fused kernel's registers, from _xa unsplit, and
    from _hq summing split-K partials; then the backward that reads it."""
    if path == "fused" and split_k:
        pytest.skip("the fused kernel does not split K")
    T, n_in, n_out, L, k = 4096, 8192, 8192, 1, 16
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    if split_k:
        first = tk._xa_candidates

        def split_first(M, rp, es, splits=False):
            return [c._replace(split=split_k) for c in first(M, rp, es, splits)]

        monkeypatch.setattr(tk, "_xa_candidates", split_first)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    y, h = tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b, want_h=True, path=path)
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan) and p.want_h)
    assert plan.path == path and (path == "fused" or plan.xa.split == (split_k or 1))
    _check_kept_h(x, S1s, S2s, U1s, U2s, b, y, h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_xa_summed_before_the_tma_hq(dtype, poison, monkeypatch):
    """The pair a tuned plan may pick at rank 256: a split-K x·A, one _reduce of its partials into
    h, then the TMA h·B over that h (forced here through the choice the timing would make):
    forward, h kept, and the backward that reads it, against float64."""
    if not tk._tma_device(torch.device("cuda")):
        pytest.skip("the TMA h·B needs a Hopper GPU")
    pick = tk._pick

    def prefer_summed_tma(key, cands, make_run, allowed):
        if key[0] == "xa_hq":
            return next(c for c in cands if isinstance(c, str) and c.startswith("sum"))
        tma = [c for c in cands if isinstance(c, tk._HqTCfg)]
        return tma[0] if tma else pick(key, cands, make_run, allowed)

    monkeypatch.setattr(tk, "_pick", prefer_summed_tma)
    T, n_in, n_out, L, k = 4096, 8192, 8192, 2, 64
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    y, h = tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b, want_h=True, path="split")
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan) and p.want_h)
    assert plan.xa.split > 1 and plan.red is not None and plan.hq.fn is tk._hq_tma_kernel
    _check_kept_h(x, S1s, S2s, U1s, U2s, b, y, h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_gh_summed_before_its_consumers(dtype, poison, monkeypatch):
    """The backward's g·Bᵀ split over `out` at large T (forced here through the choice the timing
    would make), its partials summed once into gh before dx and dS1 read it: every gradient against
    float64."""
    pick = tk._pick

    def prefer_split(key, cands, make_run, allowed):
        if key[0] == "xa_g":
            return next(c for c in cands if c.split > 1)
        return pick(key, cands, make_run, allowed)

    monkeypatch.setattr(tk, "_pick", prefer_split)
    T, n_in, n_out, L, k = 4096, 8192, 8192, 2, 64
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    g = torch.randn(T, n_out, device="cuda", dtype=dtype)
    got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True)
    plan = next(p for p in tk._PLANS.values() if isinstance(p, tk._BackwardPlan))
    assert plan.gh.split > 1 and plan.gh_red is not None
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
    for name, a, w in zip(("dx", "dS1s", "dS2s", "db"), got, want):
        assert_close(a, w, name=name)


@pytest.mark.parametrize("shape", [(4096, 8192, 8192, 1, 16), (3001, 4097, 4100, 1, 64), (2048, 777, 3072, 2, 5)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dx_and_da_in_one_pass_at_full_size(shape, dtype, poison, monkeypatch):
    """The backward's dx and dS1 (dA) from one _dxa pass, forced at every config a plan may time
    (the tuner takes it for 16-bit operands where it is faster), with x non-contiguous at the odd
    shapes: every gradient against float64, for SKLinear and the plain op."""
    T, n_in, n_out, L, k = shape
    S1s, S2s, U1s, U2s, _ = _factors(n_in, n_out, L, k, dtype)
    x = torch.randn(T, n_in + 3, device="cuda", dtype=dtype)[:, 3:] if n_in % 8 else torch.randn(T, n_in, device="cuda", dtype=dtype)
    g = torch.randn(T, n_out, device="cuda", dtype=dtype)
    A = (torch.randn(n_in, 2 * L * k, device="cuda") * n_in**-0.5).to(dtype)
    B = (torch.randn(2 * L * k, n_out, device="cuda") * k**-0.5).to(dtype)
    monkeypatch.setattr(tk, "_DXA_FORCE", True)
    want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
    want_lr = ref.lowrank_backward(*_f64([g, x, A, B]), 0.5, True, True, True, False)
    for cfg in tk._dxa_candidates(2 * tk._rank_pad(L * k), dtype.itemsize):
        monkeypatch.setattr(tk, "_dxa_candidates", lambda rp, es, cfg=cfg: [cfg])
        tk._PLANS.clear()
        got = tk.sklinear_backward(g, x, S1s, S2s, U1s, U2s, True, True, True)
        got_lr = tk.lowrank_backward(g, x, A, B, 0.5, True, True, True, False)
        plans = [p for p in tk._PLANS.values() if isinstance(p, tk._BackwardPlan)]
        assert len(plans) == 2 and all(p.dxa is not None and p.dxa.cfg == cfg for p in plans), cfg
        for name, a, w in zip(("dx", "dS1s", "dS2s", "db", "dx lr", "dA lr", "dB lr"), (*got, *got_lr), (*want, *want_lr)):
            assert_close(a, w, name=f"{name} {cfg}")


@pytest.mark.parametrize("shape", [(4096, 8192, 8192, 2, 64), (3001, 4096, 4100, 1, 64)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_persistent_hq_at_full_size(shape, dtype, poison, monkeypatch):
    """The persistent h·B kernel, forced (the tuner picks it only where it is faster): forward,
    h kept, and the backward's dx, at the large-rank layers it is for."""
    T, n_in, n_out, L, k = shape
    cfg = tk._HqPCfg(64, 64, 32, 4, 3, 2) if dtype == torch.float32 else tk._HqPCfg(128, 128, 64, 8, 3, 1)
    monkeypatch.setattr(tk, "_hq_candidates", lambda M, rp, es: [cfg])
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    y, h = tk.sklinear_forward(x, S1s, S2s, U1s, U2s, b, want_h=True, path="split")
    _check_kept_h(x, S1s, S2s, U1s, U2s, b, y, h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_eager_path_matches_the_ops(dtype, poison):
    """Eager CUDA calls of SKLinear / LowRankLinear skip the op layers (_EagerLowRank): the same
    results and gradients as the ops, for 3-D input, with and without autograd."""
    import panther.ops.linear as opl

    T, n_in, n_out, L, k = 600, 1000, 1500, 2, 16
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, dtype)
    x = torch.randn(2, T // 2, n_in, device="cuda", dtype=dtype)
    g = torch.randn(2, T // 2, n_out, device="cuda", dtype=dtype)
    grads = []
    for fn in (opl.sklinear_apply, lambda *a: torch.ops.panther.sklinear_train(*a)[0]):
        leaves = [t.detach().requires_grad_() for t in (x, S1s, S2s, b)]
        y = fn(leaves[0], leaves[1], leaves[2], U1s, U2s, leaves[3])
        y.backward(g)
        grads.append([y.detach()] + [t.grad for t in leaves])
    for name, a, w in zip(("y", "dx", "dS1s", "dS2s", "db"), *grads):
        assert_close(a, w.double(), name=name)
    with torch.no_grad():
        assert_close(opl.sklinear_apply(x, S1s, S2s, U1s, U2s, b), grads[1][0].double(), name="y no_grad")
    A = (torch.randn(n_in, 40, device="cuda") * n_in**-0.5).to(dtype)
    B = (torch.randn(40, n_out, device="cuda") * 40**-0.5).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (x, A, B, b)]
    y = opl.lowrank_linear_apply(*leaves, 0.5)
    y.backward(g)
    want = ref.lowrank_backward(*_f64([g.reshape(-1, n_out), x.reshape(-1, n_in), A, B]), 0.5, True, True, True, True)
    assert_close(y.reshape(-1, n_out), ref.lowrank_forward(*_f64([x.reshape(-1, n_in), A, B, b]), 0.5), name="y lr")
    for name, got, w in zip(("dx", "dA", "dB", "db"), [t.grad for t in leaves], want):
        assert_close(got.reshape(w.shape), w, name=name + " lr")


@pytest.mark.parametrize("T", [1, 300], ids=lambda t: f"T{t}")
def test_repeated_calls_launch_directly(T, poison):
    """From the second call of a shape on, the plan launches the compiled kernels directly; the
    results follow the new operands."""
    n_in, n_out, L, k = 2048, 1024, 2, 16
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, torch.bfloat16)
    for i in range(3):
        x = torch.randn(T, n_in, device="cuda", dtype=torch.bfloat16)
        S1s = S1s + 0.01 * torch.randn_like(S1s)  # new weights, new addresses
        xg, S1g, S2g, bg = (t.detach().requires_grad_() for t in (x, S1s, S2s, b))
        y = torch.ops.panther.sklinear(xg, S1g, S2g, U1s, U2s, bg)
        assert_close(y, ref.sklinear_forward(*_f64([x, S1s, S2s, U1s, U2s, b])), name=f"y, call {i}")
        g = torch.randn_like(y)
        y.backward(g)
        want = ref.sklinear_backward(*_f64([g, x, S1s, S2s, U1s, U2s]), True, True, True)
        for name, got, w in zip(("dx", "dS1s", "dS2s", "db"), (xg.grad, S1g.grad, S2g.grad, bg.grad), want):
            assert_close(got, w, name=f"{name}, call {i}")
    fwd = next(p for p in tk._PLANS.values() if isinstance(p, tk._ForwardPlan))
    assert fwd.xa.launch.compiled is not None and fwd.hq.compiled is not None


def test_cuda_graph_capture(poison):
    """The op's forward and backward captured in a CUDA graph (plans made before the capture) and
    replayed on new data."""
    T, n_in, n_out, L, k = 64, 1024, 768, 1, 32
    S1s, S2s, U1s, U2s, b = _factors(n_in, n_out, L, k, torch.bfloat16)
    S1g, S2g, bg = (t.detach().requires_grad_() for t in (S1s, S2s, b))
    x = torch.randn(T, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, n_out, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in (x, S1g, S2g, bg):
            t.grad = None
        y = torch.ops.panther.sklinear(x, S1g, S2g, U1s, U2s, bg)
        y.backward(g)
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # plans and compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        g.copy_(torch.randn_like(g))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, ref.sklinear_forward(*_f64([x.detach(), S1s, S2s, U1s, U2s, b])), name="y")
    want = ref.sklinear_backward(*_f64([g, x.detach(), S1s, S2s, U1s, U2s]), True, True, True)
    for name, got, w in zip(("dx", "dS1s", "dS2s", "db"), (x.grad, S1g.grad, S2g.grad, bg.grad), want):
        assert_close(got, w, name=name)
