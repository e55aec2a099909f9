"""Policy: decide, per candidate, whether to rewrite it and with which rank / features.

In order, a candidate stays dense when (rules 1–4 are :func:`screen`, run before calibration,
so only the survivors are recorded):

1. its kind is switched off (``options.linear`` / ``conv`` / ``attention``);
2. its module path matches an ``exclude`` pattern, or ``include`` is given and it matches none;
3. the graph was captured with grad enabled and its weight requires grad (a training graph:
   fixed factors would stop that weight from learning), unless ``rewrite_trainable``;
4. its weight has fewer than ``min_params`` parameters;
5. no rank fits. Linear / conv: with a tolerance (:meth:`PantherOptions.effective_tolerance`)
   and recorded activations, the smallest rank whose output error on the example inputs is
   within it, searched up to the largest *worthwhile* rank (``rank_fraction`` of the
   parameters, and below the cost model's break-even with ``require_savings``); a layer that
   cannot meet it stays dense (``tolerance``). Without a tolerance: ``2·num_terms·low_rank`` if
   ``low_rank`` is set, else the ``rank_fraction`` budget rank, lowered to the smallest rank
   that meets ``max_error`` if that is set. A linear / conv whose example inputs have 0 rows
   stays dense under a tolerance (``no_rows``: every rank fits an empty batch). Attention: ``num_random_features``, doubled (up to
   :data:`.calibrate.FEATURE_DOUBLINGS` times, while the cost model predicts a win) until the
   measured error meets the tolerance;
6. with ``require_savings`` (default), the rewrite does not cut both the parameters and the
   FLOPs estimated by :mod:`.cost` at the example sizes;
7. (the ``measure`` pass, after this one) under a tolerance, the rewrite's output error measured
   on the example inputs exceeds it (``measured``), whatever the calibration predicted.

Otherwise its factors (or random features) are computed and it is marked ``rewrite``. The
factorization method is ``options.resolved_method``: data-aware where activations were
recorded (``method="auto"``), else the truncated SVD.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings

import torch

from .counters import counters
from .calibrate import choose_rank, data_aware_damping, gram_root, prefix_errors, svd_errors
from .cost import at_example
from .factorize import cached_factors, rank_for_error, singular_values, weight_error
from .kinds import kind_module
from .report import Candidate, Dense

__all__ = ["screen", "decide", "plan_rank", "worthwhile_rank", "TrainingGraphWarning"]

log = logging.getLogger("panther")


class TrainingGraphWarning(UserWarning):
    """Layers of a graph compiled with grad enabled were left dense (their weights require grad)."""


def screen(ctx) -> None:
    """The ``screen`` pass: rules 1–4 (switches, paths, training graphs, size) on every candidate."""
    for cand in ctx.candidates:
        if cand.decision != "pending":
            continue
        try:
            _screen_one(ctx, cand)
        except Dense as d:
            cand.dense(d.code, d.reason)


def decide(ctx) -> None:
    """Set ``decision`` / ``reason`` / ``rank`` / costs / factors on every candidate of ``ctx``."""
    trainable = []
    for cand in ctx.candidates:
        if cand.decision == "pending":
            try:
                _screen_one(ctx, cand)
                _decide_one(ctx, cand)
            except Dense as d:
                cand.dense(d.code, d.reason)
            except Exception as e:  # never break the model: the layer stays dense
                if ctx.options.strict:
                    raise
                cand.dense("error", f"{type(e).__name__}: {e}")
                log.warning("panther: %s (%s) left dense: %s: %s", cand.label, cand.kind, type(e).__name__, e)
        _keep_needed_stats(cand)
        if cand.decision == "dense":
            counters[cand.kind][f"skipped:{cand.reason_code}"] += 1
            if cand.reason_code == "trainable":
                trainable.append(cand.label)
    if trainable:
        msg = (
            f"panther: {len(trainable)} layer(s) left dense because this graph was compiled with grad "
            f"enabled and their weights require grad ({', '.join(trainable[:4])}{', ...' if len(trainable) > 4 else ''}); "
            "sketching them here would stop them from learning. For inference, compile and run under "
            "torch.no_grad() (or call requires_grad_(False)); to train low-rank layers, convert the "
            "model with panther.convert (or use the explicit layers pr.nn.SKLinear / pr.nn.SKConv2d / "
            "pr.nn.RandMultiHeadAttention); to rewrite anyway, pass options={'rewrite_trainable': True}."
        )
        ctx.report.notes.append(msg)
        warnings.warn(msg, TrainingGraphWarning, stacklevel=2)


def _keep_needed_stats(cand: Candidate) -> None:
    """Free what calibration recorded, keeping of rewritten layers what a weight that changes
    after compilation needs: the data-aware metric (to refactorize in it) and, for ranks
    calibrated to a tolerance, the metric and the mean row (to check the new factors against it,
    :func:`.calibrate.metric_error`)."""
    stats, keep = cand.stats, {}
    if cand.decision == "rewrite" and "gram" in stats:
        data_aware = cand.method == "data-aware" and "root" in stats
        calibrated = "tolerance" in cand.calibration
        if data_aware or calibrated:
            keep["root"] = stats["root"] if "root" in stats else gram_root(stats)
        if data_aware:
            keep["damping"] = stats["damping"]
        if calibrated:
            keep["mean"] = stats["sum"] / stats["rows"]
    # Kept in host memory: an in×in float64 matrix per layer (~1 GB at in = 11008) would crowd the
    # GPU for the life of the compiled model, and it is read only when a weight changes.
    cand.stats = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in keep.items()}


def _screen_one(ctx, cand: Candidate) -> None:
    opts = ctx.options
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


def _decide_one(ctx, cand: Candidate) -> None:
    opts = ctx.options
    kind = kind_module(cand.kind)
    calibrated = False
    if hasattr(kind, "plan"):
        kind.plan(ctx, cand)
    else:
        calibrated = plan_rank(ctx, cand, kind)
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
    if not calibrated:
        kind.factorize(ctx, cand)
        if cand.weight_index is not None and "gram" in cand.stats:
            cand.svd_error = _svd_error_at(ctx, cand, kind)
    if opts.max_error is not None and cand.predicted_error is not None and cand.predicted_error > opts.max_error:
        raise Dense("max_error", f"relative weight error {cand.predicted_error:.3g} > max_error={opts.max_error}")
    cand.decision = "rewrite"
    cand.reason_code = "ok"
    cand.reason = _why(cand)
    if cand.weight_index is not None:
        cand.weight_version = ctx.inputs.example_inputs[cand.weight_index]._version


def worthwhile_rank(ctx, cand: Candidate, kind) -> int:
    """The largest rank worth rewriting to: the ``rank_fraction`` budget and, with
    ``require_savings``, below the cost model's break-even in parameters and FLOPs."""
    opts = ctx.options
    n_in, n_out = kind.shape_dims(cand)
    rank = opts.budget_rank(n_in, n_out)
    if opts.require_savings:
        per_rank = kind.params_after(cand, 1)
        if per_rank:
            rank = min(rank, (cand.params_before - 1) // per_rank if cand.params_before else rank)
        fb = at_example(kind.cost(ctx, cand, None)["flops"], ctx.shape_env)
        f1 = at_example(kind.cost(ctx, cand, 1)["flops"], ctx.shape_env)
        if fb is not None and f1:  # FLOPs grow linearly in the rank
            rank = min(rank, -(-fb // f1) - 1)
    return rank


def plan_rank(ctx, cand: Candidate, kind) -> bool:
    """Set the rank and method of a linear / conv candidate (rule 5 of the module docstring).

    Returns True when the rank was calibrated (its factors are then already in ``cand``).
    """
    opts = ctx.options
    n_in, n_out = kind.shape_dims(cand)
    if cand.stats.get("rows") == 0:
        # An empty batch: every rank has error 0 on it, so nothing can be calibrated or checked
        # (the compile for the next, non-empty batch calibrates on it).
        if opts.effective_tolerance() is not None:
            raise Dense("no_rows", "the example inputs gave this layer 0 rows: no error can be measured on them")
        cand.stats = {}
    has_acts = "gram" in cand.stats
    cand.method = opts.resolved_method(has_acts)
    if cand.method == "data-aware":
        cand.stats["root"] = gram_root(cand.stats)
        cand.stats["damping"] = data_aware_damping(cand.stats)
    tol = opts.effective_tolerance()
    if tol is not None and has_acts:
        _calibrate_rank(ctx, cand, kind, tol)
        return True
    if tol is not None and opts.tolerance != "auto":
        raise Dense("uncalibrated", f"tolerance={tol} needs activations recorded on real example inputs, and none were")
    rank = opts.rank_for(n_in, n_out)
    if opts.max_error is not None and opts.low_rank is None and cand.method != "sketch":
        needed = rank_for_error(singular_values(kind.dense_weight(ctx, cand)), opts.max_error)
        if needed > max(rank, 0):
            raise Dense("max_error", f"rank {needed} is needed for max_error={opts.max_error}, the budget allows {rank}")
        rank = needed
    if rank < 1:
        raise Dense("rank", f"rank_fraction={opts.rank_fraction} allows rank 0 for a {n_in}x{n_out} weight")
    if cand.method != "sketch":
        rank = min(rank, n_in, n_out)
    cand.rank = rank
    return False


def _calibrate_rank(ctx, cand: Candidate, kind, tol: float) -> None:
    opts = ctx.options
    n_in, n_out = kind.shape_dims(cand)
    R = worthwhile_rank(ctx, cand, kind)
    if cand.method != "sketch":
        R = min(R, n_in, n_out)
    if R < (2 if cand.method == "sketch" else 1):
        raise Dense("rank", f"no rank is worthwhile for a {n_in}x{n_out} weight (rank_fraction={opts.rank_fraction})")
    W = kind.dense_weight(ctx, cand)
    owner = ctx.inputs.example_inputs[cand.weight_index]
    seed = ctx.seed_for(cand)
    # Per call site (a shared weight sees other activations at each), and checked against this
    # compile's activations when reused: a recompile on other inputs keeps the cached rank only
    # while it still meets the tolerance on them.
    key = ("calibrated", cand.kind, repr(cand.attrs.get("row_slice")), cand.attrs.get("layout"), cand.method, tol, R, seed, cand.name)

    def still_fits(choice) -> bool:  # (a cached "no rank fits" is tried again: these inputs may allow one)
        return choice.rank is not None and float(prefix_errors(cand.stats, W, choice.A, choice.B)[-1]) <= tol

    choice = cached_factors(owner, key, lambda: choose_rank(W, cand.stats, cand.method, tol, R, seed, cand.stats.get("root")), still_fits)
    cand.calibration = {"tolerance": tol, "max_rank": choice.max_rank, "errors": [round(e, 6) for e in choice.errors]}
    if choice.tried:
        cand.calibration["tried"] = {r: round(e, 6) for r, e in sorted(choice.tried.items())}
    if choice.rank is None:
        raise Dense(
            "tolerance",
            f"output error {choice.best_error:.3g} at the largest worthwhile rank {choice.max_rank} > tolerance {tol}",
        )
    cand.rank = choice.rank
    cand.factors = kind.factors_from(cand, choice.A, choice.B)
    cand.predicted_error = weight_error(W, choice.A, choice.B)
    svd = choice.svd_errors
    cand.svd_error = svd[choice.rank - 1] if choice.rank <= len(svd) else 0.0


def _svd_error_at(ctx, cand: Candidate, kind) -> float:
    """Output error of the truncated SVD at ``cand.rank`` on the recorded activations."""
    W = kind.dense_weight(ctx, cand)
    errs = svd_errors(cand.stats, W, cand.rank)
    return errs[cand.rank - 1] if cand.rank <= len(errs) else 0.0


def _why(cand: Candidate) -> str:
    fb, fa = cand.cost_before_at_example.get("flops"), cand.cost_after_at_example.get("flops")
    flops = f", FLOPs x{fa / fb:.2f}" if fb and fa is not None else ""
    params = f"params x{cand.params_after / cand.params_before:.2f}" if cand.params_before else "params unchanged"
    return f"{params}{flops}"
