"""Layers built on the meta device, materialized with ``to_empty`` and initialized by
``reset_parameters`` (the path of FSDP and of large-model loading), against the same layer built
directly from the same generator: bitwise the same parameters and buffers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import panther as pr
from panther.nn.pawXimpl import sinSRPE
from panther_testing import rel_err


def _builders():
    return {
        "SKLinear": lambda **kw: pr.nn.SKLinear(40, 24, 1, 4, **kw),
        "SKLinear-bf16": lambda **kw: pr.nn.SKLinear(40, 24, 1, 4, dtype=torch.bfloat16, **kw),
        "SKLinear_triton": lambda **kw: pr.nn.SKLinear_triton(40, 24, 1, 4, **kw),
        "SKConv2d": lambda **kw: pr.nn.SKConv2d(3, 8, 3, num_terms=1, low_rank=2, padding=1, **kw),
        "LowRankLinear": lambda **kw: pr.nn.LowRankLinear(40, 24, 5, **kw),
        "sinSRPE": lambda **kw: sinSRPE(2, 8, 3, 16, **kw),
        "RandMultiHeadAttention": lambda **kw: pr.nn.RandMultiHeadAttention(32, 4, 16, **kw),
        "RandMultiHeadAttention-causal": lambda **kw: pr.nn.RandMultiHeadAttention(32, 4, 16, iscausal=True, **kw),
    }


@pytest.mark.parametrize("name", list(_builders()))
def test_meta_then_to_empty_then_reset_parameters(name):
    build = _builders()[name]
    layer = build(device="meta")
    assert all(t.is_meta for t in list(layer.parameters()) + list(layer.buffers()))
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters(generator=torch.Generator().manual_seed(7))
    fresh = build(generator=torch.Generator().manual_seed(7))
    got, want = layer.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_reset_parameters_draws_from_the_global_rng_like_construction():
    torch.manual_seed(3)
    fresh = pr.nn.SKConv2d(3, 8, 3, num_terms=2, low_rank=2)
    layer = pr.nn.SKConv2d(3, 8, 3, num_terms=2, low_rank=2)
    torch.manual_seed(3)
    layer.reset_parameters()
    for (k, a), (_, b) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_meta_model_materialized_runs():
    """The usual loop: build under torch.device("meta"), to_empty, reset every module."""
    with torch.device("meta"):
        model = nn.Sequential(pr.nn.SKLinear(32, 32, 1, 4), nn.ReLU(), pr.nn.RandMultiHeadAttention(32, 4, 16, iscausal=True))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    x = torch.randn(2, 5, 32)
    h = model[1](model[0](x))
    out, _ = model[2](h, h, h)
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()
    # The dense map behind the sketch is a Kaiming-scale weight, not leftover memory.
    assert rel_err(model[0](x) - model[0].bias, x @ model[0].dense_weight().t()) <= 1e-5
