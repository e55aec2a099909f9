"""Linear layers -> ``torch.ops.panther.lowrank_linear``.

Pattern (one row of :data:`SPELLINGS` each):

* ``F.linear(x, W, b)`` (``nn.Linear``; Dynamo records ``torch._C._nn.linear``), W out×in;
* ``torch.addmm(b, x, W)`` (HF ``Conv1D`` as in GPT-2), W in×out, alpha = beta = 1;
* ``torch.matmul(x, W)`` / ``x @ W`` with W a 2-D parameter, in×out.

W must be a parameter or buffer (a graph input Dynamo sourced from a module), or a constant
row slice of one (``W[a:b]``, as ``nn.MultiheadAttention``'s packed in-projection is split).

Replacement: ``lowrank_linear(x, A, B, b, 1.0)`` with A (in×r), B (r×out) computed from the
real W at compile time (:mod:`.factorize`) and held as buffers of the compiled graph.

Preconditions: x and W are floating point of one dtype; the bias, if any, has shape (out,).
A matched layer that fails one is reported dense with the reason.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import cost as C
from .counters import counters
from .factorize import candidate_factors
from .graph import check_no_autocast, node_val
from .report import Candidate, Dense

__all__ = ["find_linear", "SPELLINGS"]

KIND = "linear"


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _linear_parts(node: fx.Node):
    return _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"), "out_in"


def _addmm_parts(node: fx.Node):
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    return _arg(node, 1, "mat1"), _arg(node, 2, "mat2"), _arg(node, 0, "input"), "in_out"


def _matmul_parts(node: fx.Node):
    return _arg(node, 0, "input"), _arg(node, 1, "other"), None, "in_out"


# (rule, targets, parts(node) -> (x, weight, bias, layout) or None)
SPELLINGS = [
    ("linear", (torch._C._nn.linear, F.linear), _linear_parts),
    ("addmm", (torch.addmm,), _addmm_parts),
    ("matmul", (torch.matmul, operator.matmul), _matmul_parts),
]


def _resolve_weight(ctx, w: Any) -> tuple[fx.Node, Any] | None:
    """(placeholder, row slice or None) when ``w`` is a module weight or a constant slice of one."""
    if not isinstance(w, fx.Node):
        return None
    if w.op == "placeholder":
        return (w, None) if ctx.inputs.is_weight(w) else None
    if w.op == "call_function" and w.target is operator.getitem:
        base, index = w.args
        if isinstance(base, fx.Node) and base.op == "placeholder" and ctx.inputs.is_weight(base):
            index = index if isinstance(index, tuple) else (index,)
            if len(index) == 1 and isinstance(index[0], slice):
                s = index[0]
                if all(v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)) and s.step in (None, 1):
                    return base, s
    return None


def find_linear(ctx) -> list[Candidate]:
    """Find every linear layer in ``ctx.graph`` (see the module docstring for the spellings).

    Counts ``matched`` per layer found; a layer that fails a precondition is returned already
    decided dense, with its reason.
    """
    found = []
    for node in ctx.graph.nodes:
        if node.op != "call_function":
            continue
        for rule, targets, parts in SPELLINGS:
            if not any(node.target is t for t in targets):
                continue
            got = parts(node)
            if got is None:
                break
            x, w, b, layout = got
            resolved = _resolve_weight(ctx, w)
            if resolved is None:
                break
            ph, row_slice = resolved
            cand = Candidate(KIND, rule, node, {"x": x, "weight": w, "bias": b})
            cand.attrs.update(layout=layout, weight_input=ph.name, row_slice=row_slice)
            cand.weight_index = ctx.inputs.index(ph)
            base_path = ctx.inputs.path(ph) or ""
            cand.path = base_path.rsplit(".", 1)[0] if base_path.endswith(".weight") else base_path
            cand.path = cand.path[: -len("_weight")] if cand.path.endswith("_weight") else cand.path  # in_proj_weight
            if row_slice is not None:
                cand.path += f"[{row_slice.start or ''}:{row_slice.stop if row_slice.stop is not None else ''}]"
            counters[KIND]["matched"] += 1
            try:
                _check(cand)
            except Dense as d:
                cand.dense(d.code, d.reason)
            found.append(cand)
            break
    return found


def _check(cand: Candidate) -> None:
    xv, wv, bv = (node_val(cand.inputs[k]) for k in ("x", "weight", "bias"))
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor):
        raise Dense("no_meta", "no recorded shapes for the input or the weight")
    if wv.dim() != 2:
        raise Dense("weight_rank", f"weight is {wv.dim()}-D, expected 2-D")
    if not xv.dtype.is_floating_point or xv.dtype != wv.dtype:
        raise Dense("dtype", f"input dtype {xv.dtype} and weight dtype {wv.dtype} must be one floating dtype")
    check_no_autocast(xv, node_val(cand.node))
    n_out, n_in = wv.shape if cand.attrs["layout"] == "out_in" else wv.shape[::-1]
    if xv.dim() < 1 or (isinstance(xv.shape[-1], int) and xv.shape[-1] != n_in):
        raise Dense("shape", f"input features {xv.shape[-1]} != weight's {n_in}")
    if cand.rule == "addmm" and xv.dim() != 2:
        raise Dense("shape", "addmm input is not 2-D")
    if bv is not None:
        if not isinstance(bv, torch.Tensor) or tuple(bv.shape) != (n_out,):
            raise Dense("bias", f"bias shape {tuple(getattr(bv, 'shape', ()))} is not ({n_out},)")
    cand.attrs.update(n_in=int(n_in), n_out=int(n_out), has_bias=bv is not None)
    cand.params_before = int(n_in * n_out)


# -- the steps the policy and the rewriter call --------------------------------------------------


def dense_weight(ctx, cand: Candidate, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The real (out, in) weight of ``cand`` (from the graph input, or ``weight`` if given)."""
    W = ctx.inputs.example_inputs[cand.weight_index] if weight is None else weight
    if cand.attrs["row_slice"] is not None:
        W = W[cand.attrs["row_slice"]]
    return W if cand.attrs["layout"] == "out_in" else W.t()


def shape_dims(cand: Candidate) -> tuple[int, int]:
    return cand.attrs["n_in"], cand.attrs["n_out"]


def cost(ctx, cand: Candidate, rank: int | None) -> dict:
    xv = node_val(cand.inputs["x"])
    T = C.numel(xv.shape[:-1])
    return C.linear_cost(T, cand.attrs["n_in"], cand.attrs["n_out"], rank, xv.element_size())


def params_after(cand: Candidate, rank: int) -> int:
    return rank * (cand.attrs["n_in"] + cand.attrs["n_out"])


def activation_rows(cand: Candidate, values: dict[str, Any]):
    """The layer's input rows (T, in) on real values, for :mod:`.calibrate`."""
    x = values["x"]
    yield x.reshape(-1, x.shape[-1])


def factors_from(cand: Candidate, A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """The replacement's tensors for factors A (in×r), B (r×out)."""
    return {"A": A, "B": B}


def factors_to_ab(cand: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors A (in×r), B (r×out) behind ``cand.factors``."""
    return cand.factors["A"], cand.factors["B"]


def factorize(ctx, cand: Candidate, weight: torch.Tensor | None = None) -> None:
    """Compute the factors of ``cand.rank`` by ``cand.method`` into ``cand.factors`` (and the
    predicted error); data-aware uses the activations recorded by :mod:`.calibrate`."""
    A, B, err = candidate_factors(ctx, cand, weight, lambda: dense_weight(ctx, cand, weight), (KIND, repr(cand.attrs.get("row_slice")), cand.attrs.get("layout")))
    cand.factors = factors_from(cand, A, B)
    cand.predicted_error = err


def emit(ctx, cand: Candidate) -> fx.Node:
    """Insert ``lowrank_linear(x, A, B, bias, 1.0)`` before ``cand.node``; return it."""
    graph = ctx.graph
    with graph.inserting_before(cand.node):
        A = ctx.add_buffer(f"{cand.label}_A", cand.factors["A"])
        B = ctx.add_buffer(f"{cand.label}_B", cand.factors["B"])
        new = graph.call_function(torch.ops.panther.lowrank_linear.default, (cand.inputs["x"], A, B, cand.inputs["bias"], 1.0))
    cand.attrs["buffers"] = {"A": A.target, "B": B.target}
    new.meta["val"] = node_val(cand.node)
    return new


def eager(cand: Candidate, values: dict[str, Any]) -> torch.Tensor:
    """The replacement on real tensors (for measuring its error on the example inputs)."""
    return torch.ops.panther.lowrank_linear(values["x"], cand.factors["A"], cand.factors["B"], values["bias"], 1.0)
