"""Module paths (``encoder.layer.3.attention.self.query``) from Dynamo's source names.

Dynamo names every graph input by the Python expression it came from, e.g.
``L['self']._modules['encoder']._modules['layer']._modules['3']._parameters['weight']`` (or, on
other torch versions, ``L['self'].encoder.layer[3].weight``). Calls carry ``nn_module_stack``
entries in the same notation. :func:`source_to_path` turns either into the dotted path that
``model.named_modules()`` / ``named_parameters()`` use; the compiled module itself (an ``L[...]``
root) is dropped, a global (``G['model']``) keeps its name.
"""

from __future__ import annotations

import re

import torch.fx as fx

__all__ = ["source_to_path", "source_name", "placeholder_path", "node_module_path", "strip_param"]

_TOKEN = re.compile(r"""\.(\w+)|\[\s*(?:'([^']*)'|"([^"]*)"|(-?\d+))\s*\]""")
_ROOT = re.compile(r"""^\s*([LG])\[\s*(?:'([^']*)'|"([^"]*)")\s*\]""")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def source_to_path(name: str) -> str:
    """``L['self']._modules['enc']._parameters['weight']`` -> ``enc.weight``; ``G['m'].fc`` -> ``m.fc``.

    Example:
        >>> source_to_path("L['self']._modules['encoder']._modules['layer']._modules['3']._parameters['weight']")
        'encoder.layer.3.weight'
        >>> source_to_path("L['self'].encoder.layer[3].attention.self.query")
        'encoder.layer.3.attention.self.query'
        >>> source_to_path("G['model'].fc")
        'model.fc'
    """
    root = _ROOT.match(name)
    parts: list[str] = []
    rest = name
    if root:
        if root.group(1) == "G":
            parts.append(root.group(2) or root.group(3))
        rest = name[root.end():]
    for m in _TOKEN.finditer(rest):
        token = next(g for g in m.groups() if g is not None)
        if token not in _CONTAINERS:
            parts.append(token)
    return ".".join(parts)


def source_name(node: fx.Node) -> str | None:
    """Dynamo's source expression of a graph input (``L['self']...``), or None."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    name = source.name  # a property on recent torch, a method on older ones
    return name() if callable(name) else name


def placeholder_path(node: fx.Node) -> str | None:
    """Dotted path of a graph input from its Dynamo source, or None when it has none."""
    name = source_name(node)
    return None if name is None else source_to_path(name)


def strip_param(path: str) -> str:
    """``encoder.query.weight`` -> ``encoder.query`` (the module that owns a parameter)."""
    return path.rsplit(".", 1)[0] if "." in path else path


def node_module_path(node: fx.Node) -> str:
    """Path of the innermost module a call was made from (``nn_module_stack``), or ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    qualname = list(stack.values())[-1][0]
    return source_to_path(qualname) if isinstance(qualname, str) else ""
