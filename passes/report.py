"""What the passes found and decided: one :class:`Candidate` per matched layer, one
:class:`Report` per compiled graph (what ``rewrites.json`` holds and :func:`panther.explain`
returns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

__all__ = ["Candidate", "Report", "Dense"]


class Dense(Exception):
    """Raised by a pass to leave a candidate dense: ``code`` is short (counted), ``reason`` says why."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Candidate:
    """A layer a finder matched, and everything decided about it.

    ``node`` is the node whose value the rewrite replaces; ``inputs`` the nodes the replacement
    reads (x / weight / bias, or q / k / v / mask); ``absorbed`` the other nodes of the matched
    pattern (removed with it). ``attrs`` holds the kind's static facts (sizes, stride, heads ...).
    """

    kind: str
    rule: str
    node: fx.Node
    inputs: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    absorbed: list[fx.Node] = field(default_factory=list)
    path: str = ""
    decision: str = "pending"
    reason_code: str = ""
    reason: str = ""
    rank: int | None = None
    params_before: int = 0
    params_after: int = 0
    cost_before: dict[str, sympy.Expr] = field(default_factory=dict)
    cost_after: dict[str, sympy.Expr] = field(default_factory=dict)
    cost_before_at_example: dict[str, int] = field(default_factory=dict)
    cost_after_at_example: dict[str, int] = field(default_factory=dict)
    method: str | None = None
    predicted_error: float | None = None
    measured_error: float | None = None
    svd_error: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict, repr=False)
    weight_index: int | None = None
    weight_version: int | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    replaced_by: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def label(self) -> str:
        return self.path or self.name

    @property
    def predicted_speedup(self) -> float | None:
        """Estimated FLOPs before / after at the example sizes (rewritten candidates), else None."""
        fb, fa = self.cost_before_at_example.get("flops"), self.cost_after_at_example.get("flops")
        if self.decision != "rewrite" or not fb or not fa:
            return None
        return fb / fa

    def dense(self, code: str, reason: str) -> None:
        self.decision, self.reason_code, self.reason = "dense", code, reason

    def shapes(self) -> dict[str, list[str]]:
        from .graph import node_val

        out = {}
        for key, value in list(self.inputs.items()) + [("out", self.node)]:
            val = node_val(value)
            if isinstance(val, torch.Tensor):
                out[key] = [str(s) for s in val.shape]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "path": self.path,
            "kind": self.kind,
            "rule": self.rule,
            "shapes": self.shapes(),
            "attrs": {k: _plain(v) for k, v in self.attrs.items()},
            "decision": self.decision,
            "reason_code": self.reason_code,
            "reason": self.reason,
            "rank": self.rank,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": str(self.cost_before.get("flops", "")),
            "flops_after": str(self.cost_after.get("flops", "")),
            "bytes_before": str(self.cost_before.get("bytes", "")),
            "bytes_after": str(self.cost_after.get("bytes", "")),
            "flops_before_at_example": self.cost_before_at_example.get("flops"),
            "flops_after_at_example": self.cost_after_at_example.get("flops"),
            "bytes_before_at_example": self.cost_before_at_example.get("bytes"),
            "bytes_after_at_example": self.cost_after_at_example.get("bytes"),
            "method": self.method,
            "predicted_error": self.predicted_error,
            "measured_error": self.measured_error,
            "svd_error": self.svd_error,
            "predicted_speedup": self.predicted_speedup,
            "calibration": {k: _plain(v) for k, v in self.calibration.items()},
            "replaced_by": list(self.replaced_by),
        }


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


@dataclass
class Report:
    """The passes' account of one graph: candidates, decisions, notes and end-to-end error.

    ``output_error`` is the relative error of the rewritten graph's outputs against the dense
    graph's on the example inputs (largest over outputs); it is the error the rewrite predicts
    for inputs like those. ``str(report)`` is the one-screen summary table.
    """

    graph: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_error: float | None = None
    dump_dir: str | None = None
    graphs: list[Report] = field(default_factory=list, repr=False)

    @property
    def rewritten(self) -> list[Candidate]:
        return [c for c in self.candidates if c.decision == "rewrite"]

    @property
    def params_before(self) -> int:
        return sum(c.params_before for c in self.candidates)

    @property
    def params_after(self) -> int:
        return sum(c.params_after if c.decision == "rewrite" else c.params_before for c in self.candidates)

    @property
    def predicted_error(self) -> float | None:
        """The end-to-end error measured on the example inputs, else a combination of the
        per-layer predictions (root of the sum of squares), else None."""
        if self.output_error is not None:
            return self.output_error
        errs = [c.predicted_error for c in self.rewritten if c.predicted_error is not None]
        return float(sum(e * e for e in errs) ** 0.5) if errs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "options": self.options,
            "notes": list(self.notes),
            "output_error": self.output_error,
            "predicted_error": self.predicted_error,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def table(self) -> str:
        """A one-screen summary: one row per candidate, then totals."""
        rows = [("layer", "kind", "decision", "rank/m", "method", "params", "flops@ex", "speedup", "err meas/svd", "reason")]
        for c in self.candidates:
            rw = c.decision == "rewrite"
            fb, fa = c.cost_before_at_example.get("flops"), c.cost_after_at_example.get("flops")
            flops = f"{_si(fb)}->{_si(fa)}" if rw and fb is not None else _si(fb)
            params = f"{_si(c.params_before)}->{_si(c.params_after)}" if rw else _si(c.params_before)
            err = f"{_f(c.measured_error)}/{_f(c.svd_error)}" if rw else ""
            speedup = f"x{c.predicted_speedup:.2f}" if c.predicted_speedup else ""
            rows.append((_cut(c.label, 40), c.kind, c.decision, "" if c.rank is None or not rw else str(c.rank),
                         (c.method or "") if rw else "", params, flops, speedup, err, _cut(c.reason, 70)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_rw = len(self.rewritten)
        lines.append(
            f"{self.graph}: {n_rw}/{len(self.candidates)} rewritten, params {_si(self.params_before)} -> "
            f"{_si(self.params_after)}, output error on example inputs {_f(self.output_error)}"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _si(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
