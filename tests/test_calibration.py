"""Tolerance calibration: exact prefix errors, the smallest rank meeting the tolerance, feature
doubling for attention, data-aware factors, and what the report says about them.

Fast: graphs are captured by Dynamo and run eagerly (``panther.explain`` / a capturing backend).
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

from backend_models import MLP, passes_in_backend
from panther.explain import explain
from panther.linalg import lowrank
from panther.passes import counters
from panther.passes.calibrate import data_aware_damping, prefix_errors
from panther_testing import rel_err

F64 = torch.float64
# The prefix formula is exact: it agrees with a direct fp64 measurement to rounding.
PREFIX_RTOL = 1e-9
# measured_error comes from running the fp32 op; the calibration's from the fp64 formula.
FP32_ERROR_SLACK = 1e-4
TOL = 0.05


@pytest.fixture(autouse=True)
def _clear_counters():
    counters.clear()
    yield


def structured_mlp(seed: int = 0, decay: float = 0.85) -> nn.Module:
    """An MLP whose weights have decaying spectra and whose first layer makes correlated features."""
    g = torch.Generator().manual_seed(seed)
    model = MLP(d_in=64, hidden=128, d_out=16)
    with torch.no_grad():
        for lin in (model.fc1, model.fc2, model.head):
            out, inp = lin.weight.shape
            k = min(out, inp)
            U = torch.linalg.qr(torch.randn(out, k, generator=g)).Q
            V = torch.linalg.qr(torch.randn(inp, k, generator=g)).Q
            lin.weight.copy_((U * decay ** torch.arange(k, dtype=torch.float32)) @ V.t() * 3)
            lin.bias.normal_(0, 0.1, generator=g)
    return model.eval()


def correlated_inputs(n: int, d: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * (0.8 ** torch.arange(d, dtype=torch.float32))
    return torch.randn(n, d, generator=g) @ mix.t()


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every nn.Linear of ``model`` on ``x`` (eager, forward hooks)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def output_error(lin: nn.Linear, X: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    X = X.detach().double()
    W, b = lin.weight.detach().double(), lin.bias.detach().double()
    return float((X @ W.t() - X @ A.double() @ B.double()).norm() / (X @ W.t() + b).norm())


# -- the prefix formula ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "rsvd", "data-aware", "sketch"])
def test_prefix_errors_are_exact(method):
    """Every prefix's error from one factorization equals a direct measurement."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 30, generator=g, dtype=F64)
    b = torch.randn(40, generator=g, dtype=F64)
    X = torch.randn(200, 30, generator=g, dtype=F64) @ torch.randn(30, 30, generator=g, dtype=F64)
    Y = X @ W.t() + b
    stats = {"gram": X.t() @ X, "rows": 200, "out_sq": float(Y.square().sum())}
    A, B = lowrank(W, 20, method, activations=X, generator=g)
    errs = prefix_errors(stats, W, A, B)
    for r in (1, 7, 20):
        direct = float((X @ W.t() - X @ A[:, :r] @ B[:r]).norm() / Y.norm())
        assert abs(float(errs[r - 1]) - direct) <= PREFIX_RTOL * max(direct, 1.0), (r, float(errs[r - 1]), direct)


# -- the chosen rank --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "svd", "rsvd"])
@torch.no_grad()
def test_chosen_rank_is_the_smallest_meeting_the_tolerance(method):
    model = structured_mlp()
    x = correlated_inputs(256)
    report = explain(model, x, min_params=0, method=method)
    acts = layer_inputs(model, x)
    rewritten = report.rewritten
    assert {c.path for c in rewritten} >= {"fc1", "fc2"}, report.table()
    for c in rewritten:
        r = c.rank
        errors = c.calibration["errors"]
        assert c.calibration["tolerance"] == TOL and r <= c.calibration["max_rank"]
        # rank r meets the tolerance, measured by running the replacement op; rank r - 1 does not
        assert c.measured_error <= TOL + FP32_ERROR_SLACK, (c.path, c.measured_error)
        assert abs(c.measured_error - errors[r - 1]) <= FP32_ERROR_SLACK
        assert r >= 2 and errors[r - 2] > TOL, (c.path, r, errors[: r])
        if method in ("auto", "svd"):  # deterministic factorizations: rank r - 1 measured directly
            lin = dict(model.named_modules())[c.path]
            X = acts[c.path]
            stats = {"gram": X.double().t() @ X.double(), "rows": X.shape[0]}
            kind = "data-aware" if method == "auto" else "svd"
            assert c.method == kind
            A, B = lowrank(lin.weight, r - 1, kind, activations=X, damping=data_aware_damping(stats))
            assert output_error(lin, X, A, B) > TOL


@torch.no_grad()
def test_data_aware_needs_a_smaller_rank_than_svd():
    """At the rank data-aware chose, the truncated SVD misses the tolerance (the report says so)."""
    model, x = structured_mlp(), correlated_inputs(256)
    aware = {c.path: c for c in explain(model, x, min_params=0).rewritten}
    svd = {c.path: c for c in explain(model, x, min_params=0, method="svd").rewritten}
    for path in ("fc1", "fc2"):
        assert aware[path].method == "data-aware"
        assert aware[path].rank < svd[path].rank, (aware[path].rank, svd[path].rank)
        assert aware[path].svd_error > TOL >= aware[path].measured_error - FP32_ERROR_SLACK
        assert svd[path].svd_error == pytest.approx(svd[path].calibration["errors"][svd[path].rank - 1], abs=1e-6)


@torch.no_grad()
def test_a_layer_that_cannot_meet_the_tolerance_stays_dense():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).eval()  # flat spectra
    report = explain(model, torch.randn(512, 128), min_params=0)
    assert {c.reason_code for c in report.candidates} == {"tolerance"}
    c = report.candidates[0]
    assert "largest worthwhile rank 32" in c.reason and "tolerance 0.05" in c.reason
    assert c.calibration["max_rank"] == 32 and min(c.calibration["errors"]) > TOL
    assert counters.snapshot()["linear"] == {"matched": 2, "skipped:tolerance": 2}
    # rank_fraction caps the search: a looser budget lets the tolerance be met
    loose = explain(model, torch.randn(512, 128), min_params=0, tolerance=0.9, rank_fraction=0.25)
    assert all(c.rank <= 16 for c in loose.rewritten) and loose.rewritten


@torch.no_grad()
def test_sketch_rank_by_bisection():
    model, x = structured_mlp(decay=0.5), correlated_inputs(256)
    report = explain(model, x, min_params=0, method="sketch", tolerance=0.5, exclude=["head"])
    for c in report.rewritten:
        assert c.method == "sketch" and c.rank % 2 == 0
        tried = {int(k): v for k, v in c.calibration["tried"].items()}
        assert c.measured_error <= 0.5 + FP32_ERROR_SLACK and tried[c.rank] <= 0.5
        assert c.rank == 2 or tried[c.rank - 2] > 0.5  # the bisection measured the next smaller rank


@torch.no_grad()
def test_without_a_tolerance_the_budget_rank_is_used():
    model, x = structured_mlp(), correlated_inputs(256)
    report = explain(model, x, min_params=0, tolerance=None)
    assert [c.rank for c in report.rewritten] == [21, 32, 7]  # rank_fraction 0.5: r·(in+out) <= in·out/2
    assert {c.method for c in report.rewritten} == {"data-aware"}
    assert all(c.svd_error is not None and not c.calibration for c in report.rewritten)
    report = explain(model, x, min_params=0, measure_error=False)  # nothing runs: svd, budget rank
    assert [(c.rank, c.method, c.measured_error) for c in report.rewritten] == [(21, "svd", None), (32, "svd", None), (7, "svd", None)]


# -- attention -------------------------------------------------------------------------------


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v)


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    return q * 0.4, k * 0.4, v


@torch.no_grad()
def test_attention_doubles_the_features_until_the_tolerance_is_met():
    q, k, v = _qkv()
    report = explain(_Attention(), q, k, v, num_random_features=8, tolerance=0.2, require_savings=False)
    (c,) = report.candidates
    tried = {int(m): e for m, e in c.calibration["tried"].items()}
    assert c.decision == "rewrite" and c.rank > 8, (c.reason, tried)
    assert sorted(tried) == [8 << i for i in range(len(tried))] and max(tried) == c.rank
    assert tried[c.rank] <= 0.2 < tried[c.rank // 2]
    assert c.measured_error == pytest.approx(tried[c.rank], abs=1e-5)
    strict = explain(_Attention(), q, k, v, num_random_features=8, tolerance=1e-4, require_savings=False)
    (c,) = strict.candidates
    assert c.reason_code == "tolerance" and "with up to 64 features" in c.reason  # 8·2³


# -- report, caching, refresh ---------------------------------------------------------------


@torch.no_grad()
def test_report_and_dump_have_the_calibration(tmp_path):
    model, x = structured_mlp(), correlated_inputs(256)
    report = explain(model, x, min_params=0, dump_dir=str(tmp_path))
    row = next(r for r in json.load(open(f"{report.dump_dir}/rewrites.json"))["candidates"] if r["path"] == "fc2")
    c = next(c for c in report.candidates if c.path == "fc2")
    assert row["method"] == "data-aware" and row["rank"] == c.rank
    assert row["svd_error"] == pytest.approx(c.svd_error) and row["measured_error"] == pytest.approx(c.measured_error)
    assert row["predicted_speedup"] == pytest.approx(row["flops_before_at_example"] / row["flops_after_at_example"])
    assert row["calibration"]["tolerance"] == TOL and len(row["calibration"]["errors"]) == row["calibration"]["max_rank"]
    table = report.table()
    assert "data-aware" in table and f"x{c.predicted_speedup:.2f}" in table and "err meas/svd" in table


def test_dynamic_recompile_reuses_the_calibration():
    model, x = structured_mlp(), correlated_inputs(256)
    results = []
    with torch.no_grad():
        results += passes_in_backend(model, x, options={"min_params": 0})
        # Same rows twice: every output error is the same, so the cached factors still fit.
        results += passes_in_backend(model, torch.cat([x, x]), options={"min_params": 0})
    first, second = ([c for c in ctx.candidates if c.decision == "rewrite"] for ctx, _, _ in results)
    assert [c.rank for c in first] == [c.rank for c in second]
    assert first[0].factors["A"] is second[0].factors["A"]  # calibrated once per weight version


def test_recompile_on_inputs_the_cached_factors_miss_calibrates_again():
    model = structured_mlp()
    results = []
    with torch.no_grad():
        results += passes_in_backend(model, correlated_inputs(256), options={"min_params": 0})
        results += passes_in_backend(model, correlated_inputs(100, seed=3), options={"min_params": 0})
    (ctx1, _, _), (ctx2, _, _) = results
    first = {c.path: c for c in ctx1.candidates if c.decision == "rewrite"}
    second = {c.path: c for c in ctx2.candidates if c.decision == "rewrite"}
    X2 = layer_inputs(model, correlated_inputs(100, seed=3))
    recalibrated = 0
    for path, c in second.items():
        lin = getattr(model, path)
        assert output_error(lin, X2[path], c.factors["A"], c.factors["B"]) <= TOL  # on the inputs it was compiled for
        old = first.get(path)
        if old is not None and output_error(lin, X2[path], old.factors["A"], old.factors["B"]) > TOL:
            assert c.factors["A"] is not old.factors["A"]
            recalibrated += 1
    assert recalibrated >= 1  # the case under test happened


def test_a_cached_no_rank_fits_is_tried_again_on_new_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(128, 128)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 128) / 11)  # a flat spectrum
    model = nn.Sequential(lin).eval()
    Q = torch.linalg.qr(torch.randn(128, 128)).Q
    with torch.no_grad():
        (first,) = passes_in_backend(model, torch.randn(256, 128), options={"min_params": 0})  # every direction
        (second,) = passes_in_backend(model, torch.randn(100, 4) @ Q[:, :4].t(), options={"min_params": 0})  # 4 of them
    a, b = first[0].candidates[0], second[0].candidates[0]
    assert (a.decision, a.reason_code) == ("dense", "tolerance")
    assert b.decision == "rewrite" and b.rank <= 4


def test_a_shared_weight_is_calibrated_per_call_site():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(256, 256)

        def forward(self, a, b):
            return self.l(a), self.l(b)

    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(256, 256)).Q
    a = torch.randn(512, 16) @ Q[:, :16].t()  # the two call sites see orthogonal subspaces
    b = torch.randn(512, 16) @ Q[:, 16:32].t()
    model = Tied().eval()
    with torch.no_grad():
        ((ctx, dense, approx),) = passes_in_backend(model, a, b, options={"min_params": 0})
    sites = [c for c in ctx.candidates if c.decision == "rewrite"]
    assert len(sites) == 2 and sites[0].factors["A"] is not sites[1].factors["A"]
    for c, X in zip(sites, (a, b)):
        assert output_error(model.l, X, c.factors["A"], c.factors["B"]) <= TOL
        assert c.measured_error <= TOL * (1 + FP32_ERROR_SLACK)
    for y, ref in zip(approx, dense):
        assert rel_err(y, ref) <= TOL * (1 + FP32_ERROR_SLACK)


def test_an_empty_example_batch_is_not_calibrated_on():
    from backend_models import compile_panther

    model, x = structured_mlp(), correlated_inputs(256)
    compiled, made = compile_panther(model, min_params=0)
    with torch.no_grad():
        assert compiled(torch.zeros(0, 64)).shape == (0, 16)
        compiled(x)
    empty, full = made[0].report, made[-1].report
    assert empty.candidates and all(c.decision == "dense" and c.reason_code == "no_rows" for c in empty.candidates)
    # The next batch is calibrated on, not served factors fit to nothing (every rank fits 0 rows).
    X = layer_inputs(model, x)
    assert full.rewritten
    for c in full.rewritten:
        lin = getattr(model, c.path)
        assert c.measured_error <= TOL * (1 + FP32_ERROR_SLACK)
        assert output_error(lin, X[c.path], c.factors["A"], c.factors["B"]) <= TOL


def test_a_rewrite_measured_over_the_tolerance_stays_dense(monkeypatch):
    decide_mod = importlib.import_module("panther.passes.decide")  # (panther.passes.decide is also the pass)
    # Calibration believes rank 1 is exact (its errors are forged to 0); the measurement on the
    # example inputs finds out.
    monkeypatch.setattr(decide_mod, "choose_rank", _forged_choice)
    with torch.no_grad():
        report = explain(structured_mlp(), correlated_inputs(128), min_params=0)
    assert report.candidates and all(c.decision == "dense" and c.reason_code == "measured" for c in report.candidates)
    assert all(c.measured_error > TOL for c in report.candidates)
    assert counters.snapshot()["linear"]["skipped:measured"] == len(report.candidates)


def _forged_choice(W, stats, method, tol, max_rank, seed, root=None):
    from panther.passes.calibrate import RankChoice

    A, B = lowrank(W.detach(), 1, "svd")
    return RankChoice(method, max_rank, 1, A=A, B=B, error=0.0, errors=[0.0], svd_errors=[0.0])


def test_changed_weight_is_refactorized_in_the_recorded_metric():
    from panther.passes import linear

    model, x = structured_mlp(), correlated_inputs(256)
    with torch.no_grad():
        ((ctx, _, _),) = passes_in_backend(model, x, options={"min_params": 0})
    cand = next(c for c in ctx.candidates if c.path == "fc2")
    assert cand.method == "data-aware" and set(cand.stats) == {"root", "damping", "mean"}
    old = cand.factors["A"] @ cand.factors["B"]
    with torch.no_grad():
        model.fc2.weight.mul_(-2.0)
        linear.factorize(ctx, cand, model.fc2.weight)
    X = layer_inputs(model, x)["fc2"]
    A, B = cand.factors["A"], cand.factors["B"]
    err = float((X @ model.fc2.weight.t() - X @ A @ B).norm() / (X @ model.fc2.weight.t()).norm())
    assert err <= TOL  # same rank, same metric, new weight: as accurate as before
    assert rel_err(A @ B, -2.0 * old) <= 1e-4  # the data-aware factors scale with the weight


def test_metric_error_matches_the_recorded_rows():
    from panther.passes.calibrate import metric_error

    model, x = structured_mlp(), correlated_inputs(256)
    with torch.no_grad():
        ((ctx, _, _),) = passes_in_backend(model, x, options={"min_params": 0})
    X = layer_inputs(model, x)
    g = torch.Generator().manual_seed(5)
    for cand in (c for c in ctx.candidates if c.decision == "rewrite"):
        lin = getattr(model, cand.path)
        W = lin.weight.detach() * (1 + 0.3 * torch.randn(lin.weight.shape, generator=g))  # a changed weight
        bias = torch.randn(lin.bias.shape, generator=g)
        A, B = cand.factors["A"], cand.factors["B"]
        Xd = X[cand.path].double()
        direct = float((Xd @ W.double().t() - Xd @ A.double() @ B.double()).norm() / (Xd @ W.double().t() + bias.double()).norm())
        assert metric_error(cand.stats, W, A, B, bias) == pytest.approx(direct, rel=1e-6)


def test_calibration_failure_is_a_note_not_an_error(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("cannot record")

    cal = importlib.import_module("panther.passes.calibrate")  # (panther.passes.calibrate is also the pass)
    monkeypatch.setattr(cal, "_record", broken)
    with torch.no_grad():
        report = explain(structured_mlp(), correlated_inputs(64), min_params=0)
    assert any("cannot record" in n for n in report.notes)
    assert {c.method for c in report.rewritten} <= {"svd"}  # nothing recorded: weight-only rules


def test_explain_with_graph_breaks_reports_the_whole_models_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 16)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            torch._dynamo.graph_break()
            return self.fc2(h)

    torch.manual_seed(0)
    model, x = Broken().eval(), correlated_inputs(128)
    with torch.no_grad():
        report = explain(model, x, min_params=0, tolerance=None)
    assert len(report.graphs) == 2
    f = {c.path: c.factors for c in report.candidates if c.decision == "rewrite"}
    assert set(f) == {"fc1", "fc2"}
    with torch.no_grad():  # the two low-rank layers composed by hand, in float64
        xd = x.double()
        h = torch.relu(xd @ f["fc1"]["A"].double() @ f["fc1"]["B"].double() + model.fc1.bias.double())
        y = h @ f["fc2"]["A"].double() @ f["fc2"]["B"].double() + model.fc2.bias.double()
        want = rel_err(y, model.double()(xd))
    assert report.output_error == pytest.approx(want, rel=1e-4)
    assert report.output_error > max(g.output_error for g in report.graphs)  # not a per-graph figure
