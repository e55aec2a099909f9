"""torch.compile(backend="panther") end to end on CPU: Inductor code, accuracy, dumps, staleness,
dynamic shapes, training graphs, and the explicit pr.nn layers.

Inductor compiles are slow on 2 cores: one compiled MLP is shared by the tests that only read it.
"""

from __future__ import annotations

import json
import os
import re

import networkx as nx
import pytest
import torch
from torch._inductor.utils import run_and_get_code

import panther as pr
from backend_models import COMPILED_VS_EAGER_RTOL, MLP, PREDICTION_SLACK, compile_panther, give_spectrum
from panther.backend import StaleWeightError
from panther.explain import explain
from panther.passes.measure import real_inputs
from panther_testing import RTOL, rel_err

def fresh_mlp() -> MLP:
    """An MLP whose forward is a new code object: Dynamo's per-code state (automatic dynamic
    shapes seen by earlier tests) starts empty."""

    class FreshMLP(MLP):
        def forward(self, x):
            return super().forward(x)

    return give_spectrum(FreshMLP()).eval()


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(0)
    model = give_spectrum(MLP()).eval()
    dump = tmp_path_factory.mktemp("dump")
    compiled, made = compile_panther(model, min_params=0, dump_dir=str(dump), tolerance=None)  # every layer rewritten
    x = torch.randn(8, 64)
    with torch.no_grad():
        y, code = run_and_get_code(compiled, x)
    return {"model": model, "compiled": compiled, "made": made, "x": x, "y": y, "code": "\n".join(code), "dump": dump}


def test_generated_cpp_runs_the_sketched_gemms(mlp):
    code = mlp["code"]
    assert "cpp_fused" in code  # Inductor's generated C++ (the GELUs)
    # Each rewritten linear is two GEMMs: x·A (mm), then (x·A)·B + bias (addmm).
    assert len(mlp["made"][0].report.rewritten) == 3
    assert len(re.findall(r"extern_kernels\.mm\(", code)) == 3
    assert len(re.findall(r"extern_kernels\.addmm\(", code)) == 3


def test_output_within_the_predicted_error(mlp):
    report = mlp["made"][0].report
    assert report.predicted_error is not None and report.predicted_error < 0.5
    with torch.no_grad():
        x = torch.randn(8, 64)
        err = rel_err(mlp["compiled"](x), mlp["model"](x))
    assert err <= PREDICTION_SLACK * report.predicted_error + RTOL[torch.float32]


def test_compiled_matches_eager_rewritten_graph(mlp):
    made = mlp["made"][0]
    with torch.no_grad():
        eager = made.graph_module(*real_inputs(made._example_inputs))
    out = eager[0] if isinstance(eager, (tuple, list)) else eager
    assert rel_err(mlp["y"], out) <= COMPILED_VS_EAGER_RTOL


def test_dump_folder(mlp):
    (folder,) = [os.path.join(mlp["dump"], d) for d in os.listdir(mlp["dump"])]
    assert mlp["made"][0].dump_path == folder
    names = set(os.listdir(folder))
    assert {"before.py", "after.py", "before.dot", "after.dot", "before.graphml", "after.graphml",
            "rewrites.json", "summary.txt"} <= names
    with open(os.path.join(folder, "rewrites.json")) as f:
        data = json.load(f)
    assert len(data["candidates"]) == 3
    row = data["candidates"][0]
    for key in ("path", "kind", "shapes", "decision", "reason", "params_before", "params_after", "flops_before",
                "flops_after", "bytes_before", "bytes_after", "flops_before_at_example", "measured_error",
                "predicted_error"):
        assert key in row
    assert row["path"] == "fc1" and row["decision"] == "rewrite"
    assert "lowrank_linear" in open(os.path.join(folder, "after.py")).read()
    after = nx.read_graphml(os.path.join(folder, "after.graphml"))
    marked = [n for n, a in after.nodes(data=True) if a["rewritten"]]
    assert len(marked) == 3 * 3  # per layer: get_attr A, get_attr B, lowrank_linear
    dot = open(os.path.join(folder, "after.dot")).read()
    assert dot.startswith("digraph") and dot.count("fillcolor") == len(marked)
    assert dot.count(" -> ") == after.number_of_edges()


def test_an_unwritable_dump_dir_does_not_fail_the_compile(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model = give_spectrum(MLP()).eval()
    compiled, made = compile_panther(model, min_params=0, dump_dir=str(blocker / "dumps"))
    x = torch.randn(8, 64)
    with torch.no_grad():
        y = compiled(x)
    report = made[0].report
    assert report.rewritten and made[0].dump_path is None
    assert any("could not be written" in n for n in report.notes)
    assert rel_err(y, model(x)) <= PREDICTION_SLACK * max(report.output_error, 1e-6)


def test_dump_dir_from_environment_and_trace_artifacts(monkeypatch, tmp_path):
    monkeypatch.setenv("PANTHER_DUMP_DIR", str(tmp_path))
    from panther.passes import dump

    seen = []
    real = dump.trace_structured

    def spy(name, metadata_fn, payload_fn):
        seen.append(metadata_fn()["name"])
        json.loads(payload_fn()) if metadata_fn()["encoding"] == "json" else payload_fn()
        return real(name, metadata_fn=metadata_fn, payload_fn=payload_fn)

    monkeypatch.setattr(dump, "trace_structured", spy)
    with torch.no_grad():
        report = explain(give_spectrum(MLP()).eval(), torch.randn(4, 64), min_params=0)
    assert report.dump_dir and os.path.isfile(os.path.join(report.dump_dir, "rewrites.json"))
    assert {"panther_rewrites", "panther_graph_before", "panther_graph_after", "panther_summary"} <= set(seen)


def test_max_autotune_uses_cpp_gemm_template():
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU()).eval()
    give_spectrum(model)
    compiled, made = compile_panther(model, min_params=0, mode="max-autotune", measure_error=False)
    x = torch.randn(16, 128)
    with torch.no_grad():
        y, code = run_and_get_code(compiled, x)
        assert rel_err(y, model(x)) < 0.05
    assert made[0].options.mode == "max-autotune"
    assert "micro_gemm" in "\n".join(code)  # Inductor's C++ GEMM template on the frozen factors


def test_mode_is_forwarded_through_torch_compile(monkeypatch):
    import torch._inductor.compile_fx as cfx

    patches = []
    real = cfx.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        patches.append(dict(config_patches or {}))
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        torch.compile(model, backend="panther", mode="max-autotune-no-cudagraphs")(torch.randn(2, 8))
    assert patches and patches[0].get("max_autotune") is True


@pytest.fixture
def fresh_dynamo():
    """For tests that compile MLP.forward again and again: the later tests of this file need
    its recompile budget."""
    yield
    torch._dynamo.reset()


def _scale_in_place(model, x):
    model.fc1.weight.mul_(0.5)  # bumps _version


def _vector_to_parameters(model, x):
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(model.parameters()) * 0.5, model.parameters())


def _assign_data(model, x):
    model.fc1.weight.data = model.fc1.weight.data * 0.5  # new storage, same Parameter, same _version


def _fused_adamw_step(model, x):
    # Zero gradients: the step is the decoupled weight decay alone, p ← p·(1 − lr·wd) = p / 2,
    # which keeps the weights' spectra (so the refreshed rank stays as accurate).
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=1.0, fused=True).step()  # does not bump _version


@pytest.mark.parametrize(
    "update", [_scale_in_place, _vector_to_parameters, _assign_data, _fused_adamw_step], ids=lambda f: f.__name__.strip("_")
)
@pytest.mark.parametrize("on_stale", ["refresh", "raise"])
def test_weight_changed_after_compile(update, on_stale, fresh_dynamo):
    """In place, by new storage, or by a fused optimizer step (the last three leave _version as
    it was): the compiled model refreshes its factors in place, or raises."""
    model = give_spectrum(MLP()).eval()
    compiled, made = compile_panther(model, min_params=0, on_stale=on_stale, measure_error=False)
    x = torch.randn(8, 64)
    with torch.no_grad():
        stale = compiled(x)
        err_before = rel_err(stale, model(x))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        update(model, x)
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        if on_stale == "raise":
            with pytest.raises(StaleWeightError, match="fc1"):
                compiled(x)
            return
        fresh, dense = compiled(x), model(x)
    assert len(made) == 1  # refreshed in place, not recompiled by Dynamo
    assert rel_err(fresh, stale) > 0.01
    cand = made[0].report.rewritten[0]
    assert cand.path == "fc1" and cand.weight_version == model.fc1.weight._version
    assert rel_err(fresh, dense) <= PREDICTION_SLACK * err_before


def test_refresh_that_misses_the_tolerance_compiles_again(fresh_dynamo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(256, 8) @ torch.randn(8, 256) / 45)  # rank 8 at compile time
    compiled, made = compile_panther(model, min_params=0)  # tolerance 5%
    x = torch.randn(64, 256)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-4
        assert made[0].report.rewritten[0].rank == 8
        # Full-rank weights: rank 8 would now be ~90% off; the graph is calibrated again.
        model.load_state_dict({"0.weight": torch.randn(256, 256) / 16, "0.bias": model[0].bias.clone()})
        y, dense = compiled(x), model(x)
    assert rel_err(y, dense) <= 0.05 * (1 + 1e-3)
    cand = made[0].report.candidates[0]
    assert cand.decision == "dense" or cand.rank > 8


def test_a_rebuild_keeps_the_graph_trainable(fresh_dynamo):
    """A frozen, rewritten layer under a trainable head, compiled with grad enabled: the graph
    compiled again after the frozen weight changed still trains the head."""
    torch.manual_seed(0)
    frozen, head = torch.nn.Linear(256, 256), torch.nn.Linear(256, 4)
    model = torch.nn.Sequential(frozen, head)
    with torch.no_grad():
        frozen.weight.copy_(torch.randn(256, 8) @ torch.randn(8, 256) / 45)  # rank 8
    frozen.requires_grad_(False)
    compiled, made = compile_panther(model, min_params=0)
    x = torch.randn(64, 256)
    compiled(x).sum().backward()
    assert [c.path for c in made[0].report.rewritten] == ["0"]
    head.weight.grad = None
    with torch.no_grad():
        frozen.weight.copy_(torch.randn(256, 256) / 16)  # full rank: rank 8 misses the tolerance
    y = compiled(x)
    assert y.requires_grad and made[0]._ctx.grad_enabled
    y.sum().backward()
    assert head.weight.grad is not None
    assert rel_err(y, model(x)) <= 0.05 * (1 + 1e-3)


def test_an_optimizer_step_that_skips_a_frozen_weight_leaves_it_fresh(fresh_dynamo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 8) @ torch.randn(8, 128) / 30)
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # all parameters: the frozen ones get no grad
    compiled, made = compile_panther(model, min_params=0, on_stale="raise")
    x = torch.randn(32, 128)
    compiled(x).square().mean().backward()
    assert [c.path for c in made[0].report.rewritten] == ["0"]
    opt.step()
    compiled(x)  # the frozen weight did not change: no StaleWeightError
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    with pytest.raises(StaleWeightError):
        compiled(x)


def test_refresh_check_with_a_bias_computed_in_the_graph(fresh_dynamo):
    """A sliced bias (b[:E], beside the sliced weight) is not a graph input: the refresh cannot
    measure the error against it, so the graph is calibrated again rather than trusted."""
    torch.manual_seed(0)
    E = 64

    class Sliced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3 * E, E))
            self.b = torch.nn.Parameter(torch.zeros(3 * E))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w[:E], self.b[:E])

    model = Sliced().eval()
    mean = torch.randn(E) * 3
    X = mean + 0.3 * torch.randn(512, E)  # a large mean row, which the bias cancels
    with torch.no_grad():
        model.w[:E] = torch.randn(E, 8) @ torch.randn(8, E) / 8
        model.b[:E] = -(model.w[:E] @ mean)
    compiled, made = compile_panther(model, min_params=0)
    with torch.no_grad():
        compiled(X)
        assert made[0].report.rewritten
        model.w[:E] += 0.04 * torch.randn(E, E)
        y, dense = compiled(X), model(X)
    assert rel_err(y, dense) <= 0.05 * (1 + 1e-3)  # the bias-free check (0.0099) let 0.064 through


def test_dynamic_shapes():
    model = fresh_mlp()
    compiled, made = compile_panther(model, min_params=0, measure_error=False)
    with torch.no_grad():
        for batch in (4, 6, 9):
            x = torch.randn(batch, 64)
            assert rel_err(compiled(x), model(x)) < 0.5
    assert len(made) == 2  # the second compile is dynamic in the batch size, the third reuses it
    assert not made[0].report.rewritten[0].cost_before["flops"].free_symbols
    assert made[1].report.rewritten[0].cost_before["flops"].free_symbols
    # The recompile reuses the factors: each weight is factorized once per version.
    assert made[1].report.rewritten[0].factors["A"] is made[0].report.rewritten[0].factors["A"]


def test_dynamic_true_compiles_once():
    model = fresh_mlp()
    compiled, made = compile_panther(model, dynamic=True, min_params=0, measure_error=False)
    with torch.no_grad():
        for batch in (3, 5, 7):
            x = torch.randn(batch, 64)
            assert rel_err(compiled(x), model(x)) < 0.5
    assert len(made) == 1


def test_training_graph_stays_dense_and_trains():
    from panther.passes.decide import TrainingGraphWarning

    model = MLP().train()
    compiled, made = compile_panther(model, min_params=0)
    x = torch.randn(8, 64)
    with pytest.warns(TrainingGraphWarning):
        y = compiled(x)
    assert not made[0].report.rewritten
    assert rel_err(y, model(x)) <= 1e-5
    y.sum().backward()
    assert model.fc1.weight.grad is not None


@pytest.mark.parametrize("backend", ["panther", "inductor"])
def test_explicit_layers_compile_without_graph_breaks(backend):
    torch.manual_seed(0)
    layers = [
        (pr.nn.SKLinear(64, 64, num_terms=1, low_rank=8), torch.randn(4, 64)),
        (pr.nn.SKConv2d(3, 8, 3, padding=1, num_terms=1, low_rank=4), torch.randn(2, 3, 8, 8)),
        (pr.nn.RandMultiHeadAttention(32, 4, num_random_features=16), torch.randn(2, 6, 32)),
    ]
    for layer, x in layers:
        args = (x, x, x) if isinstance(layer, pr.nn.RandMultiHeadAttention) else (x,)
        expected = layer(*args)
        out = torch.compile(layer, backend=backend, fullgraph=True)(*args)
        out, expected = (out[0], expected[0]) if isinstance(out, tuple) else (out, expected)
        assert rel_err(out, expected) <= 1e-4, type(layer).__name__


def test_inductor_failure_on_the_rewritten_graph_falls_back_to_dense(monkeypatch):
    import torch._inductor.compile_fx as cfx

    real = cfx.compile_fx

    def picky(gm, inputs, **kw):
        if any("panther" in str(n.target) for n in gm.graph.nodes):
            raise RuntimeError("no kernel for you")
        return real(gm, inputs, **kw)

    monkeypatch.setattr(cfx, "compile_fx", picky)
    model = fresh_mlp()
    x = torch.randn(4, 64)
    compiled, made = compile_panther(model, min_params=0, measure_error=False)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-5  # dense, and correct
    assert not made[0].report.rewritten
    assert {c.reason_code for c in made[0].report.candidates} == {"lowering"}
    assert "no kernel for you" in made[0].report.notes[-1]
    compiled, made = compile_panther(fresh_mlp(), min_params=0, measure_error=False, strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="no kernel for you"):
        compiled(x)


def test_a_failing_pass_compiles_the_graph_dense(monkeypatch):
    from panther import passes

    def broken(ctx):
        raise RuntimeError("decide exploded")

    pipeline = [(name, broken if name == "decide" else fn) for name, fn in passes.PIPELINE]
    monkeypatch.setattr(passes, "PIPELINE", pipeline)
    model = fresh_mlp()
    x = torch.randn(4, 64)
    compiled, made = compile_panther(model, min_params=0)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-5
    assert not made[0].report.candidates and "decide exploded" in made[0].report.notes[-1]
