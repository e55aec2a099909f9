"""``SKConv2d``: a 2-D convolution whose kernel is held as a two-sided random sketch."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from panther._validation import autocast_cast, autocast_dtype, autocast_off, check_bool, check_choice, check_generator, check_input, check_int, check_tensor, warn_budget
from panther.sketch import sign_matrix
from panther.ops.conv import skconv2d_apply


def _pair(name: str, value: Any, *, minimum: int) -> tuple[int, int]:
    """``value`` as an (h, w) pair of ints ``>= minimum``; an int means the same for both."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (check_int(f"{name}[0]", value[0], minimum=minimum), check_int(f"{name}[1]", value[1], minimum=minimum))
    v = check_int(name, value, minimum=minimum)
    return (v, v)


class SKConv2d(nn.Module):
    r"""Sketched 2-D convolution: a drop-in for ``nn.Conv2d`` (groups=1, dilation=1, zero padding).

    View the dense kernel W (out, C, kh, kw) as Wt = W.reshape(out, C·kh·kw)ᵀ. With
    L = ``num_terms`` and k = ``low_rank``, the layer keeps fixed random sign matrices
    U1ᵢ (k×out) and U2ᵢ (C·kh·kw×k) with entries ±1/√k (buffers) and trains the sketches
    S1ᵢ = Wt·U1ᵢᵀ and S2ᵢ = U2ᵢᵀ·Wt. On every image patch p it computes

    .. math::  y = \frac{1}{2L}\sum_i \left(p\,S1_i\,U1_i + p\,U2_i\,S2_i\right) + b,

    an unbiased estimate of the dense conv, as one conv with 2Lk output channels followed by a
    1×1 projection (``torch.ops.panther.skconv2d``).

    Stored tensors (see ``panther.ops.conv``): ``S1s`` and ``U2s`` (L, k, C, kh, kw) hold
    S1ᵢᵀ and U2ᵢᵀ in conv-kernel form; ``U1s`` and ``S2s`` are (L, k, out); ``bias`` (out,).

    Args:
        in_channels (int): C, channels of the input.
        out_channels (int): channels of the output.
        kernel_size (int or (int, int)): kh, kw.
        stride (int or (int, int)): as in ``nn.Conv2d``. Default: 1.
        padding (int, (int, int), "same" or "valid"): zero padding, as in ``nn.Conv2d``
            ("same" needs stride 1). Default: 0.
        bias (bool): add a learnable bias. Default: True.
        num_terms (int): L, number of sketch terms. Default: 1.
        low_rank (int): k, rank of each term. Default: 64.
        W_init (Tensor, optional): dense kernel (out, C, kh, kw) to sketch. Default: drawn like
            ``nn.Conv2d``'s (Kaiming uniform, a=√5); the bias is always drawn like
            ``nn.Conv2d``'s (uniform ±1/√(C·kh·kw)).
        dtype (torch.dtype, optional): parameter dtype. Default: torch's default dtype.
        device (torch.device, optional): parameter device. Default: W_init's device, else
            torch's default device.
        generator (torch.Generator, optional, keyword-only): source of all random draws (they
            happen on its device). Default: the global RNG of the target device, so
            ``torch.manual_seed`` reproduces a layer.

    Shapes: input (N, C, H, W) or (C, H, W); output (N, out, Ho, Wo) or (out, Ho, Wo), with Ho, Wo
    as for ``nn.Conv2d``.

    Raises:
        TypeError / ValueError: at construction, for a non-positive channel count, num_terms or
            low_rank, a bad kernel_size/stride/padding, or a W_init of the wrong shape; in
            forward, for an input of the wrong rank, channel count, dtype or device.

    Warns:
        UserWarning: when 2·L·k·(C·kh·kw + out) >= C·kh·kw·out (no memory is saved).

    Example:
        >>> import torch, panther as pr
        >>> layer = pr.nn.SKConv2d(64, 128, kernel_size=3, padding=1, num_terms=1, low_rank=16)
        >>> layer(torch.randn(2, 64, 28, 28)).shape
        torch.Size([2, 128, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        num_terms: int = 1,
        low_rank: int = 64,
        W_init: Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, minimum=1)
        self.stride = _pair("stride", stride, minimum=1)
        self.num_terms = check_int("num_terms", num_terms)
        self.low_rank = check_int("low_rank", low_rank)
        check_bool("bias", bias)
        check_generator(generator)

        kh, kw = self.kernel_size
        # The op pads symmetrically; "same" with an even kernel also needs one extra row/column
        # at the bottom/right, which forward adds with F.pad (as nn.Conv2d does).
        self._input_pad: tuple[int, int, int, int] | None = None
        if isinstance(padding, str):
            self.padding: tuple[int, int] | str = check_choice("padding", padding, ("same", "valid"))
            if padding == "same":
                if self.stride != (1, 1):
                    raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
                self._op_padding = [(kh - 1) // 2, (kw - 1) // 2]
                if (kh - 1) % 2 or (kw - 1) % 2:
                    self._input_pad = (0, (kw - 1) % 2, 0, (kh - 1) % 2)
            else:
                self._op_padding = [0, 0]
        else:
            self.padding = _pair("padding", padding, minimum=0)
            self._op_padding = list(self.padding)

        C, n_out, L, k = self.in_channels, self.out_channels, self.num_terms, self.low_rank
        n_in = C * kh * kw
        if W_init is not None:
            check_tensor("W_init", W_init)
            if tuple(W_init.shape) != (n_out, C, kh, kw):
                raise ValueError(
                    f"W_init must have shape (out_channels, in_channels, kh, kw) = {(n_out, C, kh, kw)}, "
                    f"got {tuple(W_init.shape)}"
                )
            if not W_init.is_floating_point():
                raise TypeError(f"W_init must be a floating-point tensor, got {W_init.dtype}")
        if dtype is None:
            dtype = torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if device is None:
            device = W_init.device if W_init is not None else torch.get_default_device()
        device = torch.device(device)
        warn_budget("SKConv2d", L, k, n_in, n_out)

        factory = {"device": device, "dtype": dtype}
        self.S1s = nn.Parameter(torch.empty(L, k, C, kh, kw, **factory))
        self.S2s = nn.Parameter(torch.empty(L, k, n_out, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(n_out, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("U1s", torch.empty(L, k, n_out, **factory))
        self.register_buffer("U2s", torch.empty(L, k, C, kh, kw, **factory))
        self._draw(W_init, generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw everything again as a fresh layer does (Kaiming-uniform dense kernel, its bias,
        new sign sketches), in place: e.g. after ``to_empty`` on a layer built on the meta device."""
        self._draw(None, check_generator(generator))

    @torch.no_grad()
    def _draw(self, W_init: Tensor | None, generator: torch.Generator | None) -> None:
        device, dtype = self.S1s.device, self.S1s.dtype
        L, k, C, kh, kw = self.S1s.shape
        n_out, n_in = self.out_channels, C * kh * kw
        # Draws happen on the generator's device, else on the target device's global RNG (as
        # SKLinear and panther.sketch do). The sketches are formed in at least fp32 from the sign
        # matrices as rounded to the parameter dtype.
        rng_device = generator.device if generator is not None else device
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if W_init is None:
            W = torch.empty(n_out, C, kh, kw, dtype=work, device=rng_device)
            nn.init.kaiming_uniform_(W, a=math.sqrt(5), generator=generator)
        else:
            W = W_init.detach()
        if self.bias is not None:
            bound = 1.0 / math.sqrt(n_in)
            self.bias.copy_(torch.empty(n_out, dtype=work, device=rng_device).uniform_(-bound, bound, generator=generator))
        U1 = sign_matrix(k, n_out, num=L, generator=generator, device=device, dtype=dtype)  # (L, k, out)
        U2 = sign_matrix(k, n_in, num=L, generator=generator, device=device, dtype=dtype)  # (L, k, C·kh·kw)

        Wf = W.to(device=device, dtype=work).reshape(n_out, n_in)
        self.S1s.copy_((U1.to(work) @ Wf).reshape(L, k, C, kh, kw))  # S1ᵢᵀ = U1ᵢ·W
        self.S2s.copy_(U2.to(work) @ Wf.t())  # (L, k, out): S2ᵢ = U2ᵢᵀ·Wt
        self.U1s.copy_(U1)
        self.U2s.copy_(U2.reshape(L, k, C, kh, kw))

    @classmethod
    def from_conv2d(
        cls, conv: nn.Conv2d, num_terms: int, low_rank: int, *, generator: torch.Generator | None = None
    ) -> "SKConv2d":
        """Sketch a trained ``nn.Conv2d``: same shapes, stride, padding, dtype and device; bias copied.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: ``conv`` has groups != 1, dilation != 1 or padding_mode != "zeros".
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"SKConv2d.from_conv2d needs groups=1, got groups={conv.groups}")
        if tuple(conv.dilation) != (1, 1):
            raise ValueError(f"SKConv2d.from_conv2d needs dilation=1, got dilation={tuple(conv.dilation)}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SKConv2d.from_conv2d needs padding_mode='zeros', got {conv.padding_mode!r}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
            num_terms=num_terms,
            low_rank=low_rank,
            W_init=conv.weight.detach(),
            dtype=conv.weight.dtype,
            device=conv.weight.device,
            generator=generator,
        )
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("input", x)
        if x.dim() not in (3, 4):
            raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
        # Under torch.autocast the input and the sketch run in its dtype, as nn.Conv2d's do.
        dt = autocast_dtype(x)
        check_input("input", x, last_dim=self.in_channels, dim_index=-3, dim_label="channels", like=self.S1s, autocast=dt)
        x, S1s, S2s, U1s, U2s, bias = autocast_cast(dt, x, self.S1s, self.S2s, self.U1s, self.U2s, self.bias)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._input_pad is not None:
            x = F.pad(x, self._input_pad)
        for size, pad, kern, axis in zip(x.shape[2:], self._op_padding, self.kernel_size, ("height", "width")):
            if size + 2 * pad < kern:
                raise ValueError(
                    f"input {axis} {size} (+ padding {2 * pad}) is smaller than the kernel ({kern}); "
                    f"input shape {tuple(x.shape)}"
                )
        with autocast_off(x, dt):
            y = skconv2d_apply(x, S1s, S2s, U1s, U2s, bias, list(self.stride), self._op_padding)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, bias={self.bias is not None}, num_terms={self.num_terms}, "
            f"low_rank={self.low_rank}"
        )
