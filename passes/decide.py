"""Policy: decide, per candidate, whether to rewrite it and with which rank / features.

In order, a candidate stays dense when:

1. its kind is switched off (``options.linear`` / ``conv`` / ``attention``);
2. its module path matches an ``exclude`` pattern, or ``include`` is given and it matches none;
3. the graph was captured with grad enabled and its weight requires grad (a training graph:
   fixed factors would stop that weight from learning), unless ``rewrite_trainable``;
4. its weight has fewer than ``min_params`` parameters;
5. no rank fits: ``2·num_terms·low_rank`` if ``low_rank`` is set, else the largest rank within
   ``rank_fraction`` of the parameters, lowered to the smallest rank that meets ``max_error``
   if that is set (a layer that cannot meet it within the budget stays dense);
6. with ``require_savings`` (default), the rewrite does not cut both the parameters and the
   FLOPs estimated by :mod:`.cost` at the example sizes.

Otherwise its factors (or random features) are computed and it is marked ``rewrite``.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings

from .counters import counters
from .cost import at_example
from .factorize import rank_for_error, singular_values
from .kinds import kind_module
from .report import Candidate, Dense

__all__ = ["decide", "TrainingGraphWarning"]

log = logging.getLogger("panther")


class TrainingGraphWarning(UserWarning):
    """Layers of a graph compiled with grad enabled were left dense (their weights require grad)."""


def decide(ctx) -> None:
    """Set ``decision`` / ``reason`` / ``rank`` / costs / factors on every candidate of ``ctx``."""
    trainable = []
    for cand in ctx.candidates:
        if cand.decision == "pending":
            try:
                _decide_one(ctx, cand)
            except Dense as d:
                cand.dense(d.code, d.reason)
            except Exception as e:  # never break the model: the layer stays dense
                if ctx.options.strict:
                    raise
                cand.dense("error", f"{type(e).__name__}: {e}")
                log.warning("panther: %s (%s) left dense: %s: %s", cand.label, cand.kind, type(e).__name__, e)
        if cand.decision == "dense":
            counters[cand.kind][f"skipped:{cand.reason_code}"] += 1
            if cand.reason_code == "trainable":
                trainable.append(cand.label)
    if trainable:
        msg = (
            f"panther: {len(trainable)} layer(s) left dense because this graph was compiled with grad "
            f"enabled and their weights require grad ({', '.join(trainable[:4])}{', ...' if len(trainable) > 4 else ''}); "
            "sketching them here would stop them from learning. For inference, compile and run under "
            "torch.no_grad() (or call requires_grad_(False)); to train sketched layers, use the explicit "
            "layers pr.nn.SKLinear / pr.nn.SKConv2d / pr.nn.RandMultiHeadAttention; to rewrite anyway, "
            "pass options={'rewrite_trainable': True}."
        )
        ctx.report.notes.append(msg)
        warnings.warn(msg, TrainingGraphWarning, stacklevel=2)


def _decide_one(ctx, cand: Candidate) -> None:
    opts = ctx.options
    kind = kind_module(cand.kind)
    if not getattr(opts, cand.kind):
        raise Dense("disabled", f"options {cand.kind}=False")
    path = cand.label
    for pat in opts.exclude:
        if fnmatch.fnmatchcase(path, pat):
            raise Dense("excluded", f"path matches exclude pattern {pat!r}")
    if opts.include and not any(fnmatch.fnmatchcase(path, p) for p in opts.include):
        raise Dense("not_included", f"path matches no include pattern {list(opts.include)}")
    if cand.weight_index is not None:
        weight = ctx.inputs.example_inputs[cand.weight_index]
        if ctx.grad_enabled and weight.requires_grad and not opts.rewrite_trainable:
            raise Dense("trainable", "compiled with grad enabled and the weight requires grad (training graph)")
        if cand.params_before < opts.min_params:
            raise Dense("small", f"weight has {cand.params_before} parameters < min_params={opts.min_params}")
    if hasattr(kind, "plan"):
        kind.plan(ctx, cand)
    else:
        cand.rank = plan_rank(ctx, cand, kind)
    cand.cost_before = kind.cost(ctx, cand, None)
    cand.cost_after = kind.cost(ctx, cand, cand.rank)
    cand.cost_before_at_example = {k: at_example(v, ctx.shape_env) for k, v in cand.cost_before.items()}
    cand.cost_after_at_example = {k: at_example(v, ctx.shape_env) for k, v in cand.cost_after.items()}
    cand.params_after = kind.params_after(cand, cand.rank)
    if opts.require_savings:
        fb, fa = cand.cost_before_at_example["flops"], cand.cost_after_at_example["flops"]
        if cand.params_after > cand.params_before:
            raise Dense("no_savings", f"parameters would grow {cand.params_before} -> {cand.params_after}")
        if fb is not None and fa is not None and fa >= fb:
            raise Dense("no_savings", f"estimated FLOPs would not drop ({fb} -> {fa} at the example sizes)")
    kind.factorize(ctx, cand)
    if opts.max_error is not None and cand.predicted_error is not None and cand.predicted_error > opts.max_error:
        raise Dense("max_error", f"relative weight error {cand.predicted_error:.3g} > max_error={opts.max_error}")
    cand.decision = "rewrite"
    cand.reason_code = "ok"
    cand.reason = _why(cand)
    if cand.weight_index is not None:
        cand.weight_version = ctx.inputs.example_inputs[cand.weight_index]._version


def plan_rank(ctx, cand: Candidate, kind) -> int:
    """The rank for a linear / conv candidate (rules 5 of the module docstring)."""
    opts = ctx.options
    n_in, n_out = kind.shape_dims(cand)
    rank = opts.rank_for(n_in, n_out)
    if opts.max_error is not None and opts.low_rank is None and opts.method == "svd":
        needed = rank_for_error(singular_values(kind.dense_weight(ctx, cand)), opts.max_error)
        if needed > max(rank, 0):
            raise Dense("max_error", f"rank {needed} is needed for max_error={opts.max_error}, the budget allows {rank}")
        rank = needed
    if rank < 1:
        raise Dense("rank", f"rank_fraction={opts.rank_fraction} allows rank 0 for a {n_in}x{n_out} weight")
    if opts.method == "svd":
        rank = min(rank, n_in, n_out)
    return rank


def _why(cand: Candidate) -> str:
    fb, fa = cand.cost_before_at_example.get("flops"), cand.cost_after_at_example.get("flops")
    flops = f", FLOPs x{fa / fb:.2f}" if fb and fa is not None else ""
    params = f"params x{cand.params_after / cand.params_before:.2f}" if cand.params_before else "params unchanged"
    return f"{params}{flops}"
