"""2-D convolutions -> a rank-r convolution followed by a 1×1 convolution.

Pattern: ``torch.conv2d(x, W, b, stride, padding, dilation, groups)`` (``nn.Conv2d`` /
``F.conv2d``), W (out, in, kh, kw) a module weight.

Replacement: with the flattened weight W₂ = W.reshape(out, in·kh·kw) ≈ (A·B)ᵀ, A (in·kh·kw × r),
B (r × out) computed at compile time (:mod:`.factorize`)::

    h = conv2d(x, K1, None, stride, padding)     K1 = Aᵀ.reshape(r, in, kh, kw)
    y = conv2d(h, K2, b)                         K2 = Bᵀ.reshape(out, r, 1, 1)

the same factorized conv as ``pr.nn.SKConv2d`` (a conv into few channels, then a 1×1
projection). Both stay ``aten.convolution``: Inductor lowers them as it lowers any conv.

Preconditions: groups = 1 and dilation = 1 (others are reported dense with the reason), a
4-D floating input of the weight's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import cost as C
from .counters import counters
from .factorize import candidate_factors
from .graph import check_no_autocast, node_val
from .report import Candidate, Dense

__all__ = ["find_conv"]

KIND = "conv"
_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _args(node: fx.Node) -> dict[str, Any]:
    out = dict(zip(_NAMES, _DEFAULTS))
    out.update(zip(_NAMES, node.args))
    out.update({k: v for k, v in node.kwargs.items() if k in out})
    return out


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def find_conv(ctx) -> list[Candidate]:
    """Find every ``conv2d`` on a module weight (pattern and replacement in the module docstring).

    Counts ``matched`` per conv; convs with groups > 1, dilation > 1 or an unexpected input come
    back already decided dense, with the reason.
    """
    found = []
    for node in ctx.graph.nodes:
        if node.op != "call_function" or not (node.target is torch.conv2d or node.target is F.conv2d):
            continue
        a = _args(node)
        w = a["weight"]
        if not (isinstance(w, fx.Node) and w.op == "placeholder" and ctx.inputs.is_weight(w)):
            continue
        cand = Candidate(KIND, "conv2d", node, {"x": a["input"], "weight": w, "bias": a["bias"]})
        cand.attrs.update(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"])
        cand.weight_index = ctx.inputs.index(w)
        path = ctx.inputs.path(w) or ""
        cand.path = path[: -len(".weight")] if path.endswith(".weight") else path
        counters[KIND]["matched"] += 1
        try:
            _check(cand)
        except Dense as d:
            cand.dense(d.code, d.reason)
        found.append(cand)
    return found


def _check(cand: Candidate) -> None:
    xv, wv = node_val(cand.inputs["x"]), node_val(cand.inputs["weight"])
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor):
        raise Dense("no_meta", "no recorded shapes for the input or the weight")
    c_out, c_in_g, kh, kw = wv.shape
    cand.attrs.update(c_out=int(c_out), c_in=int(c_in_g), kh=int(kh), kw=int(kw))
    cand.params_before = int(wv.numel())
    groups = cand.attrs["groups"]
    if groups != 1:
        raise Dense("groups", f"groups={groups} is not supported (only groups=1)")
    if any(d != 1 for d in _pair(cand.attrs["dilation"])):
        raise Dense("dilation", f"dilation={cand.attrs['dilation']} is not supported (only 1)")
    if xv.dim() != 4:
        raise Dense("shape", f"input is {xv.dim()}-D, expected a 4-D batch")
    if not xv.dtype.is_floating_point or xv.dtype != wv.dtype:
        raise Dense("dtype", f"input dtype {xv.dtype} and weight dtype {wv.dtype} must be one floating dtype")
    check_no_autocast(xv, node_val(cand.node))


# -- the steps the policy and the rewriter call --------------------------------------------------


def dense_weight(ctx, cand: Candidate, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in·kh·kw) flattened real weight."""
    W = ctx.inputs.example_inputs[cand.weight_index] if weight is None else weight
    return W.reshape(W.shape[0], -1)


def shape_dims(cand: Candidate) -> tuple[int, int]:
    a = cand.attrs
    return a["c_in"] * a["kh"] * a["kw"], a["c_out"]


def cost(ctx, cand: Candidate, rank: int | None) -> dict:
    xv, yv = node_val(cand.inputs["x"]), node_val(cand.node)
    a = cand.attrs
    return C.conv_cost(
        C.sym(xv.shape[0]), a["c_in"], a["c_out"], a["kh"] * a["kw"],
        C.numel(xv.shape[2:]), C.numel(yv.shape[2:]), rank, xv.element_size(),
    )


def params_after(cand: Candidate, rank: int) -> int:
    n_in, n_out = shape_dims(cand)
    return rank * (n_in + n_out)


def activation_rows(cand: Candidate, values: dict[str, Any]):
    """The conv's input patches (rows of C·kh·kw, ordered as the flattened kernel), in blocks of
    images, for :mod:`.calibrate`."""
    from .calibrate import patch_block

    x, a = values["x"], cand.attrs
    kh, kw = a["kh"], a["kw"]
    pad = a["padding"]
    if isinstance(pad, str):
        if pad == "same":  # stride 1; the odd pixel goes to the bottom / right, as torch pads
            th, tw = kh - 1, kw - 1
            x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        pad = 0
    stride, pad = _pair(a["stride"]), _pair(pad)
    rows_per_image = ((x.shape[2] + 2 * pad[0] - kh) // stride[0] + 1) * ((x.shape[3] + 2 * pad[1] - kw) // stride[1] + 1)
    step = patch_block(a["c_in"] * kh * kw, rows_per_image)
    for i in range(0, x.shape[0], step):
        p = F.unfold(x[i : i + step], (kh, kw), padding=pad, stride=stride)  # (b, C·kh·kw, L)
        yield p.transpose(1, 2).reshape(-1, p.shape[1])


def factors_from(cand: Candidate, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two conv kernels K1 (r, in, kh, kw) and K2 (out, r, 1, 1) for factors A, B."""
    a, r = cand.attrs, A.shape[1]
    return {
        "K1": A.t().reshape(r, a["c_in"], a["kh"], a["kw"]).contiguous(),
        "K2": B.t().reshape(a["c_out"], r, 1, 1).contiguous(),
    }


def factors_to_ab(cand: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors A (in·kh·kw × r), B (r × out) behind the kernels K1, K2 (inverse of
    :func:`factors_from`)."""
    K1, K2 = cand.factors["K1"], cand.factors["K2"]
    r = K1.shape[0]
    return K1.reshape(r, -1).t(), K2.reshape(K2.shape[0], r).t()


def factorize(ctx, cand: Candidate, weight: torch.Tensor | None = None) -> None:
    """Compute the two conv kernels of ``cand.rank`` by ``cand.method`` into ``cand.factors``."""
    A, B, err = candidate_factors(ctx, cand, weight, lambda: dense_weight(ctx, cand, weight), (KIND, None, None))
    cand.factors = factors_from(cand, A, B)
    cand.predicted_error = err


def emit(ctx, cand: Candidate) -> fx.Node:
    """Insert the two convs before ``cand.node``; return the second."""
    graph, a = ctx.graph, cand.attrs
    with graph.inserting_before(cand.node):
        K1 = ctx.add_buffer(f"{cand.label}_K1", cand.factors["K1"])
        K2 = ctx.add_buffer(f"{cand.label}_K2", cand.factors["K2"])
        h = graph.call_function(torch.conv2d, (cand.inputs["x"], K1, None, a["stride"], a["padding"], 1, 1))
        y = graph.call_function(torch.conv2d, (h, K2, cand.inputs["bias"], 1, 0, 1, 1))
    cand.attrs["buffers"] = {"K1": K1.target, "K2": K2.target}
    y.meta["val"] = node_val(cand.node)
    return y


def eager(cand: Candidate, values: dict[str, Any]) -> torch.Tensor:
    a = cand.attrs
    h = torch.conv2d(values["x"], cand.factors["K1"], None, a["stride"], a["padding"], 1, 1)
    return torch.conv2d(h, cand.factors["K2"], values["bias"], 1, 0, 1, 1)
