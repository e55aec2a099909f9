"""``panther.convert(model, *example_inputs, **options)``: swap dense layers for trainable low-rank ones.

The decisions are the compiler backend's: with example inputs, the model's graphs are captured
and run through the same passes as ``torch.compile(model, backend="panther")`` (the same
options, the same tolerance calibration on the same example inputs, the same ranks and
factors); then each layer the passes rewrote is replaced, in place, by a module that computes
the same low-rank function and trains:

=============================  ==================================================================
dense module                   replacement
=============================  ==================================================================
``nn.Linear``                  :class:`panther.nn.LowRankLinear` (factors A, B trainable); with
                               ``method="sketch"``: :class:`panther.nn.SKLinear` (one term)
``nn.Conv2d``                  :class:`panther.nn.LowRankConv2d`; with ``method="sketch"``:
                               :class:`panther.nn.SKConv2d` (zero padding)
``nn.MultiheadAttention``      :class:`RandMultiheadAttentionAsMHA`, a
                               :class:`panther.nn.RandMultiHeadAttention` that takes
                               ``nn.MultiheadAttention``'s call signature; its projections are
                               low-rank where the passes rewrote them
=============================  ==================================================================

Why not always ``SKLinear``: its function ``1/(2L)·Σ(x·S1·U1 + x·U2·S2)`` trains the sketches
against *fixed random* ``U`` matrices. A truncated / randomized / data-aware SVD puts the weight's
leading directions into both factors; an SKLinear holding them would need its fixed ``U`` to be
those directions, which are not random signs. So factorized weights go into
:class:`~panther.nn.LowRankLinear` (the same ``lowrank_linear`` op the backend emits), and the
random sketch, which is exactly SKLinear's parameterization, into SKLinear.

Without example inputs nothing can be calibrated: each linear / conv layer is decided alone by
the same policy on a one-row input (the cost model's ratios do not depend on the batch or
image size), ``method="auto"`` means the truncated SVD, and attention stays dense (whether
random features pay off depends on the sequence length).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from panther.nn import RandMultiHeadAttention
from panther.options import PantherOptions
from panther.passes.measure import rel_err, rng_fence

__all__ = ["convert", "register_handler", "HANDLERS", "RandMultiheadAttentionAsMHA"]

log = logging.getLogger("panther")

# Additive key-padding values at or below this mask the key out (as the backend reads masks).
_NEG_BIG = -1e4


@dataclass
class ConvertContext:
    """What a handler gets besides the module: options and the passes' rewritten candidates by path."""

    options: PantherOptions
    by_path: dict[str, list]

    def rewritten(self, path: str, kind: str):
        """The rewritten candidate of ``kind`` at module path ``path``, or None."""
        cands = [c for c in self.by_path.get(path, []) if c.kind == kind]
        if not cands or any(c.decision != "rewrite" for c in cands):
            return None
        return max(cands, key=lambda c: c.rank or 0)


Handler = Callable[[nn.Module, str, ConvertContext], "nn.Module | None"]
HANDLERS: dict[type, Handler] = {}


def register_handler(module_type: type) -> Callable[[Handler], Handler]:
    """Register ``fn(module, fqn, ctx) -> new module or None`` for modules of exactly ``module_type``.

    The handler returns the replacement (or None to keep the module); ``ctx.rewritten(fqn,
    kind)`` gives the passes' decision for the layer. Subclasses of a registered type are not
    matched (their ``forward`` may differ): register them explicitly.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")

    def deco(fn: Handler) -> Handler:
        HANDLERS[module_type] = fn
        return fn

    return deco


def convert(
    model: nn.Module,
    *example_inputs: Any,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    **options: Any,
):
    """Replace, in place, the layers the panther backend would rewrite by trainable low-rank modules.

    Args:
        model: the ``nn.Module`` to convert (its submodules are swapped; the root is not).
        *example_inputs: inputs to run the model on once, as ``panther.explain`` takes them: the
            tolerance is calibrated and data-aware factors are computed on them. Optional (see
            the module docstring for what happens without).
        filter_fn: ``filter_fn(module, fqn) -> bool``; only modules for which it returns True are
            converted (default: all). ``include`` / ``exclude`` options apply as well.
        example_kwargs: keyword inputs for the model, if any.
        **options: :class:`panther.options.PantherOptions` fields, as for the backend
            (``rewrite_trainable`` is implied: converted layers train).

    Returns:
        :class:`panther.passes.Report`: one row per layer (rank, method, measured error, error
        of the truncated SVD at that rank, predicted speedup, reason); rows of converted layers
        carry ``attrs["converted_to"]``, the replacement's class name. With example inputs,
        ``output_error`` is the converted model's, end to end, against its outputs before.

    Replacements keep the replaced module's training flag and its weights' and bias's
    ``requires_grad``; a module reachable under several names (tied) is converted once and
    stays tied. The global RNG is left as it was.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``filter_fn`` is not callable, or
            ``example_kwargs`` is not a dict.
        ValueError: malformed options; an explicit ``tolerance`` without example inputs.

    Example::

        >>> import panther
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        >>> report = panther.convert(model, torch.randn(64, 256), tolerance=None, min_params=0)
        >>> type(model[0]).__name__, model[0].rank
        ('LowRankLinear', 64)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, fqn), got {filter_fn!r}")
    if type(model) in HANDLERS:
        raise ValueError(
            f"convert swaps submodules in place and cannot replace the root {type(model).__name__}: "
            "wrap it, e.g. nn.Sequential(layer)"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs or None, got {type(example_kwargs).__name__}")
    opts = PantherOptions.from_dict(options, rewrite_trainable=True)
    has_inputs = bool(example_inputs) or bool(example_kwargs)
    if not has_inputs and opts.tolerance not in ("auto", None):
        raise ValueError(
            f"tolerance={opts.tolerance} is calibrated on example inputs: call "
            "panther.convert(model, *example_inputs, tolerance=...), or pass tolerance=None"
        )
    sites = list(_walk(model))
    dense_out = None
    with rng_fence(list(model.parameters())):  # deciding never moves the caller's RNG
        if has_inputs:
            report = _decide_on_graph(model, example_inputs, example_kwargs, opts)
            if opts.measure_error:
                dense_out = _run(model, example_inputs, example_kwargs)
        else:
            report = _decide_per_module(sites, opts)
    by_path: dict[str, list] = {}
    for c in report.candidates:
        by_path.setdefault(c.path, []).append(c)
    ctx = ConvertContext(opts, by_path)
    claimed: set[int] = set()
    replaced: set[str] = set()
    # A module reachable under several names (tied) is converted once, from the candidates of
    # all its names (the report names it by one of them), and swapped under each.
    groups: dict[int, list] = {}
    for site in sites:
        groups.setdefault(id(site[3]), []).append(site)
    with rng_fence(list(model.parameters())):  # the new layers' initial draws are overwritten: leave the RNG
        for group in groups.values():
            module = group[0][3]
            mine = [c for site in group for c in _candidates_of(site[2], by_path)]
            claimed.update(id(c) for c in mine)
            primary = next((site[2] for site in group if _candidates_of(site[2], by_path)), group[0][2])
            new, code, reason = _convert_one(module, primary, ctx, filter_fn, opts)
            if code is not None:
                for c in mine:
                    if code == "filtered" or c.decision == "rewrite":
                        c.dense(code, reason)
            if new is None:
                continue
            for parent, name, fqn, _ in group:
                setattr(parent, name, new)
                replaced.add(fqn)
            for c in mine:
                if c.decision == "rewrite":
                    c.attrs.setdefault("converted_to", type(new).__name__)
    _no_fused_fast_paths(model, replaced, report)
    for c in report.candidates:
        if id(c) not in claimed and c.decision == "rewrite":
            c.dense(
                "not_a_module",
                "no nn.Linear / nn.Conv2d / nn.MultiheadAttention module computes this layer: panther.convert "
                "swaps modules (torch.compile(backend='panther') rewrites it)",
            )
    report.notes.append(f"panther.convert replaced {len(replaced)} module(s)")
    if dense_out is not None:
        # The converted model end to end, against its outputs before (whatever stayed dense).
        report.output_error = rel_err(_run(model, example_inputs, example_kwargs), dense_out)
    return report


def _run(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None) -> Any:
    """The model's outputs on the example inputs, in eval mode without grad, the RNG untouched."""
    with _eval_no_grad(model), rng_fence(list(model.parameters())):
        return model(*example_inputs, **(example_kwargs or {}))


def _convert_one(module: nn.Module, fqn: str, ctx: ConvertContext, filter_fn, opts: PantherOptions):
    """(replacement or None, dense code, reason) for one module."""
    if filter_fn is not None and not filter_fn(module, fqn):
        return None, "filtered", "filter_fn returned False for this module"
    try:
        new = HANDLERS[type(module)](module, fqn, ctx)
    except Exception as e:
        if opts.strict:
            raise
        log.warning("panther.convert: %s left dense: %s: %s", fqn, type(e).__name__, e)
        return None, "convert", f"conversion failed: {type(e).__name__}: {e}"
    if new is not None:
        _carry_state(module, new)
    return new, None, None


def _carry_state(old: nn.Module, new: nn.Module) -> None:
    """Give the replacement the replaced module's mode and trainability: training flag (an eval
    model stays in eval, dropout off), and ``requires_grad`` of its weights and of its biases."""
    new.train(old.training)
    flags = {"weight": False, "bias": False}
    for n, p in old.named_parameters():
        flags["bias" if n.endswith("bias") else "weight"] |= p.requires_grad
    has_bias = any(n.endswith("bias") for n, _ in old.named_parameters())
    for n, p in new.named_parameters():
        is_bias = n.endswith("bias") and has_bias
        p.requires_grad_(flags["bias"] if is_bias else flags["weight"])


def _candidates_of(fqn: str, by_path: dict[str, list]) -> list:
    """The candidates a module at ``fqn`` computes: its own, its submodules' (an MHA's
    projections) and, for an encoder layer's ``self_attn``, the fused layer call's attention."""
    mine = [c for p, cs in by_path.items() if p == fqn or p.startswith(fqn + ".") for c in cs]
    if fqn.endswith(".self_attn"):
        parent = fqn.rsplit(".", 1)[0]
        mine += [c for c in by_path.get(parent, []) if c.kind == "attention" and c.rule.startswith("transformer_encoder_layer_fwd")]
    return mine


def _no_fused_fast_paths(model: nn.Module, replaced: set[str], report) -> None:
    """Switch off the fused inference fast paths of ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerEncoder`` around replaced modules: they read ``linear1.weight``,
    ``self_attn.in_proj_weight`` ... directly instead of calling the submodules."""
    fixed = []
    for fqn, module in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        if isinstance(module, nn.TransformerEncoderLayer) and any(f"{prefix}{n}" in replaced for n in ("self_attn", "linear1", "linear2")):
            module.activation_relu_or_gelu = False  # the layer's fast-path check then says no
            fixed.append(fqn)
    for fqn, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and any(f.startswith(f"{fqn}." if fqn else "") for f in fixed):
            module.use_nested_tensor = False
    if fixed:
        report.notes.append(f"fused fast path of nn.TransformerEncoderLayer switched off in {', '.join(fixed[:4])}" + (", ..." if len(fixed) > 4 else ""))


def _walk(root: nn.Module, prefix: str = ""):
    """(parent, attribute name, fqn, module) for every module with a handler, in tree order;
    the children of such a module are not visited (it is converted as a whole)."""
    for name, child in root._modules.items():  # (not named_children: a module held twice counts twice)
        if child is None:
            continue
        fqn = f"{prefix}{name}"
        if type(child) in HANDLERS:
            yield root, name, fqn, child
        else:
            yield from _walk(child, fqn + ".")


class _eval_no_grad:
    """Eval mode and no grad for the capture; every module's training flag restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


def _decide_on_graph(model, example_inputs, example_kwargs, opts: PantherOptions):
    from panther.explain import explain

    with _eval_no_grad(model):
        return explain(model, *example_inputs, example_kwargs=example_kwargs, **opts.to_dict())


def _decide_per_module(sites, opts: PantherOptions):
    """No example inputs: each linear / conv decided alone on a one-row input, uncalibrated."""
    import fnmatch

    from panther.explain import explain
    from panther.passes import Report

    merged = Report(graph="model", options=opts.to_dict())
    merged.notes.append("no example inputs: nothing was calibrated; attention layers stay dense")
    alone = PantherOptions.from_dict(opts, include=(), exclude=(), measure_error=False)
    for _, _, fqn, module in sites:
        if any(fnmatch.fnmatchcase(fqn, p) for p in opts.exclude) or (
            opts.include and not any(fnmatch.fnmatchcase(fqn, p) for p in opts.include)
        ):
            continue  # left as it is (the report lists what the passes saw)
        x = _one_row_input(module)
        if x is None:
            continue
        with _eval_no_grad(module):
            report = explain(module, x, **alone.to_dict())
        for c in report.candidates:
            c.path = fqn
            merged.candidates.append(c)
        merged.notes.extend(report.notes)
    return merged


def _one_row_input(module: nn.Module) -> Tensor | None:
    if isinstance(module, nn.Linear):
        w = module.weight
        return torch.zeros(1, module.in_features, dtype=w.dtype, device=w.device)
    if isinstance(module, nn.Conv2d):
        w = module.weight
        kh, kw = module.kernel_size
        sh, sw = module.stride
        # Larger than twice the padding: reflect padding needs padding < the input's size.
        ph, pw = module.padding if isinstance(module.padding, tuple) else (kh, kw)
        return torch.zeros(1, module.in_channels, kh + sh + 2 * ph, kw + sw + 2 * pw, dtype=w.dtype, device=w.device)
    return None


# -- handlers ------------------------------------------------------------------------------------


@register_handler(nn.Linear)
def _linear(module: nn.Linear, fqn: str, ctx: ConvertContext) -> nn.Module | None:
    cand = ctx.rewritten(fqn, "linear")
    if cand is None:
        return None
    A, B = cand.factors["A"], cand.factors["B"]
    if cand.method == "sketch":
        return _sklinear_from_sketch(module, A, B)
    from panther.nn import LowRankLinear

    return LowRankLinear.from_factors(A, B, None if module.bias is None else module.bias.detach())


def _split_sketch(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """S1, U2 (in×k), U1, S2 (k×out) of one-term sketch factors A = [S1, U2], B = [U1; S2]/2."""
    k = A.shape[1] // 2
    return A[:, :k], A[:, k:], 2 * B[:k], 2 * B[k:]


def _sklinear_from_sketch(module: nn.Linear, A: Tensor, B: Tensor) -> nn.Module:
    from panther.nn import SKLinear

    S1, U2, U1, S2 = _split_sketch(A, B)
    w = module.weight
    layer = SKLinear(
        module.in_features, module.out_features, 1, S1.shape[1], W_init=w.detach(), bias=module.bias is not None,
        dtype=w.dtype, device=w.device, generator=torch.Generator(device=w.device),  # draws replaced below
    )
    with torch.no_grad():
        layer.S1s[0].copy_(S1)
        layer.U2s[0].copy_(U2)
        layer.U1s[0].copy_(U1)
        layer.S2s[0].copy_(S2)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    return layer


@register_handler(nn.Conv2d)
def _conv2d(module: nn.Conv2d, fqn: str, ctx: ConvertContext) -> nn.Module | None:
    cand = ctx.rewritten(fqn, "conv")
    if cand is None:
        return None
    K1, K2 = cand.factors["K1"], cand.factors["K2"]
    r = K1.shape[0]
    A, B = K1.reshape(r, -1).t(), K2.reshape(K2.shape[0], r).t()
    if cand.method == "sketch" and module.padding_mode == "zeros":
        return _skconv_from_sketch(module, A, B)
    from panther.nn import LowRankConv2d

    return LowRankConv2d.from_factors(module, A, B)


def _skconv_from_sketch(module: nn.Conv2d, A: Tensor, B: Tensor) -> nn.Module:
    from panther.nn import SKConv2d

    S1, U2, U1, S2 = _split_sketch(A, B)
    k, w = S1.shape[1], module.weight
    layer = SKConv2d.from_conv2d(module, 1, k, generator=torch.Generator(device=w.device))  # draws replaced below
    shape = (k, *w.shape[1:])
    with torch.no_grad():
        layer.S1s[0].copy_(S1.t().reshape(shape))
        layer.U2s[0].copy_(U2.t().reshape(shape))
        layer.U1s[0].copy_(U1)
        layer.S2s[0].copy_(S2)
    return layer


@register_handler(nn.MultiheadAttention)
def _mha(module: nn.MultiheadAttention, fqn: str, ctx: ConvertContext) -> nn.Module | None:
    cand = ctx.rewritten(fqn, "attention")
    if cand is None and fqn.endswith(".self_attn"):  # the fused encoder-layer call is named after the layer
        parent = ctx.rewritten(fqn.rsplit(".", 1)[0], "attention")
        if parent is not None and parent.rule.startswith("transformer_encoder_layer_fwd"):
            cand = parent
    projections = [c for p, cs in ctx.by_path.items() if p.startswith(fqn + ".") for c in cs if c.decision == "rewrite"]
    if cand is None:
        for c in projections:
            c.dense("inside_dense_mha", "its nn.MultiheadAttention stays dense (its forward reads the packed weights)")
        return None
    layer = RandMultiheadAttentionAsMHA.from_mha_module(module, cand)
    E = module.embed_dim
    packed = ctx.rewritten(f"{fqn}.in_proj", "linear")
    if packed is not None:
        _low_rank_projections(layer, packed.factors["A"], packed.factors["B"], module.in_proj_bias)
    else:
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            c = ctx.rewritten(f"{fqn}.in_proj[{i * E or ''}:{(i + 1) * E}]", "linear")
            if c is not None:
                bias = None if module.in_proj_bias is None else module.in_proj_bias[i * E : (i + 1) * E]
                setattr(layer, proj, _low_rank(c.factors["A"], c.factors["B"], bias))
    out = ctx.rewritten(f"{fqn}.out_proj", "linear")
    if out is not None:
        layer.out_proj = _low_rank(out.factors["A"], out.factors["B"], module.out_proj.bias)
    return layer


def _low_rank(A: Tensor, B: Tensor, bias: Tensor | None) -> nn.Module:
    from panther.nn import LowRankLinear

    return LowRankLinear.from_factors(A, B, None if bias is None else bias.detach())


def _low_rank_projections(layer, A: Tensor, B: Tensor, bias: Tensor | None) -> None:
    """q/k/v projections from factors of the packed (3E) in-projection: one shared A, three B's."""
    E = layer.embed_dim
    projs = []
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        b = None if bias is None else bias[i * E : (i + 1) * E]
        projs.append(_low_rank(A, B[:, i * E : (i + 1) * E].contiguous(), b))
        setattr(layer, name, projs[-1])
    for p in projs[1:]:
        p.A = projs[0].A  # the packed factorization's input factor: one parameter, shared


class RandMultiheadAttentionAsMHA(RandMultiHeadAttention):
    """:class:`panther.nn.RandMultiHeadAttention` called like the ``nn.MultiheadAttention`` it replaces.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, None)``: random-feature
    attention never forms attention weights. ``key_padding_mask`` (True / -inf = ignore) becomes
    the key mask; an ``attn_mask`` other than the causal mask the layer was built for cannot be
    represented and raises. ``batch_first`` is that of the replaced module. The attributes that
    ``nn.TransformerEncoderLayer`` inspects for its fused fast path say "not available", so
    encoder layers call this module.
    """

    in_proj_bias = None  # no fused fast path (nn.TransformerEncoderLayer checks these)
    _qkv_same_embed_dim = False

    @classmethod
    def from_mha_module(cls, mha: nn.MultiheadAttention, cand) -> RandMultiheadAttentionAsMHA:
        """From ``mha`` and the passes' attention decision (features ``omega``, kernel, causality)."""
        view = copy.copy(mha)  # from_mha takes batch-first modules; the layout is handled in forward
        view.batch_first = True
        layer = cls.from_mha(
            view, num_random_features=cand.rank, kernel_fn=cand.attrs["kernel_fn"], iscausal=bool(cand.attrs["causal"]),
            generator=torch.Generator(device=mha.out_proj.weight.device),  # omega replaced below
        )
        layer.batch_first = mha.batch_first
        with torch.no_grad():
            layer.omega.copy_(cand.factors["omega"])
        return layer

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if is_causal and not self.iscausal:
            raise ValueError("is_causal=True, but this layer was converted from non-causal attention")
        if attn_mask is not None and not (is_causal and self.iscausal):
            raise ValueError(
                "attn_mask cannot be represented by random-feature attention (only key_padding_mask and "
                "the causal mask the layer was converted with)"
            )
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                mask = ~key_padding_mask
            else:
                mask = key_padding_mask > _NEG_BIG
                if not ((key_padding_mask == 0) | ~mask).all():
                    raise ValueError("a float key_padding_mask must hold 0 (attend) or -inf / <= -1e4 (ignore)")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
        if mask is not None and query.dim() == 2:
            mask = mask.reshape(key.shape[:-1])
        out, _ = super().forward(query, key, value, attention_mask=mask)
        if not self.batch_first and out.dim() == 3:
            out = out.transpose(0, 1)
        return out, None
