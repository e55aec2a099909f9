"""Trainable low-rank layers: :class:`LowRankLinear` and :class:`LowRankConv2d`.

They hold a rank-r factorization of a dense weight as two trainable factors, the form in which
a truncated SVD, a randomized SVD or a data-aware factorization of a *trained* weight is best
kept (:func:`panther.convert` swaps them in). :class:`~panther.nn.SKLinear` instead trains the
sketches ``S1, S2`` against fixed random sign matrices: right for a random sketch, but an SVD's
singular directions cannot be written into it without losing what they bought (its fixed
``U`` matrices only average back to the weight in expectation).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from panther._validation import (
    autocast_cast,
    autocast_dtype,
    autocast_off,
    check_bool,
    check_choice,
    check_dtype,
    check_generator,
    check_input,
    check_int,
    check_tensor,
)
from panther.ops.linear import lowrank_linear_apply

__all__ = ["LowRankLinear", "LowRankConv2d"]


def _check_factors(A: Any, B: Any, bias: Any, n_in: int | None = None) -> None:
    check_tensor("A", A)
    check_tensor("B", B)
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"A must be (in, r) and B (r, out) with the same r, got {tuple(A.shape)} and {tuple(B.shape)}")
    if not A.is_floating_point() or A.dtype != B.dtype:
        raise TypeError(f"A and B must be floating-point tensors of one dtype, got {A.dtype} and {B.dtype}")
    if n_in is not None and A.shape[0] != n_in:
        raise ValueError(f"A must have {n_in} rows (the layer's input size), got {tuple(A.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (B.shape[1],):
            raise ValueError(f"bias must have shape ({B.shape[1]},), got {tuple(bias.shape)}")


class LowRankLinear(nn.Module):
    r"""Linear layer with a trainable rank-r weight: ``y = (x·A)·B + b``, ``A`` (in × r), ``B`` (r × out).

    Holds ``r·(in + out)`` weight parameters instead of ``in·out`` and costs ``2·T·r·(in + out)``
    FLOPs for ``T`` rows. The forward and backward are ``torch.ops.panther.lowrank_linear``, the
    op (and Triton kernels on CUDA) the compiler backend emits for a rewritten linear layer; eager
    calls on CUDA launch the same kernels without the op's dispatch layers.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        rank: r (> 0).
        bias: learn an additive bias. Default: True.
        dtype, device: of the parameters.
        generator: optional ``torch.Generator`` for the initialization. Default: the global RNG.

    The initialization is that of two stacked ``nn.Linear`` (in → r → out, Kaiming uniform); use
    :meth:`from_linear` or :meth:`from_factors` to start from a trained weight.

    Shape:
        input (..., in_features); output (..., out_features).

    Raises:
        TypeError / ValueError: non-positive sizes; in ``forward``, an input whose last dim is
            not ``in_features`` or whose dtype / device differ from the layer's.

    Example:
        >>> import torch, panther as pr
        >>> dense = torch.nn.Linear(256, 128)
        >>> layer = pr.nn.LowRankLinear.from_linear(dense, rank=32)
        >>> layer(torch.randn(4, 256)).shape
        torch.Size([4, 128])
        >>> sum(p.numel() for p in layer.parameters())  # 32·(256 + 128) + 128
        12416
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.rank = check_int("rank", rank)
        check_bool("bias", bias)
        check_dtype(dtype)
        check_generator(generator)
        factory = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.B = nn.Parameter(torch.empty(rank, out_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw A, B (Kaiming-uniform, each as an ``nn.Linear`` weight of its shape) and the bias
        again, in place: e.g. after ``to_empty`` on a layer built on the meta device."""
        check_generator(generator)
        At = torch.empty(self.rank, self.in_features, dtype=self.A.dtype, device=self.A.device)
        Bt = torch.empty(self.out_features, self.rank, dtype=self.B.dtype, device=self.B.device)
        nn.init.kaiming_uniform_(At, a=math.sqrt(5), generator=generator)
        nn.init.kaiming_uniform_(Bt, a=math.sqrt(5), generator=generator)
        self.A.copy_(At.t())
        self.B.copy_(Bt.t())
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias.uniform_(-bound, bound, generator=generator)

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """A layer computing ``(x·A)·B + bias`` (the tensors are copied; their dtype and device).

        Raises:
            TypeError / ValueError: A is not (in, r) or B not (r, out), mixed dtypes, or a bias
                that is not (out,).
        """
        _check_factors(A, B, bias)
        n_in, r = A.shape
        layer = cls(n_in, B.shape[1], r, bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        method: str = "svd",
        activations: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> LowRankLinear:
        """Factorize a trained ``nn.Linear`` with :func:`panther.linalg.lowrank` (bias copied).

        Args:
            linear: the dense layer.
            rank: r.
            method: ``"svd"``, ``"rsvd"``, ``"data-aware"`` (needs ``activations``: (T, in)
                inputs of the layer) or ``"sketch"``. Default ``"svd"``.
            activations: see ``method``.
            generator: for the random methods.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``; and what :func:`panther.linalg.lowrank` raises.
        """
        from panther.linalg import lowrank

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        A, B = lowrank(linear.weight.detach(), rank, method, activations=activations, generator=generator)
        return cls.from_factors(A, B, None if linear.bias is None else linear.bias.detach())

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) weight this layer applies: ``(A·B)ᵀ``."""
        return (self.A @ self.B).t()

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x)
        # Under torch.autocast the input and the factors run in its dtype, as nn.Linear's do.
        dt = autocast_dtype(x)
        check_input("x", x, last_dim=self.in_features, like=self.A, autocast=dt)
        x, A, B, bias = autocast_cast(dt, x, self.A, self.B, self.bias)
        with autocast_off(x, dt):
            return lowrank_linear_apply(x, A, B, bias, 1.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class LowRankConv2d(nn.Module):
    r"""2-D convolution with a trainable rank-r kernel: a conv into r channels, then a 1×1 conv.

    With the dense kernel W (out, C, kh, kw) flattened to W₂ (out × C·kh·kw) ≈ (A·B)ᵀ, the
    layer computes ``conv2d(conv2d(x, K1, stride, padding), K2) + b`` with ``K1 = Aᵀ`` as r
    kernels (r, C, kh, kw) and ``K2 = Bᵀ`` as a 1×1 projection (out, r, 1, 1): on every image
    patch ``p`` that is ``p·A·B + b``, the rank-r replacement the compiler backend emits for a
    conv (and the form of :class:`~panther.nn.SKConv2d`, whose factors are a random sketch).
    It holds ``r·(C·kh·kw + out)`` weight parameters instead of ``out·C·kh·kw``.

    Submodules: ``reduce`` (an ``nn.Conv2d(C, r, kernel_size, stride, padding, bias=False,
    padding_mode=...)``) and ``expand`` (an ``nn.Conv2d(r, out, 1, bias=bias)``): every stride,
    padding (including "same" / "valid") and padding mode of ``nn.Conv2d`` works.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias, padding_mode: as in
            ``nn.Conv2d`` (groups and dilation are 1).
        rank: r (> 0).
        dtype, device: of the parameters.
        generator: optional ``torch.Generator`` for the initialization (that of ``nn.Conv2d``
            for both convolutions). Default: the global RNG.

    Shape:
        as ``nn.Conv2d``: (N, C, H, W) or (C, H, W) in, (N, out, Ho, Wo) or (out, Ho, Wo) out.

    Example:
        >>> import torch, panther as pr
        >>> conv = torch.nn.Conv2d(32, 64, 3, padding=1)
        >>> layer = pr.nn.LowRankConv2d.from_conv2d(conv, rank=16)
        >>> layer(torch.randn(2, 32, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        padding_mode: str = "zeros",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.rank = check_int("rank", rank)
        check_choice("padding_mode", padding_mode, ("zeros", "reflect", "replicate", "circular"))
        check_bool("bias", bias)
        check_dtype(dtype)
        check_generator(generator)
        factory = {"dtype": dtype, "device": device if device is not None else torch.get_default_device()}
        # With a generator the convs are built uninitialized (no draw from the global RNG) and
        # then given nn.Conv2d.reset_parameters' distributions from the caller's generator.
        make = nn.Conv2d if generator is None else functools.partial(nn.utils.skip_init, nn.Conv2d)
        self.reduce = make(in_channels, rank, kernel_size, stride, padding, bias=False, padding_mode=padding_mode, **factory)
        self.expand = make(rank, out_channels, 1, bias=bias, **factory)
        self.in_channels, self.out_channels = in_channels, out_channels
        if generator is not None:
            with torch.no_grad():
                for conv in (self.reduce, self.expand):
                    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
                    if conv.bias is not None:
                        bound = 1.0 / math.sqrt(conv.weight[0].numel())
                        conv.bias.uniform_(-bound, bound, generator=generator)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, A: Tensor, B: Tensor) -> LowRankConv2d:
        """The rank-r replacement of ``conv`` for factors A (C·kh·kw × r), B (r × out) of its
        flattened kernel (``conv``'s stride, padding, padding mode and bias are kept; tensors
        are copied, in A's dtype and device).

        Raises:
            TypeError / ValueError: ``conv`` is not an ``nn.Conv2d`` with groups = dilation = 1, or
                the factors do not fit it.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            raise ValueError(f"LowRankConv2d needs groups=1 and dilation=1, got groups={conv.groups}, dilation={conv.dilation}")
        C, (kh, kw) = conv.in_channels, conv.kernel_size
        _check_factors(A, B, None, n_in=C * kh * kw)
        if B.shape[1] != conv.out_channels:
            raise ValueError(f"B must have {conv.out_channels} columns (out_channels), got {tuple(B.shape)}")
        r = A.shape[1]
        layer = cls(
            C, conv.out_channels, conv.kernel_size, r, stride=conv.stride, padding=conv.padding,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, dtype=A.dtype, device=A.device,
        )
        with torch.no_grad():
            layer.reduce.weight.copy_(A.t().reshape(r, C, kh, kw))
            layer.expand.weight.copy_(B.t().reshape(conv.out_channels, r, 1, 1))
            if conv.bias is not None:
                layer.expand.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        rank: int,
        method: str = "svd",
        activations: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> LowRankConv2d:
        """Factorize a trained ``nn.Conv2d``'s flattened kernel with :func:`panther.linalg.lowrank`.

        ``activations`` (for ``method="data-aware"``) are the conv's input patches, rows of
        ``C·kh·kw`` in the kernel's order (``F.unfold(x, kernel_size, ...)`` transposed).
        """
        from panther.linalg import lowrank

        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        W = conv.weight.detach()
        A, B = lowrank(W.reshape(W.shape[0], -1), rank, method, activations=activations, generator=generator)
        return cls.from_factors(conv, A, B)

    def dense_weight(self) -> Tensor:
        """The (out, C, kh, kw) kernel this layer applies."""
        K1 = self.reduce.weight.reshape(self.rank, -1)
        K2 = self.expand.weight.reshape(self.out_channels, self.rank)
        return (K2 @ K1).reshape(self.out_channels, self.in_channels, *self.reduce.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.reduce(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
