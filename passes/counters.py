"""Counters per rule: ``counters["linear"]["matched" | "replaced" | "skipped:<code>"]``.

Every finder, the policy and the rewriter count what they do here; tests call :func:`clear` and
assert exact counts, negative cases included.
"""

from __future__ import annotations

import collections

__all__ = ["counters", "clear", "snapshot"]

counters: collections.defaultdict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def clear() -> None:
    """Reset every counter."""
    counters.clear()


def snapshot() -> dict[str, dict[str, int]]:
    """A plain copy of the counters (kind -> event -> count)."""
    return {kind: dict(c) for kind, c in counters.items()}
