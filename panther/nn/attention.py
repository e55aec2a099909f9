"""Random-feature multi-head attention: :class:`RandMultiHeadAttention` (Performer / FAVOR+)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panther._validation import (
    autocast_cast,
    autocast_dtype,
    autocast_off,
    check_bool,
    check_choice,
    check_dtype,
    check_float,
    check_generator,
    check_input,
    check_int,
    check_tensor,
)
from panther.features import orthogonal_random_features
from panther.ops.attention import performer_attention_apply

from .pawXimpl import sinSRPE

__all__ = ["RandMultiHeadAttention"]

KERNEL_FNS = ("softmax", "relu")


@torch.no_grad()
def _init_(param: Tensor, init, generator: torch.Generator | None, shape: tuple[int, ...] | None = None) -> None:
    """Fill ``param`` with ``init(tensor, generator=generator)``, drawn on the generator's device.

    ``shape`` lets the draw use another shape of the same size (nn.MultiheadAttention draws the
    three input projections as one packed (3E, E) matrix, which sets xavier's fan-out).
    """
    device = param.device if generator is None else generator.device
    t = torch.empty(shape or param.shape, device=device, dtype=param.dtype)
    init(t, generator=generator)
    param.copy_(t.reshape(param.shape))


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention with random-feature (Performer / FAVOR+) kernels: linear in sequence length.

    Queries, keys and values are projected as in ``nn.MultiheadAttention`` and split into
    ``num_heads`` heads of size ``D = embed_dim // num_heads``. Each head then computes

    .. math::

        \text{out}_i = \frac{\sum_j \varphi(q_i)\cdot\varphi(k_j)\, v_j}{\sum_j \varphi(q_i)\cdot\varphi(k_j)}

    over all keys ``j`` (or ``j ≤ i`` when ``iscausal``) in O(N·m·D) time and memory, never
    forming the N×N attention matrix. ``φ`` maps to ``m = num_random_features`` features with a
    fixed random projection ``ω`` (buffer ``omega``, shape (num_heads, m, D)) of orthogonal,
    Haar-rotated rows (:func:`panther.features.orthogonal_random_features`):

    * ``"softmax"``: positive random features, ``E[φ(q)·φ(k)] = exp(q·k/√D)``, so the output
      approximates softmax attention and converges to it as ``m`` grows;
    * ``"relu"``: ``φ(x) = relu(ω·x/D^¼)/√m + 10⁻³``, a different (non-softmax) kernel.

    The math, with its numerical stabilizers, is in ``kernels/performer/README.md``.

    **attention_mask** is a key padding mask of shape (batch, key_seq): 1/True means attend,
    0/False means ignore. Masked keys contribute nothing; the result equals running on the
    sequence with those keys removed. A query whose visible keys are all masked outputs the
    output projection's bias.

    **dropout** acts only in training mode (``module.train()``), on the values: each (batch,
    head, key) value row is zeroed with probability ``p`` and the survivors are scaled by
    ``1/(1−p)``, while the normalizer still sums over all keys. That is exactly dropping whole
    key columns of the attention matrix, so the expected output equals the output without
    dropout. (Dropping single attention entries, as ``nn.MultiheadAttention`` does, would need
    the N×N matrix.) In eval mode the layer is deterministic.

    **SRPE**: an optional :class:`~panther.nn.pawXimpl.sinSRPE` that maps each head's queries and
    keys to ``R = num_realizations``-dimensional codes before the feature map, so that attention
    weighs ``q·k`` by a learnable function of the relative position; ``omega`` is then
    (num_heads, m, R). The temperature stays ``1/√D``.

    Args:
        embed_dim: model dimension ``E``; must be divisible by ``num_heads``.
        num_heads: number of heads (> 0).
        num_random_features: number of random features ``m`` per head (> 0).
        dropout: dropout probability in [0, 1), see above. Default: 0.0.
        bias: learn biases in the input and output projections. Default: True.
        kernel_fn: ``"softmax"`` or ``"relu"``. Default: ``"softmax"``.
        iscausal: no output depends on a later position (needs equal query and key lengths).
            Default: False.
        SRPE: optional :class:`~panther.nn.pawXimpl.sinSRPE` with ``num_heads`` heads and
            ``perHead_in = embed_dim // num_heads``, on the layer's device and dtype.
        device, dtype: of the parameters and buffers.
        kdim, vdim: feature sizes of key and value inputs. Default: ``embed_dim``.
        generator: optional ``torch.Generator`` for every random draw (weight init and ``omega``).
            Default: torch's global RNG, so ``torch.manual_seed`` reproduces construction.

    Shape:
        query (..., Nq, E), key (..., Nk, kdim), value (..., Nk, vdim) with the same leading
        (batch) dimensions, usually (batch, seq, embed); attention_mask (..., Nk).
        Output (..., Nq, E).

    Raises:
        TypeError / ValueError: bad constructor arguments (non-positive sizes, ``embed_dim`` not
            divisible by ``num_heads``, unknown ``kernel_fn``, ``dropout`` outside [0, 1), an
            ``SRPE`` that is not a matching sinSRPE); in ``forward``, inputs of the wrong rank,
            feature size, dtype or device, mismatched batch dimensions, causal attention over
            different query and key lengths, or a mask of the wrong shape, device or values.

    Example:
        >>> import torch
        >>> from panther.nn import RandMultiHeadAttention
        >>> attn = RandMultiHeadAttention(embed_dim=64, num_heads=4, num_random_features=128)
        >>> x = torch.randn(2, 10, 64)
        >>> out, weights = attn(x, x, x)
        >>> out.shape, weights
        (torch.Size([2, 10, 64]), None)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_random_features: int,
        dropout: float = 0.0,
        bias: bool = True,
        kernel_fn: str = "softmax",
        iscausal: bool = False,
        SRPE: sinSRPE | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = check_int("embed_dim", embed_dim)
        self.num_heads = check_int("num_heads", num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        self.head_dim = self.embed_dim // self.num_heads
        self.num_random_features = check_int("num_random_features", num_random_features)
        self.dropout = check_float("dropout", dropout, low=0.0, high=1.0)
        bias = check_bool("bias", bias)
        self.kernel_fn = check_choice("kernel_fn", kernel_fn, KERNEL_FNS)
        self.iscausal = check_bool("iscausal", iscausal)
        self.kdim = self.embed_dim if kdim is None else check_int("kdim", kdim)
        self.vdim = self.embed_dim if vdim is None else check_int("vdim", vdim)
        check_dtype(dtype)
        generator = check_generator(generator)
        self.scale = 1.0 / math.sqrt(self.head_dim)

        E = self.embed_dim
        # skip_init leaves the module on "meta" when given device=None: resolve the default here.
        device = torch.get_default_device() if device is None else torch.device(device)
        factory = {"bias": bias, "device": device, "dtype": dtype}
        # skip_init: no draw from the global RNG here; _reset_parameters draws once, as asked.
        self.q_proj = nn.utils.skip_init(nn.Linear, E, E, **factory)
        self.k_proj = nn.utils.skip_init(nn.Linear, self.kdim, E, **factory)
        self.v_proj = nn.utils.skip_init(nn.Linear, self.vdim, E, **factory)
        self.out_proj = nn.utils.skip_init(nn.Linear, E, E, **factory)
        like = self.q_proj.weight

        if SRPE is not None:
            if not isinstance(SRPE, sinSRPE):
                raise TypeError(f"SRPE must be a panther.nn.pawXimpl.sinSRPE or None, got {type(SRPE).__name__}")
            if SRPE.num_heads != self.num_heads or SRPE.perHead_in != self.head_dim:
                raise ValueError(
                    f"SRPE has num_heads={SRPE.num_heads}, perHead_in={SRPE.perHead_in}, but the layer "
                    f"needs num_heads={self.num_heads}, perHead_in={self.head_dim} (embed_dim // num_heads)"
                )
            if SRPE.Z1.dtype != like.dtype or SRPE.Z1.device != like.device:
                raise ValueError(
                    f"SRPE is {SRPE.Z1.dtype} on {SRPE.Z1.device}, but the layer is {like.dtype} on "
                    f"{like.device}; build both with the same device and dtype"
                )
        self.SRPE = SRPE
        feature_dim = self.head_dim if SRPE is None else SRPE.num_realizations
        self.register_buffer(
            "omega", torch.empty(self.num_heads, self.num_random_features, feature_dim, dtype=like.dtype, device=like.device)
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialize the projections as ``nn.MultiheadAttention`` does and draw a fresh ``omega``,
        as a new layer does: e.g. after ``to_empty`` on a layer built on the meta device. An
        ``SRPE`` module is its own (``sinSRPE.reset_parameters``)."""
        check_generator(generator)
        self._reset_parameters(generator)
        self.redraw_features(generator)

    def _reset_parameters(self, generator: torch.Generator | None) -> None:
        """Initialize as ``nn.MultiheadAttention`` does: xavier-uniform inputs, zero biases."""
        E = self.embed_dim
        if self.kdim == E and self.vdim == E:  # packed (3E, E) draw, as nn.MultiheadAttention
            packed = torch.empty(3 * E, E, dtype=self.q_proj.weight.dtype, device=self.q_proj.weight.device)
            _init_(packed, nn.init.xavier_uniform_, generator)
            for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), packed.chunk(3)):
                with torch.no_grad():
                    proj.weight.copy_(w)
        else:
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                _init_(proj.weight, nn.init.xavier_uniform_, generator)
        _init_(self.out_proj.weight, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)), generator)  # as nn.Linear
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh ``omega`` from ``generator`` (default: the global RNG), in place."""
        H, m, d = self.omega.shape
        self.omega.copy_(
            orthogonal_random_features(
                H, m, d, generator=check_generator(generator), device=self.omega.device, dtype=self.omega.dtype
            )
        )

    def _key_mask(self, attention_mask: Tensor, key: Tensor) -> Tensor:
        """Validate the (..., Nk) mask and return it as bool, True = attend."""
        check_tensor("attention_mask", attention_mask)
        if attention_mask.shape != key.shape[:-1]:
            raise ValueError(
                f"attention_mask must have shape (batch, key_seq) = {tuple(key.shape[:-1])}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.device != key.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, but the inputs are on {key.device}")
        if attention_mask.dtype == torch.bool:
            return attention_mask
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool or hold 0/1, got dtype {attention_mask.dtype}")
        # (A data-dependent check: skipped while torch.compile traces, where it would break the graph.)
        if not torch.compiler.is_compiling() and not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError(
                "attention_mask must be bool or hold only 0 and 1 (1/True = attend); additive "
                "masks (0/-inf) are not supported"
            )
        return attention_mask != 0

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, None]:
        """Attend from ``query`` to ``key``/``value``; returns ``(output, None)`` (no weights are formed).

        Args:
            query: (..., Nq, embed_dim).
            key: (..., Nk, kdim), the same leading dimensions as ``query``.
            value: (..., Nk, vdim).
            attention_mask: optional (..., Nk) key mask, bool or 0/1, 1/True = attend.

        Returns:
            ``(output, None)`` with output (..., Nq, embed_dim).
        """
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, t)
        # Under torch.autocast the whole layer runs in its dtype, as nn.MultiheadAttention does
        # (the projections cast themselves; the attention op is cast here).
        dt = autocast_dtype(query)
        like = self.omega  # dtype and device of the layer (its projections may be low-rank modules)
        check_input("query", query, last_dim=self.embed_dim, min_ndim=2, like=like, autocast=dt)
        check_input("key", key, last_dim=self.kdim, min_ndim=2, like=like, autocast=dt)
        check_input("value", value, last_dim=self.vdim, min_ndim=2, like=like, autocast=dt)
        query, key, value, omega = autocast_cast(dt, query, key, value, self.omega)
        lead, Nq, Nk = query.shape[:-2], query.shape[-2], key.shape[-2]
        if key.shape[:-2] != lead:
            raise ValueError(
                f"query and key must have the same batch dimensions, got query {tuple(query.shape)} "
                f"and key {tuple(key.shape)}"
            )
        if value.shape[:-1] != key.shape[:-1]:
            raise ValueError(
                f"key and value must have the same batch and sequence dimensions, got key "
                f"{tuple(key.shape)} and value {tuple(value.shape)}"
            )
        if self.iscausal and Nq != Nk:
            raise ValueError(f"causal attention needs equal query and key lengths, got {Nq} and {Nk}")
        mask = None if attention_mask is None else self._key_mask(attention_mask, key)

        B, H, D = math.prod(lead), self.num_heads, self.head_dim

        def heads(x: Tensor, n: int) -> Tensor:  # (B·, n, E) -> (B, H, n, D)
            return x.reshape(B, n, H, D).transpose(1, 2)

        q = heads(self.q_proj(query), Nq)
        k = heads(self.k_proj(key), Nk)
        v = heads(self.v_proj(value), Nk)
        if self.SRPE is not None:
            q, k = self.SRPE(q, k)
        q, k, v = autocast_cast(dt, q, k, v)
        if self.training and self.dropout > 0:
            # Drop whole value rows per (batch, head, key): see the class docstring.
            v = v * F.dropout(torch.ones_like(v[..., :1]), self.dropout, training=True)
        if mask is not None:
            mask = mask.reshape(B, Nk)
        with autocast_off(q, dt):
            out = performer_attention_apply(q, k, v, omega, mask, self.kernel_fn, self.iscausal, self.scale)
        out = out.transpose(1, 2).reshape(*lead, Nq, self.embed_dim)
        return self.out_proj(out), None

    @classmethod
    def from_mha(
        cls,
        mha: nn.MultiheadAttention,
        num_random_features: int,
        kernel_fn: str = "softmax",
        *,
        iscausal: bool = False,
        SRPE: sinSRPE | None = None,
        dropout: float | None = None,
        generator: torch.Generator | None = None,
    ) -> RandMultiHeadAttention:
        """A :class:`RandMultiHeadAttention` with the projections (weights and biases) of ``mha``.

        The result computes ``mha``'s function with exact softmax attention replaced by its
        random-feature estimate; with ``kernel_fn="softmax"`` it approaches ``mha`` as
        ``num_random_features`` grows. It lives on ``mha``'s device and dtype. Only fresh random
        features are drawn (from ``generator``, or the global RNG).

        Args:
            mha: a ``nn.MultiheadAttention`` built with ``batch_first=True`` (the layout this
                layer uses), without ``add_bias_kv`` or ``add_zero_attn``. ``kdim``/``vdim``
                are carried over.
            num_random_features: ``m`` (> 0).
            kernel_fn: ``"softmax"`` (approximates ``mha``) or ``"relu"``.
            iscausal: causal attention (``nn.MultiheadAttention`` takes this per call instead).
            SRPE: optional sinSRPE, as in the constructor.
            dropout: dropout probability. Default: ``mha.dropout`` (applied as described in the
                class docstring, not per attention entry).
            generator: optional ``torch.Generator`` for the random features.

        Raises:
            TypeError: ``mha`` is not an ``nn.MultiheadAttention``.
            ValueError: ``mha`` is not batch-first, or uses ``add_bias_kv`` / ``add_zero_attn``;
                and anything the constructor raises.

        Example:
            >>> import torch
            >>> from panther.nn import RandMultiHeadAttention
            >>> mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
            >>> attn = RandMultiHeadAttention.from_mha(mha, num_random_features=256)
            >>> x = torch.randn(2, 10, 64)
            >>> attn(x, x, x)[0].shape
            torch.Size([2, 10, 64])
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha.batch_first:
            raise ValueError(
                "from_mha needs nn.MultiheadAttention(batch_first=True): RandMultiHeadAttention takes "
                "(batch, seq, embed) inputs, so converting a seq-first module would silently change "
                "the layout its callers use"
            )
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError("from_mha does not support nn.MultiheadAttention(add_bias_kv=True)")
        if mha.add_zero_attn:
            raise ValueError("from_mha does not support nn.MultiheadAttention(add_zero_attn=True)")
        w_out = mha.out_proj.weight
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            num_random_features,
            dropout=mha.dropout if dropout is None else dropout,
            bias=mha.out_proj.bias is not None,
            kernel_fn=kernel_fn,
            iscausal=iscausal,
            SRPE=SRPE,
            device=w_out.device,
            dtype=w_out.dtype,
            kdim=mha.kdim,
            vdim=mha.vdim,
            generator=generator,
        )
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip((layer.q_proj, layer.k_proj, layer.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            layer.out_proj.weight.copy_(w_out)
            if mha.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer

    def extra_repr(self) -> str:
        s = (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_random_features={self.num_random_features}, dropout={self.dropout}, "
            f"kernel_fn={self.kernel_fn!r}, iscausal={self.iscausal}"
        )
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        return s
