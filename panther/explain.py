"""``panther.explain(model, *example_inputs, **options)``: what the backend would do, without compiling.

Dynamo captures the model's graphs as ``torch.compile(model, backend="panther")`` would, and
each graph goes through the same passes (find, decide, measure, rewrite) with the same
options, but nothing is handed to Inductor: the call runs the rewritten graphs eagerly on the
example inputs. With graph breaks the dense model then runs once more, so that
``report.output_error`` is the model's error end to end (the global RNG is left as it was). The dumps are written as the backend writes them when ``dump_dir`` (or
``$PANTHER_DUMP_DIR``) is set.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

from panther.options import PantherOptions

__all__ = ["explain"]

_calls = 0


def _call(model, args, kwargs):
    return model(*args, **kwargs)


def _check_runs_eagerly(model: Callable, example_inputs: tuple, example_kwargs: dict | None, err: Exception) -> None:
    """After tracing failed with ``err``: if the model itself fails on the example inputs (a
    wrong shape or dtype), raise that as a short ValueError naming the inputs instead of Dynamo's
    long trace of it; otherwise return (the caller re-raises ``err``)."""
    try:
        with torch.no_grad():
            model(*example_inputs, **(example_kwargs or {}))
    except Exception as eager:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise ValueError(
            f"the model fails on the example inputs (positional: {shapes}; keyword: "
            f"{sorted(example_kwargs or {})}) when run without panther: {type(eager).__name__}: {eager}"
        ) from eager


def explain(model: Callable, *example_inputs: Any, example_kwargs: dict[str, Any] | None = None, **options: Any):
    """Report of the rewrites ``torch.compile(model, backend="panther", options=options)`` would make.

    Args:
        model: an ``nn.Module`` or a function.
        *example_inputs: positional inputs to run it on (their sizes are the example sizes).
        example_kwargs: keyword inputs for the model, if any.
        **options: :class:`panther.options.PantherOptions` fields.

    Returns:
        :class:`panther.passes.Report`: one row per candidate layer with its decision and reason,
        chosen rank (or random features) and method, parameters, FLOPs and bytes before and
        after, predicted speedup, the output error measured on the example inputs and, for
        comparison, that of the truncated SVD at the same rank; ``print(report)`` shows the
        summary table. With several graphs (graph breaks) the report holds them all;
        ``report.graphs`` lists the per-graph reports, and ``output_error`` is the whole
        model's, the rewritten graphs chained against the dense model.

    With the default ``tolerance="auto"`` (0.05), each layer gets the smallest rank whose output
    error on the example inputs is at most 5%, within ``rank_fraction`` of its parameters; a
    layer that cannot meet it stays dense with the reason.

    Raises:
        ValueError / TypeError: malformed options; ``model`` not callable; ``example_kwargs``
            not a dict; example inputs the model itself fails on (ValueError, with the model's
            own error, e.g. a shape mismatch).

    Example::

        >>> import panther
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.randn(256, 8) @ torch.randn(8, 256) / 64)  # rank 8
        ...     report = panther.explain(model, torch.randn(64, 256), min_params=0)
        >>> [(c.path, c.decision, c.rank) for c in report.candidates]
        [('0', 'rewrite', 8), ('2', 'dense', None)]
        >>> report.candidates[1].reason_code  # a random 256->4 layer has no good rank-1 approximation
        'tolerance'
        >>> with torch.no_grad():  # without a tolerance: the largest rank within rank_fraction
        ...     report = panther.explain(model, torch.randn(64, 256), min_params=0, tolerance=None)
        >>> [(c.path, c.decision, c.rank) for c in report.candidates]
        [('0', 'rewrite', 64), ('2', 'rewrite', 1)]
    """
    from panther.passes import Report, run_passes
    from panther.passes import dump

    from .backend import _graph_name

    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a function, got {type(model).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs or None, got {type(example_kwargs).__name__}")
    opts = PantherOptions.from_dict(options)
    reports: list[Report] = []

    def backend(gm, inputs):
        ctx = run_passes(gm, inputs, opts, graph_name=_graph_name())
        dump.emit(gm, ctx)
        reports.append(ctx.report)
        return ctx.gm.forward  # the call then runs every rewritten graph: the end-to-end output

    # Dynamo keeps compiled entries on the code object it compiles. Compiling a fresh copy of
    # a tiny caller (which inlines the model) keeps explain's entries off the model's own code,
    # so explain never uses up the recompile limit of the user's later torch.compile calls.
    global _calls
    _calls += 1
    caller = types.FunctionType(_call.__code__.replace(co_name=f"_panther_explain_{_calls}"), _call.__globals__)
    # Code after a graph break resumes in functions Dynamo shares across calls: lift the
    # recompile limits for this call only, so that repeated explains still see every graph.
    limits = {k: 1 << 20 for k in ("recompile_limit", "accumulated_recompile_limit") if hasattr(torch._dynamo.config, k)}
    from torch.utils import _pytree as pytree

    from panther.passes.measure import rel_err, rng_fence

    with torch._dynamo.config.patch(limits), rng_fence(pytree.tree_leaves((example_inputs, example_kwargs or {}))):
        torch.manual_seed(0)
        try:
            rewritten = torch.compile(caller, backend=backend)(model, example_inputs, example_kwargs or {})
        except torch._dynamo.exc.BackendCompilerFailed:
            raise  # panther's passes failed (strict mode): their own error
        except Exception as err:
            _check_runs_eagerly(model, example_inputs, example_kwargs, err)
            raise
        if len(reports) > 1 and opts.measure_error:
            # Each graph's error is measured on its own inputs; with graph breaks the model's is
            # the rewritten graphs chained, against the dense model (same RNG stream for both).
            torch.manual_seed(0)
            dense = model(*example_inputs, **(example_kwargs or {}))
    if len(reports) == 1:
        merged = reports[0]
    else:
        merged = Report(graph="model", options=opts.to_dict())
        for r in reports:
            merged.candidates.extend(r.candidates)
            merged.notes.extend(r.notes)
        merged.output_error = rel_err(rewritten, dense) if opts.measure_error else None
    merged.graphs = reports
    return merged

