"""Apply the chosen rewrites to the working graph.

Each candidate marked ``rewrite`` gets its kind's replacement inserted before it; its users are
moved to the replacement, and the matched nodes (and whatever only they used) are removed. A
failure on one candidate undoes that candidate's partial edit and leaves it dense with the
reason (``strict`` raises instead); the others go on.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from .counters import counters
from .kinds import kind_module

__all__ = ["rewrite"]

log = logging.getLogger("panther")


def rewrite(ctx) -> None:
    """Rewrite every candidate of ``ctx`` whose decision is ``rewrite``; lint and recompile once."""
    for cand in ctx.candidates:
        if cand.decision != "rewrite":
            continue
        before = set(ctx.graph.nodes)
        buffers = set(dict(ctx.gm.named_buffers()))
        try:
            new = kind_module(cand.kind).emit(ctx, cand)
        except Exception as e:
            if ctx.options.strict:
                raise
            _undo(ctx, before, buffers)
            cand.dense("error", f"rewrite failed: {type(e).__name__}: {e}")
            cand.factors = {}
            counters[cand.kind]["skipped:error"] += 1
            log.warning("panther: rewrite of %s (%s) failed, left dense: %s: %s", cand.label, cand.kind, type(e).__name__, e)
            continue
        cand.node.replace_all_uses_with(new)
        for other in ctx.candidates:  # later candidates may read the replaced value
            other.inputs = {k: new if v is cand.node else v for k, v in other.inputs.items()}
        _erase_unused([cand.node, *reversed(cand.absorbed)])
        cand.replaced_by = [n.name for n in ctx.graph.nodes if n not in before]
        counters[cand.kind]["replaced"] += 1
    ctx.graph.lint()
    ctx.gm.recompile()


def _pure(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_method":
        return not node.target.endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return not name.endswith("_") and not node.is_impure()
    return False


def _erase_unused(nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` that have no users, then the inputs that only they used (pure ones)."""
    work = list(nodes)
    seen = set()
    while work:
        node = work.pop(0)
        if node in seen or node.graph is None or node.users or not _pure(node):
            continue
        seen.add(node)
        inputs = list(node.all_input_nodes)
        node.graph.erase_node(node)
        work.extend(inputs)


def _undo(ctx, before: set, buffers: set) -> None:
    """Remove what a failed ``emit`` added (nothing old uses it yet)."""
    for node in reversed([n for n in ctx.graph.nodes if n not in before]):
        ctx.graph.erase_node(node)
    for name in set(dict(ctx.gm.named_buffers())) - buffers:
        delattr(ctx.gm, name)
