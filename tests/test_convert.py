"""panther.convert and the trainable low-rank layers it swaps in (LowRankLinear, LowRankConv2d).

Fast: decisions come from the passes run eagerly (as panther.explain runs them), nothing is
compiled by Inductor.
"""

from __future__ import annotations

import copy
import math
import importlib

import pytest
import torch
from torch import nn

import panther
import panther as pr
from backend_models import give_spectrum
from panther_testing import RTOL, assert_close, rel_err

convert_module = importlib.import_module("panther.convert")  # (panther.convert is the function)

# A converted model computes the function of the backend's rewritten graph: its error against the
# dense model equals the report's output error up to fp32 rounding of a different op order.
SAME_FUNCTION_ATOL = 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def net() -> Net:
    torch.manual_seed(0)
    return give_spectrum(Net(), 0.8).eval()


def inputs(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 8, 8, 8, generator=torch.Generator().manual_seed(1))


# -- layers ---------------------------------------------------------------------------------


def test_low_rank_linear_function_and_gradients():
    g = torch.Generator().manual_seed(0)
    A, B, b = torch.randn(48, 6, generator=g), torch.randn(6, 20, generator=g), torch.randn(20, generator=g)
    layer = pr.nn.LowRankLinear.from_factors(A, B, b)
    x = torch.randn(3, 5, 48, generator=g, requires_grad=True)
    y = layer(x)
    assert_close(y, x @ A @ B + b)
    assert_close(layer.dense_weight(), (A @ B).t())
    y.square().sum().backward()
    xr = x.detach().requires_grad_()
    Ar, Br, br = (t.clone().requires_grad_() for t in (A, B, b))
    (xr @ Ar @ Br + br).square().sum().backward()
    for got, want in ((layer.A.grad, Ar.grad), (layer.B.grad, Br.grad), (layer.bias.grad, br.grad), (x.grad, xr.grad)):
        assert_close(got, want)
    assert sum(p.numel() for p in layer.parameters()) == 6 * (48 + 20) + 20


def test_low_rank_linear_from_linear_at_full_rank_is_exact():
    dense = nn.Linear(24, 16)
    layer = pr.nn.LowRankLinear.from_linear(dense, rank=16)
    x = torch.randn(4, 24)
    assert rel_err(layer(x), dense(x)) <= 1e-5


@pytest.mark.parametrize("bad, exc, match", [
    ((torch.randn(4, 3), torch.randn(2, 5)), ValueError, r"A must be \(in, r\) and B \(r, out\)"),
    ((torch.randn(4, 3), torch.randn(3, 5, dtype=torch.float64)), TypeError, "one dtype"),
    ((torch.randn(4, 3), torch.randn(3, 5), torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
])
def test_low_rank_linear_rejects_bad_factors(bad, exc, match):
    with pytest.raises(exc, match=match):
        pr.nn.LowRankLinear.from_factors(*bad)


@pytest.mark.parametrize("kw", [
    dict(stride=1, padding=1), dict(stride=2, padding=0), dict(stride=1, padding="same"),
    dict(stride=2, padding=1, padding_mode="reflect"), dict(stride=1, padding=(0, 1), kernel_size=(3, 2)),
], ids=["pad1", "stride2", "same", "reflect", "rect"])
def test_low_rank_conv_at_full_rank_is_the_conv(kw):
    kw = {"kernel_size": 3, **kw}
    conv = nn.Conv2d(4, 6, **kw)
    layer = pr.nn.LowRankConv2d.from_conv2d(conv, rank=6)
    x = torch.randn(2, 4, 9, 9)
    assert rel_err(layer(x), conv(x)) <= 1e-5
    assert rel_err(layer.dense_weight(), conv.weight) <= 1e-5
    assert sum(p.numel() for p in layer.parameters()) == 6 * (4 * conv.kernel_size[0] * conv.kernel_size[1] + 6) + 6


def test_low_rank_conv_generator():
    """generator= reproduces the initialization, leaves the global RNG alone, and draws from
    nn.Conv2d's distributions (kaiming-uniform weights, biases within 1/√fan_in)."""
    def make(seed):
        return pr.nn.LowRankConv2d(5, 7, 3, rank=4, generator=torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    a, b, c = make(3), make(3), make(4)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc), name
    for conv in (a.reduce, a.expand):
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max() <= 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5)
        if conv.bias is not None:
            assert conv.bias.abs().max() <= 1.0 / math.sqrt(fan_in)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        pr.nn.LowRankConv2d(5, 7, 3, rank=4, generator=3)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: pr.nn.LowRankLinear(16, 8, 2, dtype=torch.int32), "dtype must be a floating-point torch.dtype"),
        (lambda: pr.nn.LowRankLinear(16, 8, 2, bias="x"), r"bias must be a bool, got str \('x'\)"),
        (lambda: pr.nn.LowRankConv2d(3, 4, 3, rank=2, dtype=torch.int32), "dtype must be a floating-point torch.dtype"),
        (lambda: pr.nn.LowRankConv2d(3, 4, 3, rank=2, bias=1), r"bias must be a bool, got int \(1\)"),
    ],
    ids=["linear-dtype", "linear-bias", "conv-dtype", "conv-bias"],
)
def test_low_rank_layers_validate_dtype_and_bias(make, match):
    with pytest.raises(TypeError, match=match):
        make()


# -- convert --------------------------------------------------------------------------------


@torch.no_grad()
def test_convert_swaps_the_layers_the_backend_rewrites():
    model, x = net(), inputs()
    dense_model = copy.deepcopy(model)
    expected = panther.explain(model, x, min_params=0)
    report = panther.convert(model, x, min_params=0)
    assert [(c.path, c.decision, c.rank, c.method) for c in report.candidates] == [
        (c.path, c.decision, c.rank, c.method) for c in expected.candidates
    ]
    rewritten = {c.path for c in report.rewritten}
    assert rewritten, report.table()
    for path, module in model.named_children():
        want = {"conv": pr.nn.LowRankConv2d}.get(path, pr.nn.LowRankLinear) if path in rewritten else type(getattr(dense_model, path))
        assert type(module) is want, (path, type(module))
        assert all(c.attrs["converted_to"] == want.__name__ for c in report.rewritten if c.path == path)
    # the converted model is the rewritten graph: same error against the dense model
    assert abs(rel_err(model(x), dense_model(x)) - report.output_error) <= SAME_FUNCTION_ATOL
    assert "panther.convert replaced" in report.notes[-1]


def test_converted_model_trains():
    model, x = net(), inputs()
    panther.convert(model, x, min_params=0, tolerance=None)
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    target = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        assert model.fc1.A.grad is not None and model.conv.reduce.weight.grad is not None
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@torch.no_grad()
def test_filter_fn_and_patterns():
    model, x = net(), inputs()
    seen = []

    def only_linears_but_head(module, fqn):
        seen.append(fqn)
        return isinstance(module, nn.Linear) and fqn != "head"

    report = panther.convert(model, x, min_params=0, tolerance=None, filter_fn=only_linears_but_head)
    assert seen == ["conv", "fc1", "fc2", "head"]  # every convertible module, once, in tree order
    assert type(model.conv) is nn.Conv2d and type(model.head) is nn.Linear
    assert type(model.fc1) is type(model.fc2) is pr.nn.LowRankLinear
    assert {c.path: c.reason_code for c in report.candidates if c.decision == "dense"} == {"conv": "filtered", "head": "filtered"}
    model = net()
    panther.convert(model, x, min_params=0, tolerance=None, exclude=["fc*"])
    assert type(model.fc1) is nn.Linear and type(model.conv) is pr.nn.LowRankConv2d


@torch.no_grad()
def test_sketch_method_gives_sklinear_and_skconv2d():
    model, x = net(), inputs()
    dense_model = copy.deepcopy(model)
    report = panther.convert(model, x, min_params=0, method="sketch", low_rank=8)
    assert type(model.conv) is pr.nn.SKConv2d and type(model.fc1) is pr.nn.SKLinear
    assert model.fc1.num_terms == 1 and model.fc1.low_rank == 8
    # the SK layers hold exactly the backend's sketch: the same function
    assert abs(rel_err(model(x), dense_model(x)) - report.output_error) <= SAME_FUNCTION_ATOL


@torch.no_grad()
def test_convert_without_example_inputs():
    model = net()
    report = panther.convert(model, min_params=0)
    assert type(model.fc2) is pr.nn.LowRankLinear and model.fc2.rank == 32  # the rank_fraction budget
    assert {c.method for c in report.rewritten} == {"svd"}
    assert any("no example inputs" in n for n in report.notes)
    with pytest.raises(ValueError, match="tolerance=0.1 is calibrated on example inputs"):
        panther.convert(net(), tolerance=0.1)


def test_convert_errors():
    with pytest.raises(ValueError, match="cannot replace the root Linear"):
        panther.convert(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        panther.convert(net(), filter_fn="fc*")
    with pytest.raises(ValueError, match="unknown panther option 'rank'"):
        panther.convert(net(), rank=4)


@torch.no_grad()
def test_handler_registry(monkeypatch):
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    give_spectrum(model)
    x = torch.randn(32, 64)
    panther.convert(model, x, min_params=0, tolerance=None)
    assert type(model[0]) is MyLinear  # subclasses are not matched implicitly
    monkeypatch.setitem(convert_module.HANDLERS, MyLinear, convert_module.HANDLERS[nn.Linear])
    panther.convert(model, x, min_params=0, tolerance=None)
    assert type(model[0]) is pr.nn.LowRankLinear
    with pytest.raises(TypeError, match="module_type must be an nn.Module subclass"):
        convert_module.register_handler(int)


class _AttnModel(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=batch_first)
        self.fc = nn.Linear(64, 64)

    def forward(self, x, key_padding_mask=None):
        return self.fc(self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
@torch.no_grad()
def test_multihead_attention(batch_first):
    torch.manual_seed(0)
    model = give_spectrum(_AttnModel(batch_first)).eval()
    dense_model = copy.deepcopy(model)
    x = torch.randn(2, 128, 64) * 0.5
    mask = torch.zeros(2, 128, dtype=torch.bool)
    mask[1, 100:] = True
    if not batch_first:
        x = x.transpose(0, 1)
    opts = {"min_params": 0, "tolerance": None, "require_savings": False, "num_random_features": 64}
    report = panther.convert(model, x, example_kwargs={"key_padding_mask": mask}, **opts)
    attn = model.attn
    assert isinstance(attn, convert_module.RandMultiheadAttentionAsMHA) and isinstance(attn, pr.nn.RandMultiHeadAttention)
    assert attn.num_random_features == 64 and attn.batch_first is batch_first
    assert type(attn.q_proj) is pr.nn.LowRankLinear and attn.q_proj.A is attn.k_proj.A is attn.v_proj.A  # packed
    assert type(attn.out_proj) is pr.nn.LowRankLinear and type(model.fc) is pr.nn.LowRankLinear
    y = model(x, key_padding_mask=mask)
    assert abs(rel_err(y, dense_model(x, key_padding_mask=mask)) - report.output_error) <= SAME_FUNCTION_ATOL
    # a masked key changes nothing
    x2 = x.clone()
    if batch_first:
        x2[1, 110] += 5.0
    else:
        x2[110, 1] += 5.0
    y2 = model(x2, key_padding_mask=mask)
    keep = slice(None, 100)
    y, y2 = (t if batch_first else t.transpose(0, 1) for t in (y, y2))
    assert rel_err(y2[1, keep], y[1, keep]) <= RTOL[torch.float32] * 10
    with pytest.raises(ValueError, match="attn_mask cannot be represented"):
        attn(x, x, x, attn_mask=torch.zeros(128, 128))


def test_transformer_encoder_converts_and_runs_in_eval_and_training():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    enc = give_spectrum(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    dense = copy.deepcopy(enc)
    x = torch.randn(2, 64, 64) * 0.5
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[1, 50:] = True
    opts = {"min_params": 0, "tolerance": None, "require_savings": False, "num_random_features": 64}
    report = panther.convert(enc, x, example_kwargs={"src_key_padding_mask": mask}, **opts)
    assert type(enc.layers[0].linear1) is pr.nn.LowRankLinear
    assert isinstance(enc.layers[1].self_attn, pr.nn.RandMultiHeadAttention)  # the fused layer's attention
    with torch.no_grad():  # eval + no_grad would take the fused fast path: switched off
        y = enc(x, src_key_padding_mask=mask)
        assert abs(rel_err(y, dense(x, src_key_padding_mask=mask)) - report.output_error) <= SAME_FUNCTION_ATOL
    enc.train()
    enc(x, src_key_padding_mask=mask).square().mean().backward()
    assert enc.layers[0].self_attn.q_proj.A.grad is not None


def test_docstring_examples():
    import doctest

    for name in ("panther.convert", "panther.nn.lowrank", "panther.passes.calibrate"):
        result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name


# -- what the replacements inherit and what the report says about the converted model ------------


def _rank8_mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 8, generator=g) @ torch.randn(8, 128, generator=g) / 32)
    return model


def test_replacements_keep_eval_mode_and_frozen_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.1, batch_first=True)).eval()
    x = torch.randn(2, 10, 64)
    panther.convert(model, x, min_params=0, tolerance=None, num_random_features=32)
    assert all(not m.training for m in model.modules())  # the new attention's dropout is off
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    mlp = _rank8_mlp()
    mlp[0].requires_grad_(False)
    mlp[2].bias.requires_grad_(False)
    panther.convert(mlp, torch.randn(32, 128), min_params=0, tolerance=None)
    assert [type(m).__name__ for m in mlp] == ["LowRankLinear", "ReLU", "LowRankLinear"]
    flags = {n: p.requires_grad for n, p in mlp.named_parameters()}
    assert flags == {"0.A": False, "0.B": False, "0.bias": False, "2.A": True, "2.B": True, "2.bias": False}


def test_a_module_used_twice_is_converted_once_and_stays_tied():
    torch.manual_seed(0)
    shared = nn.Linear(128, 128)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(64, 128)
    with torch.no_grad():
        before = model(x)
    report = panther.convert(model, x, min_params=0, tolerance=None)
    assert type(model[0]).__name__ == "LowRankLinear" and model[0] is model[2]
    with torch.no_grad():
        assert report.output_error == pytest.approx(rel_err(model(x), before), rel=1e-6)


def test_report_error_is_the_converted_models():
    """Layers the passes would rewrite but that stay dense (filter_fn) do not count."""
    model = _rank8_mlp()
    x = torch.randn(32, 128)
    report = panther.convert(model, x, min_params=0, tolerance=None, filter_fn=lambda m, fqn: False)
    assert all(c.decision == "dense" for c in report.candidates)
    assert report.output_error == 0.0


def test_keyword_only_example_inputs_are_calibrated_on():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _rank8_mlp()

        def forward(self, *, x):
            return self.inner(x)

    model = Kw()
    report = panther.convert(model, example_kwargs={"x": torch.randn(64, 128)}, min_params=0)
    first = next(c for c in report.candidates if c.path == "inner.0")
    assert first.decision == "rewrite" and first.rank == 8 and first.measured_error <= 1e-4
    with pytest.raises(TypeError, match="example_kwargs"):
        panther.convert(_rank8_mlp(), example_kwargs=[1], min_params=0)


def test_wrongly_shaped_example_inputs_give_the_models_own_error():
    """A model that fails on its example inputs (here a (64, 100) input for a 128-wide layer):
    explain and convert raise a short ValueError naming the inputs and carrying the model's own
    message, not Dynamo's trace of the failure; the model is left as it was."""
    model = _rank8_mlp()
    weights = [p.detach().clone() for p in model.parameters()]
    for fn in (panther.explain, panther.convert):
        with pytest.raises(ValueError, match=r"fails on the example inputs \(positional: \[\(64, 100\)\].*mat1 and mat2") as info:
            fn(model, torch.randn(64, 100), min_params=0)
        assert len(str(info.value)) < 400
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model.modules() if m is not model)


@pytest.mark.parametrize("with_inputs", [True, False])
def test_convert_leaves_the_global_rng_alone(with_inputs):
    model = nn.Sequential(_rank8_mlp(), nn.MultiheadAttention(32, 4, batch_first=True))
    args = (torch.randn(16, 128),) if with_inputs else ()
    state = torch.get_rng_state()
    panther.convert(model[0], *args, min_params=0, tolerance=None)
    assert torch.equal(state, torch.get_rng_state())


def test_conv_without_example_inputs_takes_reflect_padding_wider_than_the_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=5, padding_mode="reflect"))
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        before = model(x)
    report = panther.convert(model, min_params=0)
    assert report.candidates[0].decision == "rewrite" and type(model[0]).__name__ == "LowRankConv2d"
    with torch.no_grad():
        assert model(x).shape == before.shape


def test_explain_argument_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module or a function, got int"):
        panther.explain(3, torch.randn(2, 4))
    with pytest.raises(TypeError, match="example_kwargs must be a dict"):
        panther.explain(nn.Linear(4, 4), torch.randn(2, 4), example_kwargs=[1])
