"""The rewrite families by kind name: each module finds its layers and knows its replacement."""

from __future__ import annotations

from types import ModuleType

__all__ = ["KINDS", "kind_module"]

KINDS = ("linear", "conv", "attention")


def kind_module(kind: str) -> ModuleType:
    """The module of a rewrite family: ``find_<kind>``, ``cost``, ``factorize``, ``emit``, ``eager``."""
    import importlib

    if kind not in KINDS:
        raise KeyError(f"unknown rewrite kind {kind!r}; known: {list(KINDS)}")
    return importlib.import_module(f"{__package__}.{kind}")
