"""Spell fused modules as the primitive ops the finders know.

Dynamo records some modules as one opaque call:

* ``nn.MultiheadAttention`` -> ``F.multi_head_attention_forward(query, key, value, ...)``;
* ``nn.TransformerEncoderLayer`` in eval without grad (its fast path) ->
  ``torch._transformer_encoder_layer_fwd(src, ...)``.

Each row of :data:`EXPANSIONS` rewrites such a call, when its arguments allow (checked first;
otherwise the call is left as it is, with a note), into the same computation written with
``F.linear``, ``F.scaled_dot_product_attention``, ``F.layer_norm`` and views, by inlining the
FX trace of a small reference function. The expanded graph computes the same function: if the
later passes rewrite nothing in it, only the op spelling changed.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .counters import counters
from .graph import node_val, set_val

__all__ = ["expand_fused", "EXPANSIONS"]


# -- reference functions (traced with torch.fx, then inlined) ------------------------------------


def _mha(query, key, value, in_w, in_b, out_w, out_b, key_padding_mask, *, num_heads, packed, bool_mask):
    """``F.multi_head_attention_forward`` (sequence-first, no bias_k/v, no attn_mask, no dropout)."""
    L, B, E = query.shape
    S = key.shape[0]
    D = E // num_heads
    if packed:
        q, k, v = F.linear(query, in_w, in_b).chunk(3, dim=-1)
    else:
        q = F.linear(query, in_w[0:E], None if in_b is None else in_b[0:E])
        k = F.linear(key, in_w[E : 2 * E], None if in_b is None else in_b[E : 2 * E])
        v = F.linear(value, in_w[2 * E :], None if in_b is None else in_b[2 * E :])
    q = q.reshape(L, B, num_heads, D).permute(1, 2, 0, 3)
    k = k.reshape(S, B, num_heads, D).permute(1, 2, 0, 3)
    v = v.reshape(S, B, num_heads, D).permute(1, 2, 0, 3)
    mask = None
    if key_padding_mask is not None:
        # bool: True = ignore (nn.MultiheadAttention's convention); float: added to the scores.
        mask = key_padding_mask.logical_not() if bool_mask else key_padding_mask
        mask = mask.reshape(B, 1, 1, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.permute(2, 0, 1, 3).reshape(L, B, E)
    return F.linear(out, out_w, out_b)


def _encoder_layer(
    src, qkv_w, qkv_b, proj_w, proj_b, n1_w, n1_b, n2_w, n2_b, f1_w, f1_b, f2_w, f2_b, key_padding_mask,
    *, num_heads, use_gelu, norm_first, eps, bool_mask,
):
    """``torch._transformer_encoder_layer_fwd`` (batch-first; a key padding mask: bool True =
    ignore, or float added to the scores)."""
    E = src.shape[-1]

    def self_attention(x):
        B, N, _ = x.shape
        q, k, v = F.linear(x, qkv_w, qkv_b).chunk(3, dim=-1)
        q = q.reshape(B, N, num_heads, E // num_heads).transpose(1, 2)
        k = k.reshape(B, N, num_heads, E // num_heads).transpose(1, 2)
        v = v.reshape(B, N, num_heads, E // num_heads).transpose(1, 2)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask.logical_not() if bool_mask else key_padding_mask
            mask = mask.reshape(B, 1, 1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.linear(out.transpose(1, 2).reshape(B, N, E), proj_w, proj_b)

    def feed_forward(x):
        h = F.linear(x, f1_w, f1_b)
        h = F.gelu(h) if use_gelu else F.relu(h)
        return F.linear(h, f2_w, f2_b)

    x = src
    if norm_first:
        x = x + self_attention(F.layer_norm(x, (E,), n1_w, n1_b, eps))
        x = x + feed_forward(F.layer_norm(x, (E,), n2_w, n2_b, eps))
    else:
        x = F.layer_norm(x + self_attention(x), (E,), n1_w, n1_b, eps)
        x = F.layer_norm(x + feed_forward(x), (E,), n2_w, n2_b, eps)
    return x


# -- matching ------------------------------------------------------------------------------------

_MHA_NAMES = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k",
    "static_v", "average_attn_weights", "is_causal",
)
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                 "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                 "is_causal": False}

_ENC_NAMES = (
    "src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu", "norm_first",
    "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1",
    "ffn_weight_2", "ffn_bias_2", "mask", "mask_type",
)


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    a = dict(defaults)
    a.update(zip(names, node.args))
    a.update(node.kwargs)
    return a


def _only_first_output_used(node: fx.Node) -> bool:
    return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def _match_mha(node: fx.Node):
    a = _bind(node, _MHA_NAMES, _MHA_DEFAULTS)
    dropout = a["dropout_p"] if a["training"] else 0.0
    blockers = {
        "bias_k/bias_v": a["bias_k"] is not None or a["bias_v"] is not None,
        "add_zero_attn": bool(a["add_zero_attn"]),
        "dropout": dropout != 0.0,
        "attention weights are used": not _only_first_output_used(node),
        "attn_mask": a["attn_mask"] is not None or bool(a["is_causal"]),
        "separate q/k/v projections": bool(a["use_separate_proj_weight"]),
        "static_k/static_v": a["static_k"] is not None or a["static_v"] is not None,
    }
    bad = [k for k, v in blockers.items() if v]
    if bad:
        return None, f"nn.MultiheadAttention call kept fused: {', '.join(bad)}"
    kpm = a["key_padding_mask"]
    kpm_val = node_val(kpm)
    packed = a["query"] is a["key"] is a["value"]
    tensors = [a["query"], a["key"], a["value"], a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"], kpm]
    consts = {"num_heads": int(a["num_heads"]), "packed": packed, "bool_mask": kpm_val is not None and kpm_val.dtype == torch.bool}
    return (_mha, tensors, consts, [u for u in node.users]), None


def _match_encoder(node: fx.Node):
    a = _bind(node, _ENC_NAMES, {"mask": None, "mask_type": None})
    mask = a["mask"]
    if mask is not None:
        mval = node_val(mask)
        if a["mask_type"] != 1 or mval is None or mval.dim() != 2:
            return None, "TransformerEncoderLayer fast path kept fused: only a key padding mask is expanded"
    tensors = [a[k] for k in ("src", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "norm_weight_1", "norm_bias_1",
                              "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2")]
    tensors.append(mask)
    consts = {
        "num_heads": int(a["num_heads"]), "use_gelu": bool(a["use_gelu"]), "norm_first": bool(a["norm_first"]),
        "eps": float(a["eps"]), "bool_mask": mask is not None and node_val(mask).dtype == torch.bool,
    }
    return (_encoder_layer, tensors, consts, None), None


# (name, target, match(node) -> ((fn, tensor args, constants, getitem users or None), None) | (None, why))
EXPANSIONS: list[tuple[str, Any, Callable]] = [
    ("multi_head_attention_forward", F.multi_head_attention_forward, _match_mha),
    ("transformer_encoder_layer_fwd", torch._transformer_encoder_layer_fwd, _match_encoder),
]


_CONCRETE = object()


def _inline(ctx, at: fx.Node, fn: Callable, tensors: list[Any], consts: dict[str, Any], origin: str) -> fx.Node:
    """Inline the FX trace of ``fn(*tensors, **consts)`` before ``at``; return its output node."""
    import inspect

    params = list(inspect.signature(fn).parameters)
    concrete = dict(consts)
    for name, t in zip(params, tensors):
        if t is None:
            concrete[name] = None
    traced = fx.symbolic_trace(fn, concrete_args=concrete)
    env: dict[fx.Node, Any] = {}
    by_name = dict(zip(params, tensors))
    out = None
    placeholders = iter(params)  # in signature order (FX may rename concrete ones)
    with ctx.graph.inserting_before(at):
        for n in traced.graph.nodes:
            if n.op == "placeholder":
                name = next(placeholders)
                env[n] = _CONCRETE if name in concrete else by_name[name]
                continue
            if any(env.get(i) is _CONCRETE for i in n.all_input_nodes):
                env[n] = _CONCRETE  # FX's checks of the concrete arguments: the values are baked in
                continue
            if n.op == "output":
                out = fx.node.map_arg(n.args[0], lambda x: env[x])
                continue
            new = ctx.graph.node_copy(n, lambda x: env[x])
            new.meta = {"nn_module_stack": dict(at.meta.get("nn_module_stack", {})), "panther_origin": origin}
            set_val(new, ctx.fake_mode)
            env[n] = new
    return out


def expand_fused(ctx) -> None:
    """Expand every call of :data:`EXPANSIONS` whose arguments allow it (see the module docstring)."""
    opts = ctx.options
    if not (opts.linear or opts.attention) or ctx.fake_mode is None:
        return
    for node in list(ctx.graph.nodes):
        for name, target, match in EXPANSIONS:
            if node.op != "call_function" or node.target is not target:
                continue
            counters["expand"][f"{name}:matched"] += 1
            found, why = match(node)
            if found is None:
                ctx.report.notes.append(f"{node.name}: {why}")
                counters["expand"][f"{name}:kept"] += 1
                break
            fn, tensors, consts, getitem_users = found
            try:
                out = _inline(ctx, node, fn, tensors, consts, name)
            except Exception as e:  # the fused call stays: nothing below depends on it
                if opts.strict:
                    raise
                ctx.report.notes.append(f"{node.name}: expansion of {name} failed ({type(e).__name__}: {e}); kept fused")
                counters["expand"][f"{name}:kept"] += 1
                break
            if getitem_users is None:
                node.replace_all_uses_with(out)
            else:
                for user in getitem_users:
                    user.replace_all_uses_with(out)
                    ctx.graph.erase_node(user)
            ctx.graph.erase_node(node)
            counters["expand"][f"{name}:expanded"] += 1
            break
