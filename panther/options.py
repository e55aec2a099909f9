"""Options of the compiler backend, shared by ``torch.compile(backend="panther")``,
:func:`panther.explain` and ``panther.convert``.

:class:`PantherOptions` is a frozen dataclass: defaults and checks live in ``__post_init__``,
every error names the option, the value given and what is allowed, and
:meth:`PantherOptions.to_dict` / :meth:`PantherOptions.from_dict` round-trip it so that a dump
records exactly what was asked.

Example::

    >>> from panther.options import PantherOptions
    >>> opts = PantherOptions.from_dict({"low_rank": 8, "exclude": ["pooler.*"]})
    >>> opts.rank_for(256, 256)
    16
    >>> PantherOptions().effective_tolerance()  # "auto": calibrate to 5% output error per layer
    0.05
    >>> print(opts.effective_tolerance())  # low_rank fixes the rank: nothing to calibrate
    None
    >>> PantherOptions(tolerance=0.01, low_rank=8)
    Traceback (most recent call last):
    ...
    ValueError: tolerance=0.01 chooses each layer's rank, low_rank=8 fixes it: pass one of them ...
    >>> PantherOptions.from_dict({"lowrank": 8})
    Traceback (most recent call last):
    ...
    ValueError: unknown panther option 'lowrank'; allowed options: ...
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from panther._validation import check_choice, check_float, check_int

__all__ = ["PantherOptions", "DUMP_DIR_ENV", "DEFAULT_TOLERANCE", "METHODS"]

DUMP_DIR_ENV = "PANTHER_DUMP_DIR"

METHODS = ("auto", "data-aware", "svd", "rsvd", "sketch")
# The largest relative output error a rewritten node may add when ``tolerance="auto"``.
DEFAULT_TOLERANCE = 0.05
KERNEL_FNS = ("softmax", "relu")
ON_STALE = ("refresh", "raise")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# One line per option: what it does and what it takes (listed in every error message).
HELP: dict[str, str] = {
    "linear": "bool: rewrite linear layers (F.linear, nn.Linear, HF Conv1D addmm)",
    "conv": "bool: rewrite conv2d layers (groups=1, dilation=1)",
    "attention": "bool: rewrite softmax attention into Performer random-feature attention",
    "method": f"one of {list(METHODS)}: how linear/conv factors are computed (auto: data-aware on recorded activations, else svd)",
    "tolerance": f"float in (0, 1], None or 'auto': largest relative output error per rewritten node; the smallest rank meeting it is calibrated on the example inputs ('auto': {DEFAULT_TOLERANCE} unless low_rank/max_error set the rank)",
    "low_rank": "int >= 1 or None: rank per term; rank = 2*num_terms*low_rank (as pr.nn.SKLinear)",
    "num_terms": "int >= 1: number of sketch terms (see low_rank)",
    "rank_fraction": "float in (0, 1]: parameter budget (after/before) used when low_rank is None",
    "max_error": "float in (0, 1] or None: smallest rank whose relative WEIGHT error is below this (excludes tolerance)",
    "num_random_features": "int >= 1: random features per head for Performer attention",
    "kernel_fn": f"one of {list(KERNEL_FNS)}: Performer feature map",
    "min_params": "int >= 0: layers with fewer weight parameters stay dense",
    "include": "list of glob patterns on module paths; when given, only matching layers are rewritten",
    "exclude": "list of glob patterns on module paths; matching layers stay dense",
    "seed": "int >= 0: seed of every random draw (sketches, random features)",
    "require_savings": "bool: rewrite only where parameters and estimated FLOPs both go down",
    "strict": "bool: raise instead of leaving a layer dense when a pass fails on it",
    "dump_dir": f"str or None: folder for debugging dumps (default: ${DUMP_DIR_ENV})",
    "on_stale": f"one of {list(ON_STALE)}: what to do when a weight changes after compilation",
    "rewrite_trainable": "bool: also rewrite weights that require grad when grad is enabled",
    "measure_error": "bool: run the example inputs at compile time (calibration, data-aware factors, measured errors)",
    "mode": f"one of {list(MODES)} or None: Inductor mode (same as torch.compile's mode=)",
    "inductor": "dict: extra torch._inductor.config patches for this compile",
}


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def _check_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a list of glob patterns (str), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class PantherOptions:
    """What the panther backend rewrites and how. Every field has a safe default.

    Args:
        linear, conv, attention: switch each rewrite family on or off. Default: all on.
        method: how the rank-r factors of a linear / conv weight are computed (all give the same
            low-rank product, run by the same ops and kernels):

            * ``"data-aware"``: minimize the output error ``‖X·Wᵀ − X·A·B‖`` over the activations
              ``X`` recorded on the example inputs (whiten by their second moment, truncate);
            * ``"svd"``: the exact truncated SVD, the best rank-r approximation of the weight;
            * ``"rsvd"``: randomized SVD (Halko–Martinsson–Tropp), near-optimal, cheaper on
              large weights;
            * ``"sketch"``: the unbiased two-sided sign sketch of ``pr.nn.SKLinear``;
            * ``"auto"`` (default): ``"data-aware"`` where activations were recorded (real example
              inputs and ``measure_error=True``), else ``"svd"``; ``"svd"`` with ``max_error``.
              At equal rank data-aware has the lowest error on the outputs, which is what a
              tolerance bounds, so it needs the smallest rank.
        tolerance: the largest relative output error ``‖y − ŷ‖ / ‖y‖`` a rewritten node may add,
            measured on the example inputs. The backend runs them once through the graph,
            records each candidate's input activations and picks, per layer, the smallest rank
            (attention: the fewest random features, doubling from ``num_random_features``) that
            meets it, within ``rank_fraction`` and where the cost model still predicts a win; a
            layer that cannot meet it stays dense with the reason. ``"auto"`` (default) means
            ``DEFAULT_TOLERANCE`` = 0.05 unless ``low_rank`` or ``max_error`` sets the rank or
            ``measure_error=False`` (then nothing is calibrated); ``None`` switches it off.
            Combining an explicit tolerance with ``low_rank``, ``max_error`` or
            ``measure_error=False`` raises ValueError.
        low_rank, num_terms: fix the rank of every linear/conv rewrite to
            ``2 * num_terms * low_rank``, the rank of ``pr.nn.SKLinear(num_terms, low_rank)``.
            Default: ``low_rank=None`` (use ``tolerance`` / ``rank_fraction``), ``num_terms=1``.
        rank_fraction: the most parameters a rewrite may keep, as a fraction of the dense
            weight's: the rank is at most the largest whose factors hold this fraction. Without
            a tolerance (and ``low_rank``) that largest rank is used. Default 0.5.
        max_error: if set, use the smallest rank (within the budget) whose relative Frobenius
            error of the *weight* is at most this; a layer that cannot reach it stays dense. A
            weight criterion: it excludes ``tolerance`` (an output criterion) and
            ``method="data-aware"`` (which does not minimize the weight error).
        num_random_features: Performer features per head. Default 256.
        kernel_fn: ``"softmax"`` (FAVOR+ positive features) or ``"relu"``. Default ``"softmax"``.
        min_params: layers whose weight has fewer parameters stay dense. Default 4096.
        include, exclude: glob patterns (``fnmatch``) on module paths such as
            ``encoder.layer.3.attention.self.query``. Default: include all, exclude none.
        seed: seed of every random draw. Default 0. The global RNG is never touched.
        require_savings: rewrite only where the parameters and the estimated FLOPs at the
            example sizes both go down. Default True.
        strict: raise when a pass fails on a layer, instead of leaving it dense. Default False.
        dump_dir: folder for the debugging dumps; default ``$PANTHER_DUMP_DIR`` or none.
        on_stale: a rewritten weight changed after compilation (in place, its storage swapped,
            or an optimizer step; :mod:`panther.backend`): ``"refresh"`` recomputes its factors
            (compiling the graph again if their rank no longer meets the tolerance), ``"raise"``
            raises. Default ``"refresh"``.
        rewrite_trainable: with grad enabled, weights that require grad stay dense unless this
            is True (their factors are then fixed: those weights stop learning). Default False.
        measure_error: run the example inputs at compile time: record activations (tolerance
            calibration, data-aware factors) and measure each rewrite's output error (reported
            and dumped). Default True. With False, nothing runs: ``"auto"`` method means
            ``"svd"`` and ``"auto"`` tolerance means none.
        mode: Inductor mode, as ``torch.compile(mode=...)`` (which cannot be combined with
            ``options=``). Default None.
        inductor: extra ``torch._inductor.config`` patches, applied to this compile only.

    Raises:
        ValueError / TypeError: an unknown key or a bad value; the message lists what is allowed.
    """

    linear: bool = True
    conv: bool = True
    attention: bool = True
    method: str = "auto"
    tolerance: float | str | None = "auto"
    low_rank: int | None = None
    num_terms: int = 1
    rank_fraction: float = 0.5
    max_error: float | None = None
    num_random_features: int = 256
    kernel_fn: str = "softmax"
    min_params: int = 4096
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    require_savings: bool = True
    strict: bool = False
    dump_dir: str | None = None
    on_stale: str = "refresh"
    rewrite_trainable: bool = False
    measure_error: bool = True
    mode: str | None = None
    inductor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("linear", "conv", "attention", "require_savings", "strict", "rewrite_trainable", "measure_error"):
            _check_bool(name, getattr(self, name))
        check_choice("method", self.method, METHODS)
        if self.low_rank is not None:
            check_int("low_rank", self.low_rank)
        check_int("num_terms", self.num_terms)
        set_("rank_fraction", check_float("rank_fraction", self.rank_fraction, low=1e-9, high=1.0, high_inclusive=True))
        if self.max_error is not None:
            set_("max_error", check_float("max_error", self.max_error, low=1e-12, high=1.0, high_inclusive=True))
        if self.tolerance is not None and self.tolerance != "auto":
            if isinstance(self.tolerance, str):
                raise ValueError(f"tolerance must be a float in (0, 1], None or 'auto', got {self.tolerance!r}")
            set_("tolerance", check_float("tolerance", self.tolerance, low=1e-12, high=1.0, high_inclusive=True))
            clash = [
                (self.low_rank is not None, f"low_rank={self.low_rank} fixes it"),
                (self.max_error is not None, f"max_error={self.max_error} chooses it by the weight error instead"),
                (not self.measure_error, "measure_error=False runs no example inputs to calibrate on"),
            ]
            for bad, why in clash:
                if bad:
                    raise ValueError(
                        f"tolerance={self.tolerance} chooses each layer's rank, {why}: pass one of them "
                        "(tolerance=None keeps the other rule)"
                    )
        if self.max_error is not None and self.method == "data-aware":
            raise ValueError(
                f"max_error={self.max_error} bounds the weight error, which method='data-aware' does not "
                "minimize (it minimizes the output error): use tolerance= with data-aware, or "
                "method='svd' / 'rsvd' with max_error"
            )
        check_int("num_random_features", self.num_random_features)
        check_choice("kernel_fn", self.kernel_fn, KERNEL_FNS)
        check_int("min_params", self.min_params, minimum=0)
        set_("include", _check_patterns("include", self.include))
        set_("exclude", _check_patterns("exclude", self.exclude))
        check_int("seed", self.seed, minimum=0)
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise TypeError(f"dump_dir must be a path (str) or None, got {self.dump_dir!r}")
        if self.dump_dir is not None:
            set_("dump_dir", os.fspath(self.dump_dir))
        check_choice("on_stale", self.on_stale, ON_STALE)
        if self.mode is not None:
            check_choice("mode", self.mode, MODES)
        if not isinstance(self.inductor, dict) or not all(isinstance(k, str) for k in self.inductor):
            raise TypeError(f"inductor must be a dict of torch._inductor.config names to values, got {self.inductor!r}")
        if self.inductor:
            from torch._inductor import config as inductor_config

            known = inductor_config.get_config_copy()
            unknown = sorted(k for k in self.inductor if k not in known)
            if unknown:
                raise ValueError(f"inductor: unknown torch._inductor.config option(s) {unknown}")

    # -- conversions ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, options: dict[str, Any] | PantherOptions | None = None, **overrides: Any) -> PantherOptions:
        """Build options from a dict (as given to ``torch.compile(options=...)``) plus overrides.

        Raises:
            ValueError: an unknown key; the message lists every allowed key with what it takes.
        """
        if isinstance(options, PantherOptions):
            base = options.to_dict()
        elif options is None:
            base = {}
        elif isinstance(options, dict):
            base = dict(options)
        else:
            raise TypeError(f"panther options must be a dict, got {type(options).__name__}")
        base.update(overrides)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in base:
            if key not in names:
                allowed = "\n".join(f"  {n}: {HELP[n]}" for n in names)
                raise ValueError(f"unknown panther option {key!r}; allowed options:\n{allowed}")
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["include"] = list(self.include)
        out["exclude"] = list(self.exclude)
        out["inductor"] = dict(self.inductor)
        return out

    # -- derived values ---------------------------------------------------------------------

    def resolved_dump_dir(self) -> str | None:
        """``dump_dir``, else ``$PANTHER_DUMP_DIR``, else None."""
        return self.dump_dir or os.environ.get(DUMP_DIR_ENV) or None

    def effective_tolerance(self) -> float | None:
        """The tolerance in force: ``tolerance``, or for ``"auto"`` :data:`DEFAULT_TOLERANCE` unless
        ``low_rank`` / ``max_error`` set the rank or ``measure_error`` is False (then None)."""
        if self.tolerance != "auto":
            return self.tolerance
        if self.low_rank is not None or self.max_error is not None or not self.measure_error:
            return None
        return DEFAULT_TOLERANCE

    def resolved_method(self, has_activations: bool) -> str:
        """``method``, with ``"auto"`` resolved: ``"data-aware"`` given recorded activations (and no
        ``max_error``), else ``"svd"``; ``"data-aware"`` without activations falls back to ``"svd"``."""
        if self.method in ("auto", "data-aware"):
            return "data-aware" if has_activations and self.max_error is None else "svd"
        return self.method

    def budget_rank(self, n_in: int, n_out: int) -> int:
        """The largest rank r whose factors r·(in+out) hold at most ``rank_fraction`` of in·out."""
        return int(math.floor(self.rank_fraction * n_in * n_out / (n_in + n_out)))

    def rank_for(self, n_in: int, n_out: int) -> int:
        """The rank asked for by ``low_rank``/``num_terms``, else the budget rank (may be 0)."""
        if self.low_rank is not None:
            return 2 * self.num_terms * self.low_rank
        return self.budget_rank(n_in, n_out)

    def cache_key(self) -> str:
        """A string that changes whenever an option that affects the compiled code changes."""
        import json

        return json.dumps(self.to_dict(), sort_keys=True, default=str)
