"""Measure the output error of each rewrite on the example inputs.

:func:`measure_layers` runs the dense graph once on the real example inputs (Dynamo hands the
backend real tensors); at each chosen candidate it also runs the replacement on the same
inputs and records ``measured_error = ‖approx − dense‖ / ‖dense‖``. :func:`measure_outputs`
runs the rewritten graph and compares its outputs with the dense ones (``report.output_error``).

Side effects are fenced off: inputs that are not parameters are cloned (a graph may update a
buffer in place), the global RNG state is restored afterwards, and nothing records autograd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .kinds import kind_module

__all__ = ["CandidateProbe", "measure_layers", "measure_outputs", "rel_err", "real_inputs", "rng_fence"]


def rel_err(approx: Any, exact: Any) -> float | None:
    """Largest relative Frobenius error over the floating tensors of two (nested) outputs."""
    a_leaves, b_leaves = pytree.tree_leaves(approx), pytree.tree_leaves(exact)
    worst = None
    for a, b in zip(a_leaves, b_leaves):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and b.dtype.is_floating_point and b.numel():
            a64, b64 = a.detach().double(), b.detach().double()
            if not torch.isfinite(a64).all():
                err = float("inf")
            else:
                err = float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))
            worst = err if worst is None else max(worst, err)
    return worst


def real_inputs(example_inputs: list[Any]) -> list[Any]:
    """Real values to run on: tensors that are not parameters cloned, SymInts at their hints."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
            x = x.clone()
        elif isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            hint = x.node.hint  # torch 2.11 hands the backend SymInts for dynamic sizes
            if hint is None:
                raise ValueError("a symbolic example input has no hint")
            x = hint
        out.append(x)
    return out


@contextlib.contextmanager
def _fenced(example_inputs: list[Any]):
    with rng_fence(example_inputs), torch.no_grad():
        yield


def rng_fence(values) -> contextlib.AbstractContextManager:
    """``torch.random.fork_rng`` over the CPU and the CUDA devices of the tensors among
    ``values``: whatever runs inside leaves the caller's RNG streams as they were."""
    devices = sorted({x.device.index or 0 for x in values if isinstance(x, torch.Tensor) and x.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


class CandidateProbe(fx.Interpreter):
    """Runs a graph on real values and calls ``on_candidate`` at each candidate's node.

    ``on_candidate(cand, values, out)`` gets the candidate's inputs (``cand.inputs`` with every
    graph node replaced by the value it produced) and the node's dense output.
    """

    def __init__(self, gm: fx.GraphModule, cands: list, on_candidate: Callable[[Any, dict[str, Any], Any], None]) -> None:
        super().__init__(gm)
        self.on_candidate = on_candidate
        self.anchor = {c.node: c for c in cands}
        self.watch: dict[fx.Node, list] = {}
        self.stash: dict[int, dict[str, Any]] = {id(c): {} for c in cands}
        for c in cands:
            for key, value in c.inputs.items():
                if isinstance(value, fx.Node):
                    self.watch.setdefault(value, []).append((c, key))

    def run_node(self, n: fx.Node) -> Any:
        val = super().run_node(n)
        for c, key in self.watch.get(n, ()):
            self.stash[id(c)][key] = val
        cand = self.anchor.get(n)
        if cand is not None:
            got = self.stash.pop(id(cand))
            self.on_candidate(cand, {k: got[k] if isinstance(v, fx.Node) else v for k, v in cand.inputs.items()}, val)
        return val


def _measure(cand: Any, values: dict[str, Any], out: Any) -> None:
    cand.measured_error = rel_err(kind_module(cand.kind).eager(cand, values), out)


def measure_layers(gm: fx.GraphModule, example_inputs: list[Any], cands: list) -> Any:
    """Run the dense ``gm`` on the example inputs, measuring each of ``cands``; return its outputs."""
    with _fenced(example_inputs):
        return CandidateProbe(gm, cands, _measure).run(*real_inputs(example_inputs))


def measure_outputs(gm: fx.GraphModule, example_inputs: list[Any], dense_outputs: Any) -> float | None:
    """Relative error of the rewritten ``gm``'s outputs against ``dense_outputs``."""
    with _fenced(example_inputs):
        return rel_err(gm(*real_inputs(example_inputs)), dense_outputs)
