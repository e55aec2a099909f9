"""The layers under ``torch.autocast``: they compute in the autocast dtype, as nn.Linear /
nn.Conv2d / nn.MultiheadAttention do, whatever mix of fp32 and low-precision inputs they get,
and their gradients reach the fp32 parameters.

Each output is compared with an explicit low-precision copy of the layer (the same computation,
so the same values) and with a float64 copy (within the dtype's tolerance).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import panther as pr
from panther.nn.pawXimpl import sinSRPE
from panther_testing import RTOL, rel_err

LOW = torch.bfloat16


def _layers():
    g = torch.Generator().manual_seed(0)
    return {
        "SKLinear": (pr.nn.SKLinear(48, 40, 2, 4, generator=g), (torch.randn(3, 5, 48),)),
        "SKLinear_triton": (pr.nn.SKLinear_triton(48, 40, 1, 4, generator=g), (torch.randn(7, 48),)),
        "LowRankLinear": (pr.nn.LowRankLinear(24, 20, 6, generator=g), (torch.randn(7, 24),)),
        "SKConv2d": (pr.nn.SKConv2d(3, 6, (3, 3), num_terms=1, low_rank=2, padding=1, generator=g), (torch.randn(2, 3, 9, 7),)),
        "RandMultiHeadAttention": (pr.nn.RandMultiHeadAttention(16, 2, 32, generator=g), (torch.randn(2, 9, 16),) * 3),
        "RandMultiHeadAttention+SRPE": (
            pr.nn.RandMultiHeadAttention(16, 2, 32, SRPE=sinSRPE(2, 8, 3, 16, generator=g), generator=g),
            (torch.randn(2, 9, 16),) * 3,
        ),
    }


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.filterwarnings("ignore:SKLinear_triton")
@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("input_dtype", [torch.float32, LOW], ids=["fp32-in", "bf16-in"])
def test_layer_under_autocast(name, input_dtype, device):
    """On CUDA the layers' eager calls run the Triton kernels on the cast operands."""
    layer, args = _layers()[name]
    layer.eval().to(device)
    args = tuple(a.to(device, input_dtype).requires_grad_() for a in args)
    with torch.autocast(device.type, dtype=LOW):
        y = _out(layer(*args))
    assert y.dtype == LOW
    low = copy.deepcopy(layer).to(LOW)
    wide = copy.deepcopy(layer).double()
    with torch.no_grad():
        y_low = _out(low(*(a.detach().to(LOW) for a in args)))
        if "SRPE" in name:
            # sinSRPE's fp32 frequencies make angles that its explicit bf16 copy rounds first.
            assert rel_err(y, y_low) <= RTOL[LOW]
        else:
            assert torch.equal(y.detach(), y_low)  # the same computation
        assert rel_err(y, _out(wide(*(a.detach().double() for a in args)))) <= RTOL[LOW]
    y.float().square().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(a.grad is not None and a.grad.dtype == input_dtype for a in args)


def test_stacked_layers_under_autocast_and_compile():
    """A bf16 activation from one layer feeds the next (this raised a dtype-mismatch ValueError)."""
    torch.manual_seed(0)
    model = nn.Sequential(pr.nn.SKLinear(32, 32, 1, 4), nn.ReLU(), pr.nn.SKLinear(32, 16, 1, 4), nn.Linear(16, 8))
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=LOW):
        y = model(x)
        yc = torch.compile(model, backend="aot_eager")(x)
    assert y.dtype == yc.dtype == LOW
    assert rel_err(yc, y) <= RTOL[LOW]
    with torch.no_grad():
        assert rel_err(y, copy.deepcopy(model).double()(x.double())) <= 2 * RTOL[LOW]  # rounded at each of 3 layers


def test_float64_inputs_are_left_alone_as_autocast_does():
    layer = pr.nn.SKLinear(16, 16, 1, 2)
    with torch.autocast("cpu", dtype=LOW), pytest.raises(ValueError, match="float64.*float32"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    wide = copy.deepcopy(layer).double()
    with torch.autocast("cpu", dtype=LOW):
        assert wide(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64
