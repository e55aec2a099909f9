"""FX graph passes of the panther backend (installed as ``panther.passes``).

:data:`PIPELINE` is the named, ordered list of passes :func:`run_passes` applies to a fresh copy
of a Dynamo graph:

``expand``   spell fused modules (``nn.MultiheadAttention``, the ``nn.TransformerEncoderLayer``
             fast path) as the primitive ops the finders know;
``find``     match linear / conv2d / attention layers (``linear.py``, ``conv.py``,
             ``attention.py``) and name them by module path (``paths.py``);
``screen``   the policy's switches, path patterns, training-graph and size rules (``decide.py``);
``calibrate`` run the example inputs once, recording what each remaining candidate sees
             (``calibrate.py``: input second moments, q/k/v);
``decide``   ranks (calibrated to the tolerance), cost model (``decide.py``, ``cost.py``),
             factors (``factorize.py``);
``measure``  each rewrite's output error on the example inputs (``measure.py``);
``rewrite``  insert the panther ops (``rewrite.py``), lint and recompile once;
``check``    the rewritten graph's end-to-end error on the example inputs.

``dump.py`` writes the debugging dumps; ``counters.py`` counts every rule's outcomes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from panther.options import PantherOptions

from . import counters
from .context import PassContext
from .calibrate import calibrate
from .decide import decide, screen
from .expand import expand_fused
from .graph import copy_graph
from .kinds import KINDS, kind_module
from .measure import measure_layers, measure_outputs
from .report import Candidate, Report
from .rewrite import rewrite

__all__ = ["PIPELINE", "run_passes", "PassContext", "Report", "Candidate", "counters"]

log = logging.getLogger("panther")


def find_candidates(ctx: PassContext) -> None:
    """Run every family's finder; candidates are kept in graph order."""
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    found: list[Candidate] = []
    for kind in KINDS:
        try:
            found.extend(getattr(kind_module(kind), f"find_{kind}")(ctx))
        except Exception as e:  # a finder bug leaves that kind dense, never the model broken
            if ctx.options.strict:
                raise
            ctx.report.notes.append(f"finding {kind} layers failed ({type(e).__name__}: {e}); they stay dense")
            log.warning("panther: finding %s layers failed: %s: %s", kind, type(e).__name__, e)
    ctx.candidates = sorted(found, key=lambda c: order[c.node])
    ctx.report.candidates = ctx.candidates


def _measure(ctx: PassContext) -> None:
    chosen = [c for c in ctx.candidates if c.decision == "rewrite"]
    ctx.dense_outputs = None
    if not ctx.options.measure_error or not chosen:
        return
    if not ctx.inputs.all_real():
        ctx.report.notes.append("example inputs are fake tensors: errors were not measured")
        return
    try:
        ctx.dense_outputs = measure_layers(ctx.gm, ctx.example_inputs, chosen)
    except Exception as e:  # measuring is a report, not a reason to fail the compile
        if ctx.options.strict:
            raise
        ctx.report.notes.append(f"errors were not measured: {type(e).__name__}: {e}")
        log.warning("panther: measuring the rewrites' errors failed: %s: %s", type(e).__name__, e)
        return
    tol = ctx.options.effective_tolerance()
    if tol is None:
        return
    for cand in chosen:
        err = cand.measured_error
        if err is not None and err > tol * (1 + MEASURED_SLACK) + 2 * _eps_of(cand):
            cand.dense("measured", f"output error {err:.3g} measured on the example inputs > tolerance {tol}")
            cand.factors = {}
            counters.counters[cand.kind]["skipped:measured"] += 1
            log.warning("panther: %s (%s) left dense: measured output error %.3g > tolerance %s", cand.label, cand.kind, err, tol)


# A rewrite whose measured output error exceeds the tolerance by more than this fraction (plus
# twice its dtype's rounding unit, which the dense layer carries too) stays dense: calibration
# predicts the error exactly in float64, the measurement runs in the model's dtype.
MEASURED_SLACK = 0.01


def _eps_of(cand: Candidate) -> float:
    from .graph import node_val

    val = node_val(cand.node)
    dtype = val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else torch.float32
    return torch.finfo(dtype).eps


def _check(ctx: PassContext) -> None:
    if getattr(ctx, "dense_outputs", None) is not None and ctx.report.rewritten:
        try:
            ctx.report.output_error = measure_outputs(ctx.gm, ctx.example_inputs, ctx.dense_outputs)
        except Exception as e:
            if ctx.options.strict:
                raise
            ctx.report.notes.append(f"the output error was not measured: {type(e).__name__}: {e}")
    ctx.dense_outputs = None


PIPELINE: list[tuple[str, Callable[[PassContext], None]]] = [
    ("expand", expand_fused),
    ("find", find_candidates),
    ("screen", screen),
    ("calibrate", calibrate),
    ("decide", decide),
    ("measure", _measure),
    ("rewrite", rewrite),
    ("check", _check),
]


def run_passes(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: PantherOptions,
    *,
    graph_name: str = "graph",
    skip: tuple[str, ...] = (),
) -> PassContext:
    """Copy ``gm`` and run :data:`PIPELINE` (minus the passes named in ``skip``) on the copy.

    Returns the :class:`PassContext`: ``ctx.gm`` is the rewritten GraphModule, ``ctx.report``
    the report, ``ctx.candidates`` the candidates with their factors.
    """
    work = copy_graph(gm)
    ctx = PassContext(work, list(example_inputs), options, Report(graph=graph_name, options=options.to_dict()))
    for name, fn in PIPELINE:
        if name not in skip:
            fn(ctx)
    log.info("panther rewrites of %s:\n%s", graph_name, ctx.report.table())
    return ctx
