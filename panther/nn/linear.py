"""Sketched linear layers: :class:`SKLinear` and :class:`SKLinear_triton`."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from panther._validation import autocast_cast, autocast_dtype, autocast_off, check_bool, check_dtype, check_generator, check_input, check_int, check_tensor, warn_budget
from panther.ops.linear import sklinear_apply
from panther.sketch import sign_matrix


class SKLinear(nn.Module):
    r"""Linear layer whose weight is a two-sided random sketch: ``y ≈ x·Wᵀ + b`` with fewer parameters.

    With ``W`` (out × in) the dense weight, ``L = num_terms`` and ``k = low_rank``, the layer keeps
    fixed random sign matrices ``U1ᵢ`` (k × out) and ``U2ᵢ`` (in × k) with entries ±1/√k
    (buffers) and learns ``S1ᵢ = Wᵀ·U1ᵢᵀ`` (in × k) and ``S2ᵢ = U2ᵢᵀ·Wᵀ`` (k × out):

    .. math::

        y = \frac{1}{2L} \sum_{i=1}^{L} \left(x S1_i U1_i + x U2_i S2_i\right) + b

    which is an unbiased estimate of ``x·Wᵀ`` (``E[U1ᵢᵀU1ᵢ] = I``, ``E[U2ᵢU2ᵢᵀ] = I``) holding
    ``2·L·k·(in+out)`` values instead of ``in·out`` (``L·k·(in+out)`` trainable, the rest fixed
    buffers). It is a rank-``2Lk`` product, so the forward costs ``2·T·2Lk·(in+out)`` FLOPs
    instead of ``2·T·in·out``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        num_terms: number of sketch terms ``L`` (> 0).
        low_rank: rank ``k`` of each term (> 0). Above ``min(in, out)`` is legal but only costs.
        W_init: optional dense weight to sketch, shape (out_features, in_features) as in
            ``nn.Linear``. Default: Kaiming-uniform, as ``nn.Linear`` initializes.
        bias: learn an additive bias. Default: True.
        dtype, device: of the parameters and buffers.
        generator: optional ``torch.Generator`` for every random draw (init and sketches).
            Default: torch's global RNG, so ``torch.manual_seed`` reproduces construction.

    Shape:
        input (..., in_features), including 1-D; output (..., out_features).

    Raises:
        TypeError / ValueError: non-int or non-positive sizes, a ``W_init`` that is not a tensor
            of shape (out_features, in_features); in ``forward``, an input whose last dim is not
            ``in_features`` or whose dtype/device differ from the layer's.

    Warns:
        UserWarning: when ``2·L·k·(in+out) >= in·out`` (the sketch saves no parameters).

    Example:
        >>> import torch, panther as pr
        >>> layer = pr.nn.SKLinear(512, 256, num_terms=2, low_rank=16)
        >>> layer(torch.randn(64, 512)).shape
        torch.Size([64, 256])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_terms: int,
        low_rank: int,
        W_init: Tensor | None = None,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.num_terms = check_int("num_terms", num_terms)
        self.low_rank = check_int("low_rank", low_rank)
        check_bool("bias", bias)
        check_dtype(dtype)
        if W_init is not None:
            check_tensor("W_init", W_init)
            if tuple(W_init.shape) != (out_features, in_features):
                raise ValueError(
                    f"W_init must have shape (out_features, in_features) = ({out_features}, {in_features}) "
                    f"as nn.Linear.weight does, got {tuple(W_init.shape)}"
                )
            if not W_init.is_floating_point():
                raise TypeError(f"W_init must be a floating-point tensor, got dtype {W_init.dtype}")
        check_generator(generator)
        warn_budget(type(self).__name__, num_terms, low_rank, in_features, out_features)

        factory = {"device": device, "dtype": dtype}
        L, k = self.num_terms, self.low_rank
        self.S1s = nn.Parameter(torch.empty(L, in_features, k, **factory))
        self.S2s = nn.Parameter(torch.empty(L, k, out_features, **factory))
        self.register_buffer("U1s", torch.empty(L, k, out_features, **factory))
        self.register_buffer("U2s", torch.empty(L, in_features, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._draw(W_init, generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw everything again as a fresh layer does (Kaiming-uniform dense weight, its bias,
        new sign sketches), in place: e.g. after ``to_empty`` on a layer built on the meta device."""
        self._draw(None, check_generator(generator))

    @torch.no_grad()
    def _draw(self, W_init: Tensor | None, generator: torch.Generator | None) -> None:
        device, param_dtype = self.S1s.device, self.S1s.dtype
        # Sketch in at least fp32 so that low-precision layers start from well-rounded factors.
        work = torch.float64 if param_dtype == torch.float64 else torch.float32
        L, k, n_in, n_out = self.num_terms, self.low_rank, self.in_features, self.out_features
        if W_init is None:
            W = torch.empty(n_out, n_in, device=device, dtype=work)
            nn.init.kaiming_uniform_(W, a=math.sqrt(5), generator=generator)
        else:
            W = W_init.detach().to(device=device, dtype=work)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(n_in)
            self.bias.copy_(torch.empty(n_out, device=device, dtype=work).uniform_(-bound, bound, generator=generator))
        U1s = sign_matrix(k, n_out, num=L, generator=generator, device=device, dtype=work)
        # U2ᵢ is (in × k) with the same ±1/√k entries: draw (k × in) and transpose.
        U2s = sign_matrix(k, n_in, num=L, generator=generator, device=device, dtype=work).transpose(1, 2).contiguous()
        self.S1s.copy_(torch.einsum("oi,lko->lik", W, U1s))  # Wᵀ·U1ᵢᵀ
        self.S2s.copy_(torch.einsum("lik,oi->lko", U2s, W))  # U2ᵢᵀ·Wᵀ
        self.U1s.copy_(U1s)
        self.U2s.copy_(U2s)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, num_terms: int, low_rank: int, *, generator: torch.Generator | None = None
    ) -> "SKLinear":
        """Sketch a dense ``nn.Linear`` (weight and bias copied; same dtype and device).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            num_terms,
            low_rank,
            W_init=w.detach(),
            bias=linear.bias is not None,
            dtype=w.dtype,
            device=w.device,
            generator=generator,
        )
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) weight this layer applies: ``(1/2L)·Σ (S1ᵢU1ᵢ + U2ᵢS2ᵢ)ᵀ``."""
        wt = (self.S1s @ self.U1s + self.U2s @ self.S2s).sum(0) / (2 * self.num_terms)
        return wt.t()

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x)
        # Under torch.autocast the input and the sketch run in its dtype, as nn.Linear's do.
        dt = autocast_dtype(x)
        check_input("x", x, last_dim=self.in_features, like=self.S1s, autocast=dt)
        x, S1s, S2s, U1s, U2s, bias = autocast_cast(dt, x, self.S1s, self.S2s, self.U1s, self.U2s, self.bias)
        with autocast_off(x, dt):
            return sklinear_apply(x, S1s, S2s, U1s, U2s, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_terms={self.num_terms}, low_rank={self.low_rank}, bias={self.bias is not None}"
        )


class SKLinear_triton(SKLinear):
    """:class:`SKLinear` that insists on the Triton kernels.

    Same arguments, parameters and function as :class:`SKLinear`. On a CUDA device the forward and
    backward run panther's fused Triton kernels (as ``SKLinear`` does there too). On any other
    device there is no Triton path: the layer computes the same function through the reference
    path and warns once per layer.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._warned_no_cuda = False

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda and not self._warned_no_cuda and not torch.compiler.is_compiling():
            self._warned_no_cuda = True
            warnings.warn(
                f"SKLinear_triton: input is on {x.device}, where there are no Triton kernels; "
                "computing the same function through the reference path",
                UserWarning,
                stacklevel=2,
            )
        return super().forward(x)
