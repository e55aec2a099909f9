"""Debugging dumps: what each compiled graph looked like before and after, and why.

With ``options["dump_dir"]`` or ``$PANTHER_DUMP_DIR`` set, each graph gets a folder
``<dump_dir>/<graph>/`` with:

* ``before.py`` / ``after.py``: the graph as readable code (``print_readable``);
* ``before.dot`` / ``after.dot`` (GraphViz) and ``before.graphml`` / ``after.graphml``: the graphs
  exported through networkx, rewritten nodes marked (``rewritten=True``, filled red in .dot);
* ``rewrites.json``: the report (per candidate: path, kind, shapes, decision and reason,
  parameters, FLOPs and bytes before and after, symbolic and at the example sizes, predicted
  and measured error);
* ``summary.txt``: the summary table also logged to the ``panther`` logger.

The same code, graphs and report are emitted as ``TORCH_TRACE`` artifacts for tlparse
(``torch._logging.trace_structured``), whether or not a dump folder is set.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch._logging import trace_structured

from .graph import node_val

log = logging.getLogger("panther")

__all__ = ["emit", "to_networkx", "to_dot", "write_dump"]


def to_networkx(gm: fx.GraphModule, marked: set[str] = frozenset(), kinds: dict[str, str] | None = None) -> nx.DiGraph:
    """The graph as a networkx DiGraph: one vertex per node (op, target, shape, dtype, rewritten)."""
    kinds = kinds or {}
    g = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        val = node_val(node)
        g.add_node(
            node.name,
            op=node.op,
            target=_target(node),
            shape=str(list(val.shape)) if isinstance(val, torch.Tensor) else "",
            dtype=str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else "",
            rewritten=node.name in marked,
            kind=kinds.get(node.name, ""),
        )
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    module = getattr(t, "__module__", None)
    return f"{module}.{name}" if module and not str(name).startswith(module) else str(name)


def to_dot(g: nx.DiGraph) -> str:
    """GraphViz text for a graph from :func:`to_networkx` (no pydot / pygraphviz needed)."""

    def q(s: Any) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(g.graph.get('name', 'graph'))} {{", "  node [shape=box, fontname=monospace];"]
    for name, attrs in g.nodes(data=True):
        label = f"{name}\\n{attrs['target']}" + (f"\\n{attrs['shape']}" if attrs["shape"] else "")
        label = label.replace('"', "'")
        style = ', style=filled, fillcolor="#f4a3a3"' if attrs["rewritten"] else ""
        lines.append(f'  {q(name)} [label="{label}"{style}];')
    for a, b in g.edges():
        lines.append(f"  {q(a)} -> {q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _marks(ctx) -> tuple[set[str], set[str], dict[str, str], dict[str, str]]:
    before, after, kinds_before, kinds_after = set(), set(), {}, {}
    for c in ctx.candidates:
        if c.decision != "rewrite":
            continue
        for n in [c.node, *c.absorbed]:
            before.add(n.name)
            kinds_before[n.name] = c.kind
        for name in c.replaced_by:
            after.add(name)
            kinds_after[name] = c.kind
    return before, after, kinds_before, kinds_after


def write_dump(folder: str, dynamo_gm: fx.GraphModule, ctx) -> str:
    """Write the dump files of one graph into ``folder`` (created); return it."""
    os.makedirs(folder, exist_ok=True)
    mb, ma, kb, ka = _marks(ctx)
    files = {
        "before.py": dynamo_gm.print_readable(print_output=False),
        "after.py": ctx.gm.print_readable(print_output=False),
        "summary.txt": ctx.report.table() + "\n",
        "rewrites.json": json.dumps(ctx.report.to_dict(), indent=2, default=str),
    }
    for tag, gm, marked, kinds in (("before", dynamo_gm, mb, kb), ("after", ctx.gm, ma, ka)):
        g = to_networkx(gm, marked, kinds)
        files[f"{tag}.dot"] = to_dot(g)
        nx.write_graphml(g, os.path.join(folder, f"{tag}.graphml"))
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder


def _unique(root: str, name: str) -> str:
    path = os.path.join(root, name)
    i = 1
    while os.path.exists(path):
        path = os.path.join(root, f"{name}.{i}")
        i += 1
    return path


def emit(dynamo_gm: fx.GraphModule, ctx) -> str | None:
    """Emit the TORCH_TRACE artifacts, and the dump folder when a dump dir is set; return the folder."""
    report = ctx.report
    for name, payload in (
        ("panther_graph_before", lambda: dynamo_gm.print_readable(print_output=False)),
        ("panther_graph_after", lambda: ctx.gm.print_readable(print_output=False)),
        ("panther_summary", lambda: report.table()),
    ):
        trace_structured("artifact", metadata_fn=lambda name=name: {"name": name, "encoding": "string"}, payload_fn=payload)
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "panther_rewrites", "encoding": "json"},
        payload_fn=lambda: json.dumps(report.to_dict(), default=str),
    )
    root = ctx.options.resolved_dump_dir()
    if not root:
        return None
    try:
        folder = write_dump(_unique(root, report.graph), dynamo_gm, ctx)
    except OSError as e:  # a debugging aid is never a reason to fail the compile
        if ctx.options.strict:
            raise
        report.notes.append(f"the dump could not be written to {root!r}: {type(e).__name__}: {e}")
        log.warning("panther: the dump could not be written to %r: %s: %s", root, type(e).__name__, e)
        return None
    report.dump_dir = folder
    return folder
