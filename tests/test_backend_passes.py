"""The backend's passes on Dynamo graphs, without Inductor: find, paths, decide, rewrite, counters.

Fast: graphs are captured by Dynamo and run eagerly (``panther.explain`` or a capturing backend).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backend_models import CNN, MLP, bert, give_spectrum, gpt2, passes_in_backend, transformer_encoder
from panther.explain import explain
from panther.passes import counters
from panther.passes.decide import TrainingGraphWarning
from panther_testing import rel_err

# An eager run of the rewritten graph and of the dense one, on the same inputs, agree to this
# relative error when nothing was rewritten (the expansion only respells ops).
EXPAND_RTOL = 1e-5
# Relative output error of Performer attention (256 features) on the small random-init models.
PERFORMER_RTOL = 0.5


@pytest.fixture(autouse=True)
def _clear_counters():
    counters.clear()
    yield


def _bert_inputs():
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask


@torch.no_grad()
def test_counts_and_reasons_mlp():
    model = give_spectrum(MLP()).eval()
    report = explain(model, torch.randn(8, 64), min_params=4096)
    assert [c.path for c in report.candidates] == ["fc1", "fc2", "head"]
    assert [c.decision for c in report.candidates] == ["rewrite", "rewrite", "dense"]
    assert report.candidates[2].reason_code == "small"
    assert counters.snapshot()["linear"] == {"matched": 3, "replaced": 2, "skipped:small": 1}
    for c in report.rewritten:
        assert c.params_after < c.params_before
        assert c.cost_after_at_example["flops"] < c.cost_before_at_example["flops"]
        assert c.measured_error is not None and c.predicted_error is not None
    assert report.output_error is not None and report.output_error < 0.05


@torch.no_grad()
def test_unsupported_conv_stays_dense():
    model = give_spectrum(CNN(), 0.7).eval()
    report = explain(model, torch.randn(2, 3, 16, 16), min_params=0, tolerance=None)
    by_path = {c.path: c for c in report.candidates}
    assert by_path["conv3"].decision == "dense"
    assert by_path["conv3"].reason == "groups=2 is not supported (only groups=1)"
    assert by_path["conv1"].decision == by_path["conv2"].decision == "rewrite"
    assert counters.snapshot()["conv"] == {"matched": 3, "replaced": 2, "skipped:groups": 1}
    # The report's own prediction bounds what came out.
    assert report.output_error <= 2 * (sum(c.predicted_error**2 for c in report.rewritten) ** 0.5) + 1e-6


@torch.no_grad()
def test_module_paths_bert():
    ids, mask = _bert_inputs()
    report = explain(bert("sdpa"), ids, example_kwargs={"attention_mask": mask}, min_params=0, require_savings=False)
    paths = {c.path for c in report.candidates}
    for p in ("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value",
              "encoder.layer.0.attention.output.dense", "encoder.layer.1.intermediate.dense", "pooler.dense",
              "encoder.layer.0.attention.self"):
        assert p in paths


@pytest.mark.parametrize(
    "options, expect",
    [
        ({"linear": False}, {"fc1": "disabled", "fc2": "disabled", "head": "disabled"}),
        ({"exclude": ["fc*"]}, {"fc1": "excluded", "fc2": "excluded", "head": "ok"}),
        ({"include": ["fc2"]}, {"fc1": "not_included", "fc2": "ok", "head": "not_included"}),
        ({"max_error": 1e-9}, {"fc1": "max_error", "fc2": "max_error", "head": "max_error"}),
        ({"rank_fraction": 0.01}, {"fc1": "rank", "fc2": "rank", "head": "rank"}),
        ({"low_rank": 64, "rank_fraction": 1.0}, {"fc1": "no_savings", "fc2": "no_savings", "head": "no_savings"}),
    ],
    ids=["kind-off", "exclude", "include", "max-error", "tiny-budget", "no-savings"],
)
@torch.no_grad()
def test_policy_options(options, expect):
    options = {"tolerance": None, **options}  # the budget rules (the tolerance has its own tests)
    report = explain(give_spectrum(MLP()).eval(), torch.randn(4, 64), min_params=0, **options)
    assert {c.path: c.reason_code for c in report.candidates} == expect


@torch.no_grad()
def test_rank_options():
    model = give_spectrum(MLP(), 0.5).eval()
    r = explain(model, torch.randn(4, 64), min_params=0, low_rank=4, num_terms=2, exclude=["head"])
    assert [c.rank for c in r.rewritten] == [16, 16]  # 2·num_terms·low_rank, as pr.nn.SKLinear
    r = explain(model, torch.randn(4, 64), min_params=0, max_error=0.05, exclude=["head"])
    assert all(c.predicted_error <= 0.05 for c in r.rewritten) and all(c.rank < 16 for c in r.rewritten)
    r = explain(model, torch.randn(4, 64), min_params=0, method="sketch", low_rank=8, exclude=["head"])
    assert [c.rank for c in r.rewritten] == [16, 16]


@torch.no_grad()
def test_seed_fixes_the_draws():
    model = transformer_encoder()
    x = torch.randn(2, 12, 64)
    opts = {"linear": False, "require_savings": False, "num_random_features": 32, "tolerance": None}
    a = explain(model, x, seed=1, **opts).rewritten
    b = explain(model, x, seed=1, **opts).rewritten
    c = explain(model, x, seed=2, **opts).rewritten
    assert len(a) == 2
    assert torch.equal(a[0].factors["omega"], b[0].factors["omega"])
    assert not torch.equal(a[0].factors["omega"], c[0].factors["omega"])
    assert not torch.equal(a[0].factors["omega"], a[1].factors["omega"])  # per layer


def test_training_graph_left_dense_with_one_warning():
    model = MLP().train()
    with pytest.warns(TrainingGraphWarning, match="pr.nn.SKLinear") as record:
        report = explain(model, torch.randn(4, 64), min_params=0)
    assert len([w for w in record if issubclass(w.category, TrainingGraphWarning)]) == 1
    assert {c.reason_code for c in report.candidates} == {"trainable"}
    report = explain(model, torch.randn(4, 64), min_params=0, rewrite_trainable=True, tolerance=None)
    assert len(report.rewritten) == 3


def _attention_cases():
    ids, mask = _bert_inputs()
    return {
        "bert-sdpa": (lambda: bert("sdpa"), (ids,), {"attention_mask": mask}, "sdpa", False),
        "bert-eager": (lambda: bert("eager"), (ids,), {"attention_mask": mask}, "manual", False),
        "gpt2-sdpa": (lambda: gpt2("sdpa"), (ids,), {}, "sdpa", True),
        "gpt2-eager": (lambda: gpt2("eager"), (ids,), {}, "manual", True),
        "gpt2-sdpa-padded": (lambda: gpt2("sdpa"), (ids,), {"attention_mask": mask}, "sdpa", True),
        "encoder-fastpath": (transformer_encoder, (torch.randn(2, 12, 64),), {"src_key_padding_mask": mask == 0},
                             "transformer_encoder_layer_fwd->sdpa", False),
        "mha": (lambda: _MHA(), (torch.randn(2, 12, 64), mask == 0), {}, "multi_head_attention_forward->sdpa", False),
    }


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x, key_padding_mask):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


@pytest.mark.parametrize("case", list(_attention_cases()))
@torch.no_grad()
def test_attention_spellings(case):
    build, args, kwargs, rule, causal = _attention_cases()[case]
    model = build().eval()
    report = explain(model, *args, example_kwargs=kwargs, linear=False, require_savings=False, num_random_features=256,
                     tolerance=None)
    attn = [c for c in report.candidates if c.kind == "attention"]
    assert attn and all(c.decision == "rewrite" for c in attn), [c.reason for c in attn]
    assert {c.rule for c in attn} == {rule}
    assert all(c.attrs["causal"] is causal for c in attn)
    assert counters.snapshot()["attention"]["replaced"] == len(attn)
    # Performer with 256 features: the random-feature estimate of these random-init models'
    # attention is off by a few percent (up to ~30% for the bare MHA, whose logits are larger);
    # an unrelated output would be off by ~100%.
    assert report.output_error < PERFORMER_RTOL


class _BiasedAttention(nn.Module):
    """sdpa with an ALiBi-like additive bias: not a key padding or causal mask."""

    def forward(self, q, k, v):
        n = q.shape[2]
        pos = torch.arange(n)
        bias = -(pos[None, :] - pos[:, None]).abs().float()
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@torch.no_grad()
def test_unrepresentable_mask_stays_dense():
    q = torch.randn(1, 2, 16, 8)
    report = explain(_BiasedAttention(), q, q, q, require_savings=False)
    (c,) = report.candidates
    assert c.decision == "dense" and c.reason_code == "mask"
    assert counters.snapshot()["attention"] == {"matched": 1, "skipped:mask": 1}


class _MaskedAttention(nn.Module):
    """sdpa under a boolean mask built in forward: ``kind`` picks its shape and meaning."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        n = q.shape[2]
        if self.kind == "2d-tril":  # (Nq, Nk): causal, although its leading dim could read as B
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        elif self.kind == "3d-per-head":  # (H, 1, Nk): one key mask per head
            mask = torch.stack([torch.ones(1, n, dtype=torch.bool), torch.arange(n)[None, :] < n // 2])
        elif self.kind == "ones-then-set":  # ones, then entries cleared in place
            mask = torch.ones(q.shape[0], 1, 1, n, dtype=torch.bool)
            mask[0, ..., n // 2 :] = False
        else:  # a shifted causal mask, its offset passed by keyword: key j visible from query j + 8
            qi = torch.arange(n)[None, None, :, None]
            ki = torch.arange(start=8, end=n + 8)[None, None, None, :]
            mask = ki <= qi
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["2d-tril", "3d-per-head", "ones-then-set", "arange-keyword-offset"])
@torch.no_grad()
def test_masks_that_are_not_key_padding_stay_dense(kind):
    """A 2-D mask is (Nq, Nk) and a 3-D one (H, Nq, Nk) under SDPA's broadcast, not (B, Nk); an
    arange offset given by keyword is still an offset. With the batch equal to the sequence
    length (2-D) or the head count (3-D) the shapes alone would pass for key padding; a ``ones``
    mask written in place afterwards is not all-true."""
    q = torch.randn(16, 2, 16, 8) if kind == "2d-tril" else torch.randn(2, 2, 16, 8)
    report = explain(_MaskedAttention(kind), q, q, q, require_savings=False, tolerance=None)
    (c,) = report.candidates
    assert c.decision == "dense" and c.reason_code == "mask", (c.decision, c.reason)


@torch.no_grad()
def test_causal_attention_with_wide_heads_is_rewritten_and_accurate():
    """At head_dim 256 a fixed causal key stabilizer put every feature past fp32's range (output
    0), so such layers stayed dense; the running-max stabilizer represents them. The rewrite is
    made and its measured error is that of the approximation (a zero output measures 1.0)."""
    q = torch.randn(1, 2, 128, 256) * 0.05

    class Causal(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    for x in (q, torch.randn(1, 2, 128, 32) * 0.05):
        (c,) = explain(Causal(), x, x, x, require_savings=False, tolerance=None, num_random_features=64).candidates
        assert c.decision == "rewrite", c.reason
        assert c.measured_error is not None and c.measured_error < 0.5, c.measured_error


@torch.no_grad()
def test_returned_attention_probabilities_stay_dense():
    model = bert("eager", layers=1)
    ids, mask = _bert_inputs()
    report = explain(model, ids, example_kwargs={"attention_mask": mask, "output_attentions": True},
                     linear=False, require_savings=False)
    attn = [c for c in report.candidates if c.kind == "attention"]
    assert attn and all(c.reason_code == "users" for c in attn)


def test_expansion_computes_the_same_function():
    """With nothing rewritten, the expanded encoder graph matches the fused one."""
    model = transformer_encoder()
    x = torch.randn(2, 12, 64)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    with torch.no_grad():
        (ctx, dense, rewritten), = passes_in_backend(model, x, options={"min_params": 10**9, "attention": False},
                                                     src_key_padding_mask=mask)
    assert counters.snapshot()["expand"]["transformer_encoder_layer_fwd:expanded"] == 2
    assert not any(n.target is torch._transformer_encoder_layer_fwd for n in ctx.gm.graph.nodes)
    assert rel_err(rewritten[0], dense[0]) < EXPAND_RTOL


def test_a_failing_layer_stays_dense_unless_strict(monkeypatch):
    from panther.passes import linear

    real = linear.factorize

    def flaky(ctx, cand, weight=None):
        if cand.path == "fc2":
            raise RuntimeError("boom")
        return real(ctx, cand, weight)

    monkeypatch.setattr(linear, "factorize", flaky)
    model = give_spectrum(MLP()).eval()
    with torch.no_grad():
        report = explain(model, torch.randn(4, 64), min_params=0, tolerance=None)
        assert {c.path: c.reason_code for c in report.candidates} == {"fc1": "ok", "fc2": "error", "head": "ok"}
        assert "boom" in report.candidates[1].reason
        with pytest.raises(Exception, match="boom"):
            explain(model, torch.randn(4, 64), min_params=0, strict=True, tolerance=None)


def test_costs_are_symbolic_in_dynamic_sizes():
    model = give_spectrum(MLP()).eval()
    with torch.no_grad():
        (ctx, _, _), = passes_in_backend(model, torch.randn(6, 64), options={"min_params": 0}, dynamic=True)
    c = ctx.candidates[0]
    assert c.cost_before["flops"].free_symbols  # e.g. 16384*s0
    assert c.cost_before_at_example["flops"] == 2 * 6 * 64 * 128


def test_measuring_failure_keeps_the_rewrites(monkeypatch):
    from panther import passes

    def broken(*a, **k):
        raise RuntimeError("cannot run")

    monkeypatch.setattr(passes, "measure_layers", broken)
    with torch.no_grad():
        report = explain(give_spectrum(MLP()).eval(), torch.randn(4, 64), min_params=0, tolerance=None)
    assert len(report.rewritten) == 3 and report.output_error is None
    assert any("cannot run" in n for n in report.notes)


class _SymbolicScale(nn.Module):
    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


def test_non_constant_scale_stays_dense():
    q = torch.randn(1, 2, 16, 8)
    with torch.no_grad():
        (ctx, _, _), = passes_in_backend(_SymbolicScale(), q, q, q, options={"require_savings": False}, dynamic=True)
    (c,) = ctx.candidates
    assert c.decision == "dense" and c.reason_code == "scale"


def test_summary_table_goes_to_the_panther_logger(caplog):
    with caplog.at_level("INFO", logger="panther"), torch.no_grad():
        explain(give_spectrum(MLP()).eval(), torch.randn(4, 64), min_params=0, tolerance=None)
    (text,) = [r.getMessage() for r in caplog.records if r.name == "panther" and "rewritten" in r.getMessage()]
    assert "fc1" in text and "linear" in text and "3/3 rewritten" in text


def test_autocast_regions_stay_dense():
    model = give_spectrum(MLP()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        report = explain(model, torch.randn(4, 64), min_params=0)
    assert report.candidates[0].reason_code == "autocast"  # fp32 in, bf16 out: keep autocast's dtype
    assert not report.rewritten


class _Broken(nn.Module):
    """A graph break between two linears: Dynamo hands the backend two graphs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


@torch.no_grad()
def test_explain_collects_every_graph():
    model = give_spectrum(_Broken()).eval()
    for _ in range(10):  # more than Dynamo's recompile limit (8): explain must not run out
        report = explain(model, torch.randn(4, 64), min_params=0)
        assert len(report.graphs) == 2
    assert [c.path for c in report.candidates] == ["a", "b"]
    assert len(report.rewritten) == 2
