"""Graph plumbing shared by the passes: the working copy, node values, graph inputs.

The Dynamo GraphModule is never edited: its graph is Dynamo's own bookkeeping. The passes work
on :func:`copy_graph`'s fresh ``torch.fx.GraphModule``; computed factors become buffers of that
copy (``get_attr`` nodes), which AOT autograd lifts into graph inputs (or, with freezing, into
constants).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .paths import placeholder_path, source_name

__all__ = [
    "copy_graph",
    "node_val",
    "set_val",
    "fake_mode_of",
    "GraphInputs",
    "is_target",
    "check_no_autocast",
]


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh GraphModule with a copy of ``gm``'s graph (node meta kept, attributes shared)."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    return fx.GraphModule(gm, graph, class_name="PantherGraphModule")


def node_val(node: Any) -> Any:
    """The fake value Dynamo (``example_value``) or a pass (``val``) recorded for ``node``."""
    if not isinstance(node, fx.Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def fake_mode_of(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
    """The FakeTensorMode of the graph's recorded values (else of the active tracing context).

    New nodes' values must come from the same mode as Dynamo's recorded ones, which is not
    always the tracing context's (the backend may be handed a copy of it).
    """
    from torch._guards import detect_fake_mode

    for node in gm.graph.nodes:
        val = node_val(node)
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return detect_fake_mode(example_inputs)


def set_val(node: fx.Node, fake_mode: Any) -> Any:
    """Compute and record ``node.meta['val']`` by running its target on its inputs' fake values."""
    args = fx.node.map_arg(node.args, node_val)
    kwargs = fx.node.map_arg(node.kwargs, node_val)
    with fake_mode:
        if node.op == "call_function":
            val = node.target(*args, **kwargs)
        elif node.op == "call_method":
            val = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot compute a value for {node.op} node {node.name}")
    node.meta["val"] = val
    return val


def check_no_autocast(x_val: Any, out_val: Any) -> None:
    """Raise Dense when a layer computes in another dtype than its input's (autocast regions):
    the panther replacement would compute in the input's dtype and change what follows."""
    from .report import Dense

    if isinstance(x_val, torch.Tensor) and isinstance(out_val, torch.Tensor) and out_val.dtype != x_val.dtype:
        raise Dense("autocast", f"the layer computes in {out_val.dtype} on {x_val.dtype} inputs (autocast)")


def is_target(node: Any, *targets: Any) -> bool:
    """``node`` is a call_function of one of ``targets`` or a call_method named in ``targets``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is t for t in targets if not isinstance(t, str))
    if node.op == "call_method":
        return node.target in [t for t in targets if isinstance(t, str)]
    return False


class GraphInputs:
    """The real tensors behind a graph's placeholders (Dynamo passes the real parameters).

    ``tensor(node)`` gives the real tensor of a placeholder, ``index(node)`` its position among
    the graph inputs, ``path(node)`` its module path, ``is_weight(node)`` whether it is a
    parameter or buffer (so safe to factorize at compile time).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any]):
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._index = {n.name: i for i, n in enumerate(self.placeholders)}
        self.example_inputs = list(example_inputs)

    def index(self, node: fx.Node) -> int | None:
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        return self._index.get(node.name)

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        i = self.index(node)
        if i is None or i >= len(self.example_inputs):
            return None
        t = self.example_inputs[i]
        return t if isinstance(t, torch.Tensor) else None

    def path(self, node: fx.Node) -> str | None:
        return placeholder_path(node) if isinstance(node, fx.Node) and node.op == "placeholder" else None

    def is_weight(self, node: fx.Node) -> bool:
        t = self.tensor(node)
        if t is None or _is_fake(t):
            return False
        if isinstance(t, nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None:
            return True
        name = source_name(node) or ""
        return "_buffers" in name or "_parameters" in name

    def all_real(self) -> bool:
        """True when every tensor input is a real tensor (not a FakeTensor)."""
        return not any(isinstance(t, torch.Tensor) and _is_fake(t) for t in self.example_inputs)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
