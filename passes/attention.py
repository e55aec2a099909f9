"""Softmax attention -> ``torch.ops.panther.performer_attention`` (FAVOR+ random features).

Pattern: one row of :data:`SPELLINGS` per way the Dynamo graph spells attention over q, k, v of
shape (B, H, N, D) / (B, H, Nk, D) / (B, H, Nk, Dv):

* ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale)``
  (also what :mod:`.expand` makes of ``nn.MultiheadAttention`` and the
  ``nn.TransformerEncoderLayer`` fast path);
* ``manual``: ``matmul(q, kᵀ)`` → ``* c`` / ``/ c`` (any number of times, or none) →
  (``+ mask``) → ``softmax(-1)`` → (dtype casts, eval ``dropout``) → ``matmul(·, v)``, as HF
  BERT and GPT-2 write it in their eager attention.

Masks (the extra check of every row, :func:`mask_recipe`): a mask is accepted when it is the
conjunction of key padding terms (a tensor broadcast over the query axis, B×Nk in effect), a
causal term (``kv_index <= q_index`` from ``arange`` grids with no offset, N = Nk) and terms that
are true by construction (``q_index >= 0``, ``new_ones``); a float mask must be such a bool mask
turned additive (``where(m, 0, -big)``, ``masked_fill(zeros, ~m, -big)``). Anything else (ALiBi,
relative position biases, arbitrary additive masks) cannot be represented by a key mask: the
attention stays dense with that reason.

Replacement: ``performer_attention(q, k, v, omega, key_mask, kernel_fn, causal, scale)`` with
``omega`` (H, m, D) orthogonal random features drawn at compile time from the seed.

Preconditions: 4-D q/k/v of one floating dtype, as many key heads as query heads, no dropout,
and no other user of an intermediate (attention weights returned by ``output_attentions``
keep it dense).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import cost as C
from .counters import counters
from .graph import check_no_autocast, is_target, node_val
from .paths import node_module_path
from .report import Candidate, Dense

__all__ = ["find_attention", "SPELLINGS", "mask_recipe", "key_mask"]

KIND = "attention"
_NEG_BIG = -1e4  # an additive mask value at or below this masks the key out


@dataclass
class Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Any = None
    scale: float | None = None  # None: 1/sqrt(D)
    causal: bool = False
    absorbed: list[fx.Node] = field(default_factory=list)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _single_user(node: Any) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


# -- spellings -----------------------------------------------------------------------------------


def _match_sdpa(node: fx.Node) -> Match | None:
    if not is_target(node, F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
        return None
    if _arg(node, 4, "dropout_p", 0.0) != 0.0:
        raise Dense("dropout", f"dropout_p={_arg(node, 4, 'dropout_p')} (Performer attention has no dropout)")
    if _arg(node, 7, "enable_gqa", False):
        raise Dense("gqa", "grouped-query attention (enable_gqa=True) is not supported")
    return Match(
        q=_arg(node, 0, "query"), k=_arg(node, 1, "key"), v=_arg(node, 2, "value"), mask=_arg(node, 3, "attn_mask"),
        scale=_arg(node, 6, "scale"), causal=bool(_arg(node, 5, "is_causal", False)),
    )


_MATMUL = (torch.matmul, operator.matmul)
_SOFTMAX = (F.softmax, torch.softmax, torch.nn.functional.softmax, "softmax")
_CASTS = ("type", "to", "float", "half", "bfloat16")


def _is_key_transpose(node: Any) -> fx.Node | None:
    """``k`` if ``node`` is kᵀ over the last two dims (transpose / permute of a 4-D tensor)."""
    if not isinstance(node, fx.Node):
        return None
    if is_target(node, torch.transpose, "transpose"):
        dims = sorted(d % 4 for d in node.args[1:3]) if len(node.args) >= 3 else None
        if dims == [2, 3]:
            return node.args[0]
    if is_target(node, torch.permute, "permute"):
        perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if tuple(perm) == (0, 1, 3, 2):
            return node.args[0]
    return None


def _scores(node: Any, absorbed: list) -> tuple[fx.Node, fx.Node, float] | None:
    """(q, k, scale) if ``node`` is (q·kᵀ) times / divided by constants."""
    scale = 1.0
    while isinstance(node, fx.Node) and is_target(node, operator.mul, torch.mul, operator.truediv, torch.div, "mul", "div"):
        a, b = node.args[0], node.args[1]
        div = is_target(node, operator.truediv, torch.div, "div")
        absorbed.append(node)
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            scale, node = (scale / b if div else scale * b), a
        elif isinstance(a, (int, float)) and isinstance(b, fx.Node) and not div:
            scale, node = scale * a, b
        else:
            return None
        if not _single_user(node):  # the unscaled scores are used elsewhere
            return None
    if not (isinstance(node, fx.Node) and is_target(node, *_MATMUL)):
        return None
    k = _is_key_transpose(node.args[1])
    if k is None or not _single_user(node.args[1]):
        return None
    absorbed.extend([node, node.args[1]])
    return node.args[0], k, scale


def _match_manual(node: fx.Node) -> Match | None:
    if not is_target(node, *_MATMUL):
        return None
    absorbed = [node]
    p = node.args[0]
    shared = False  # an intermediate with other users (e.g. probabilities returned to the caller)
    while isinstance(p, fx.Node) and (is_target(p, F.dropout, torch.dropout, *_CASTS)):
        if is_target(p, F.dropout, torch.dropout):
            train = _arg(p, 2, "training", True) if p.target is F.dropout else _arg(p, 2, "train", True)
            if train and _arg(p, 1, "p", 0.5) != 0.0:
                raise Dense("dropout", "attention dropout in training mode")
        shared |= not _single_user(p)
        absorbed.append(p)
        p = p.args[0]
    if not (isinstance(p, fx.Node) and is_target(p, *_SOFTMAX)):
        return None
    dim = _arg(p, 1, "dim", None)
    if dim not in (-1, 3):
        return None
    if shared or not _single_user(p):
        raise Dense("users", "the attention probabilities have other users (e.g. output_attentions=True)")
    absorbed.append(p)
    s = p.args[0]
    mask = None
    if isinstance(s, fx.Node) and is_target(s, operator.add, torch.add, "add") and _single_user(s):
        for scores, m in ((s.args[0], s.args[1]), (s.args[1], s.args[0])):
            got = _scores(scores, sub := [])
            if got is not None:
                absorbed += [s, *sub]
                mask = m
                break
        else:
            return None
    else:
        got = _scores(s, sub := [])
        if got is None:
            return None
        absorbed += sub
    q, k, scale = got
    return Match(q=q, k=k, v=node.args[1], mask=mask, scale=scale, absorbed=absorbed[1:])


# (rule, match(node) -> Match | None, raising Dense when it matched but cannot be rewritten)
SPELLINGS: list[tuple[str, Callable[[fx.Node], Match | None]]] = [
    ("sdpa", _match_sdpa),
    ("manual", _match_manual),
]


# -- masks ---------------------------------------------------------------------------------------


def _const(x: Any) -> float | None:
    """A Python number, or the value of a 0-d ``zeros``/``full`` node."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and is_target(x, torch.zeros, torch.zeros_like, "new_zeros"):
        return 0.0
    return None


def _peel(node: Any) -> Any:
    """Skip the ops that change a mask's shape, device or dtype but not which entries are set."""
    while isinstance(node, fx.Node) and is_target(node, "expand", "to", "reshape", "view", "bool", "contiguous"):
        node = node.args[0]
    return node


def _index_axis(node: Any) -> int | None:
    """2 (query) or 3 (key) if ``node`` is an ``arange`` grid along that axis with offset 0."""
    node = _peel(node)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    base, index = node.args
    if not isinstance(index, tuple) or len(index) != 4:
        return None
    axes = [i for i, ix in enumerate(index) if isinstance(ix, slice)]
    if len(axes) != 1 or any(ix is not None for i, ix in enumerate(index) if i != axes[0]):
        return None
    base = _peel(base)
    while isinstance(base, fx.Node) and is_target(base, operator.add, torch.add, "add") and _const(base.args[1]) == 0.0:
        base = _peel(base.args[0])
    if not (isinstance(base, fx.Node) and is_target(base, torch.arange)):
        return None
    # arange(end) or arange(start, end, step), positionally or by keyword: only start 0, step 1.
    start = base.args[0] if len(base.args) >= 2 else base.kwargs.get("start", 0)
    step = base.args[2] if len(base.args) >= 3 else base.kwargs.get("step", 1)
    if start != 0 or step != 1:
        return None
    return axes[0]


_INPLACE_OPERATORS = (operator.setitem, operator.iand, operator.ior, operator.ixor, operator.imul, operator.iadd)


def _mutated(node: Any) -> bool:
    """Whether a user of ``node`` writes into it in place (``x[i] = v``, ``x.fill_()``, ...): its
    recipe (e.g. ``torch.ones``) then no longer says what it holds."""
    if not isinstance(node, fx.Node):
        return False
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        target = user.target
        if target in _INPLACE_OPERATORS:
            return True
        # Tensor methods and torch functions with a trailing underscore write into their first
        # argument (the operator module's and_/or_/not_ do not).
        if getattr(target, "__module__", None) == "_operator":
            continue
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
    return False


def _bool_terms(node: Any, negated: bool, out: dict, facing: Any = None) -> None:
    """Split a boolean mask (True = attend, unless ``negated``) into key / causal / true terms.
    ``facing``: the node whose shape enters the broadcast to the scores, where it is not ``node``
    itself (a reshape above the ``where``/``masked_fill`` that turned ``node`` into a float mask)."""
    outer, node = (node if facing is None else facing), _peel(node)
    if negated:
        if isinstance(node, fx.Node) and _key_term_shape(outer, node):
            out["key"].append((node, True))
            return
        raise Dense("mask", f"negated mask term {getattr(node, 'name', node)} is not a key padding mask")
    if node is True or (isinstance(node, fx.Node) and is_target(node, "new_ones", torch.ones, torch.ones_like)):
        if _mutated(node):  # (ones whose entries are then set: the recipe no longer says what it holds)
            raise Dense("mask", f"mask term {node.name} is built by {node.target} and then written in place")
        return
    if isinstance(node, fx.Node) and is_target(node, operator.and_, torch.logical_and, torch.bitwise_and, "__and__", "logical_and"):
        _bool_terms(node.args[0], False, out)
        _bool_terms(node.args[1], False, out)
        return
    if isinstance(node, fx.Node) and is_target(node, operator.le, torch.le, operator.ge, torch.ge, "le", "ge"):
        a, b = node.args[0], node.args[1]
        if is_target(node, operator.ge, torch.ge, "ge"):
            a, b = b, a  # a <= b
        if _const(a) == 0.0 and _index_axis(b) == 2:
            return  # 0 <= q_index: always true
        if _index_axis(a) == 3 and _index_axis(b) == 2:
            out["causal"] = True
            return
        raise Dense("mask", f"comparison mask {node.name} is not causal (kv_index <= q_index with no offset)")
    if isinstance(node, fx.Node) and _key_term_shape(outer, node):
        out["key"].append((node, False))
        return
    raise Dense("mask", f"mask term {getattr(node, 'name', node)} is neither key padding nor causal")


def _key_term_shape(outer: Any, base: fx.Node) -> bool:
    """Whether ``outer`` (a mask term; ``base`` is it with the shape-only ops peeled off) is constant
    along queries and heads once broadcast right-aligned, as SDPA and the score addition broadcast
    it, to (B, H, Nq, Nk). Its shape is read where it enters the broadcast (below any reshape or
    view, above the expands): (1, Nk), (1, 1, Nk) or (B|1, 1, 1, Nk). A 2-D mask is (Nq, Nk) and a
    3-D one (H, Nq, Nk) there, so their leading dim must be 1 — a (B, Nk) padding mask has to be
    viewed as (B, 1, 1, Nk), as nn.MultiheadAttention does. ``base`` must hold the same entries
    (its leading dim is then the batch, as :func:`key_mask` reads it)."""
    while isinstance(outer, fx.Node) and is_target(outer, "expand", "to", "bool", "contiguous"):
        outer = outer.args[0]
    val, base_val = node_val(outer), node_val(base)
    if not isinstance(val, torch.Tensor) or not isinstance(base_val, torch.Tensor) or val.dim() not in (2, 3, 4):
        return False
    lead = val.shape[1:-1] if val.dim() == 4 else val.shape[:-1]
    return all(d == 1 for d in lead) and base_val.numel() == val.numel() and base_val.dim() >= 1


def mask_recipe(mask: Any) -> dict:
    """``{"key": [(term, negated), ...], "causal": bool}`` for a mask the kernel can represent.

    Raises:
        Dense: the mask is not a conjunction of key padding, causal and always-true terms.
    """
    out: dict = {"key": [], "causal": False}
    if mask is None:
        return out
    val = node_val(mask)
    if not isinstance(val, torch.Tensor):
        raise Dense("mask", "mask without a recorded value")
    if val.dtype == torch.bool:
        _bool_terms(mask, False, out)
        return out
    node = _peel(mask)
    if isinstance(node, fx.Node) and is_target(node, torch.where):
        cond, a, b = node.args[:3]
        ca, cb = _const(a), _const(b)
        if ca == 0.0 and cb is not None and cb <= _NEG_BIG:
            _bool_terms(cond, False, out, facing=mask)
            return out
        if cb == 0.0 and ca is not None and ca <= _NEG_BIG:
            _bool_terms(cond, True, out, facing=mask)
            return out
    if isinstance(node, fx.Node) and is_target(node, "masked_fill", "masked_fill_", torch.masked_fill):
        base, cond, value = node.args[:3]
        if _const(_peel(base)) == 0.0 and isinstance(value, (int, float)) and value <= _NEG_BIG:
            _bool_terms(cond, True, out, facing=mask)
            return out
    raise Dense("mask", f"additive float mask {getattr(mask, 'name', mask)} is not a key padding / causal mask")


def key_mask(k: torch.Tensor, *terms: torch.Tensor, negated: tuple[bool, ...]) -> torch.Tensor | None:
    """Combine key padding terms into one (B, Nk) bool mask, True = attend."""
    if not terms:
        return None
    B, Nk = k.shape[0], k.shape[2]
    out = None
    for t, neg in zip(terms, negated):
        t = t.reshape(t.shape[0], Nk)
        t = t.logical_not() if neg else t.to(torch.bool)
        out = t if out is None else out.logical_and(t)
    return out.expand(B, Nk).contiguous()


# -- finder --------------------------------------------------------------------------------------


def find_attention(ctx) -> list[Candidate]:
    """Find attention in every spelling of :data:`SPELLINGS` (see the module docstring).

    Counts ``matched``; a match that fails a precondition (dropout, GQA, an unrepresentable
    mask, other users of the probabilities) is returned already decided dense with the reason.
    """
    found = []
    taken: set[fx.Node] = set()
    for node in ctx.graph.nodes:
        if node.op not in ("call_function", "call_method") or node in taken:
            continue
        for rule, match in SPELLINGS:
            try:
                m = match(node)
                err = None
            except Dense as d:
                m, err = None, d
            if m is None and err is None:
                continue
            cand = Candidate(KIND, rule, node, {})
            origin = node.meta.get("panther_origin")
            if origin:
                cand.rule = f"{origin}->{rule}"
            cand.path = node_module_path(node)
            counters[KIND]["matched"] += 1
            if err is None:
                try:
                    _check(cand, m)
                except Dense as d:
                    err = d
            if err is not None:
                cand.dense(err.code, err.reason)
            else:
                taken.update(m.absorbed)
            found.append(cand)
            break
    return found


def _check(cand: Candidate, m: Match) -> None:
    qv, kv, vv = (node_val(x) for x in (m.q, m.k, m.v))
    cand.inputs = {"q": m.q, "k": m.k, "v": m.v}
    if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv)):
        raise Dense("no_meta", "no recorded shapes for q, k or v")
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise Dense("shape", f"q/k/v are {qv.dim()}-D; expected (B, H, N, D)")
    if not qv.dtype.is_floating_point or not (qv.dtype == kv.dtype == vv.dtype):
        raise Dense("dtype", f"q/k/v dtypes {qv.dtype}/{kv.dtype}/{vv.dtype} must be one floating dtype")
    check_no_autocast(qv, node_val(cand.node))
    if kv.shape[1] != qv.shape[1] or vv.shape[1] != qv.shape[1]:
        raise Dense("gqa", f"{kv.shape[1]} key heads for {qv.shape[1]} query heads")
    scale = m.scale if m.scale is None or isinstance(m.scale, (int, float)) else node_val(m.scale)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise Dense("scale", f"the softmax scale is not a constant ({m.scale})")
    cand.absorbed = m.absorbed
    recipe = mask_recipe(m.mask)
    causal = m.causal or recipe["causal"]
    if causal and qv.shape[2] != kv.shape[2]:
        raise Dense("causal", "causal attention with N != Nk (a cache offset) is not supported")
    for i, (term, _) in enumerate(recipe["key"]):
        cand.inputs[f"mask{i}"] = term
    D = int(qv.shape[-1])
    cand.attrs.update(
        heads=int(qv.shape[1]), head_dim=D, v_dim=int(vv.shape[-1]), causal=causal,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(D),
        negated=tuple(neg for _, neg in recipe["key"]), has_mask=m.mask is not None,
    )


# -- the steps the policy and the rewriter call --------------------------------------------------


def plan(ctx, cand: Candidate) -> None:
    """Random features: ``num_random_features``; under a tolerance, doubled (up to
    :data:`.calibrate.FEATURE_DOUBLINGS` times, while the cost model predicts a win) until the
    Performer output measured on the recorded q, k, v is within it."""
    from .calibrate import FEATURE_DOUBLINGS
    from .cost import at_example
    from .measure import rel_err

    opts = ctx.options
    m0 = opts.num_random_features
    cand.rank = m0
    cand.attrs["kernel_fn"] = opts.kernel_fn
    cand.method = f"performer-{opts.kernel_fn}"
    tol = opts.effective_tolerance()
    if tol is None:
        return
    if "out" not in cand.stats:
        if opts.tolerance != "auto":
            raise Dense("uncalibrated", f"tolerance={tol} needs q, k, v recorded on real example inputs, and none were")
        return
    cap = m0 << FEATURE_DOUBLINGS
    if opts.require_savings:
        fb = at_example(cost(ctx, cand, None)["flops"], ctx.shape_env)
        f1 = at_example(cost(ctx, cand, 1)["flops"], ctx.shape_env)
        if fb is not None and f1:  # Performer FLOPs grow linearly in m
            cap = min(cap, -(-fb // f1) - 1)
    if cap < m0:
        return  # not worthwhile at any size: the savings rule reports it
    tried: dict[int, float] = {}
    m = m0
    while m <= cap:
        cand.rank = m
        factorize(ctx, cand)
        err = rel_err(eager(cand, cand.stats["values"]), cand.stats["out"])
        tried[m] = round(err, 6) if err is not None else None
        if err is not None and err <= tol:
            cand.calibration = {"tolerance": tol, "tried": tried}
            cand.factors = {}
            return
        m *= 2
    cand.calibration = {"tolerance": tol, "tried": tried}
    best = min((e for e in tried.values() if e is not None), default=float("inf"))
    raise Dense(
        "tolerance",
        f"Performer error {best:.3g} with up to {max(tried)} features (the most worthwhile) > tolerance {tol}",
    )


def cost(ctx, cand: Candidate, m: int | None) -> dict:
    qv, kv = node_val(cand.inputs["q"]), node_val(cand.inputs["k"])
    BH = C.sym(qv.shape[0]) * C.sym(qv.shape[1])
    N, Nk = C.sym(qv.shape[2]), C.sym(kv.shape[2])
    a, elt = cand.attrs, qv.element_size()
    if m is None:
        return C.attention_cost(BH, N, Nk, a["head_dim"], a["v_dim"], elt, materialized=cand.rule.endswith("manual"))
    return C.performer_cost(BH, N, Nk, a["head_dim"], a["v_dim"], m, elt)


def params_after(cand: Candidate, m: int) -> int:
    return 0


def factorize(ctx, cand: Candidate, weight: Any = None) -> None:
    """Draw the random features omega (H, m, D) from the layer's seed."""
    from panther.features import orthogonal_random_features

    qv = node_val(cand.inputs["q"])
    gen = torch.Generator().manual_seed(ctx.seed_for(cand))
    omega = orthogonal_random_features(cand.attrs["heads"], cand.rank, cand.attrs["head_dim"], generator=gen, dtype=qv.dtype)
    cand.factors = {"omega": omega.to(qv.device)}


def _mask_terms(cand: Candidate, values: dict[str, Any]) -> list:
    return [values[f"mask{i}"] for i in range(len(cand.attrs["negated"]))]


def emit(ctx, cand: Candidate) -> fx.Node:
    """Insert ``performer_attention`` (and the key mask it reads) before ``cand.node``."""
    graph, a = ctx.graph, cand.attrs
    with graph.inserting_before(cand.node):
        omega = ctx.add_buffer(f"{cand.label}_omega", cand.factors["omega"])
        terms = _mask_terms(cand, cand.inputs)
        km = graph.call_function(key_mask, (cand.inputs["k"], *terms), {"negated": a["negated"]}) if terms else None
        new = graph.call_function(
            torch.ops.panther.performer_attention.default,
            (cand.inputs["q"], cand.inputs["k"], cand.inputs["v"], omega, km, a["kernel_fn"], a["causal"], a["scale"]),
        )
    cand.attrs["buffers"] = {"omega": omega.target}
    new.meta["val"] = node_val(cand.node)
    return new


def eager(cand: Candidate, values: dict[str, Any]) -> torch.Tensor:
    a = cand.attrs
    terms = _mask_terms(cand, values)
    km = key_mask(values["k"], *terms, negated=a["negated"]) if terms else None
    return torch.ops.panther.performer_attention(
        values["q"], values["k"], values["v"], cand.factors["omega"], km, a["kernel_fn"], a["causal"], a["scale"]
    )
