r"""Positional encodings for :class:`panther.nn.RandMultiHeadAttention`: :class:`sinSRPE`.

The module name follows the API spec (``panther.nn.pawXimpl.sinSRPE``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from panther._validation import autocast_cast, autocast_dtype, check_dtype, check_generator, check_input, check_int, check_tensor

__all__ = ["sinSRPE"]

# Frequencies start log-spaced in [_F_MIN, _F_MAX] cycles per position: the slowest has a period
# of 10⁴ positions (so offsets up to a few thousand stay distinguishable), the fastest is the
# Nyquist frequency of integer positions.
_F_MIN = 1e-4
_F_MAX = 0.5


class sinSRPE(nn.Module):
    r"""Stochastic sinusoidal relative positional encoding (sineSPE of Liutkus et al., 2021).

    "Relative Positional Encoding for Transformers with Linear Complexity" (ICML 2021). It turns
    each head's queries and keys, ``q(t), k(t) ∈ ℝᴰ`` at position ``t``, into codes
    ``q̂(t), k̂(t) ∈ ℝᴿ`` whose dot product is, in expectation, a relative-position-weighted
    dot product:

    .. math::

        \mathbb{E}\,[\hat q(m) \cdot \hat k(n)] = \sum_{d=1}^{D} q_d(m)\, k_d(n)\, P_d(m - n),
        \qquad P_d(\tau) = \sum_{s=1}^{S} \lambda_{ds}^2 \cos(2\pi f_{ds}\tau + \theta_{ds}).

    Linear attention applied to the codes then realizes a relative positional encoding without
    forming the N×N attention matrix. With fixed Gaussian ``Z1, Z2`` of shape (H, D, S, R):

    .. math::

        \bar Q_d(t) &= R^{-1/2} \textstyle\sum_s \lambda_{ds}\,[\cos(2\pi f_{ds} t + \theta_{ds})\, Z1_{ds}
                        + \sin(2\pi f_{ds} t + \theta_{ds})\, Z2_{ds}] \\
        \bar K_d(t) &= R^{-1/2} \textstyle\sum_s \lambda_{ds}\,[\cos(2\pi f_{ds} t)\, Z1_{ds}
                        + \sin(2\pi f_{ds} t)\, Z2_{ds}] \\
        \hat q(t) &= \textstyle\sum_d q_d(t)\, \bar Q_d(t), \qquad \hat k(t) = \sum_d k_d(t)\, \bar K_d(t)

    (per head). ``q̂(t)`` depends only on ``q(t)`` and ``t``, so causality is preserved. The codes
    are computed along whichever of two orders holds the smaller intermediate: forming the
    batch-independent ``Q̄`` (H, N, D, R) and contracting it with ``q``, or ``[q·λcos, q·λsin] @
    [Z1; Z2]`` over a (…, H, N, 2·D·S) feature axis (which never forms an (N, D, R) tensor). Positions are ``0 … N−1`` for queries and for keys.

    Learnable (per head, dimension and sine): frequencies ``f`` (initialized log-spaced in
    [1e-4, 0.5] cycles per position, interleaved across dimensions), phases ``θ`` (initialized
    to 0) and gains ``λ`` (initialized to ``1/√S``, so ``P_d(0) = 1``). ``Z1`` and ``Z2`` are
    buffers, so a loaded ``state_dict`` reproduces the codes bit for bit; :meth:`redraw` draws new
    ones.

    Args:
        num_heads: number of heads ``H`` (> 0).
        perHead_in: per-head dimension ``D`` of queries and keys (> 0).
        sines: number of sinusoids ``S`` per dimension (> 0).
        num_realizations: code dimension ``R`` (> 0); the codes' dot product averages ``R``
            independent estimates.
        device, dtype: of the parameters and buffers.
        generator: optional ``torch.Generator`` for ``Z1, Z2``. Default: torch's global RNG.

    Shape:
        ``forward(q, k)``: q (..., H, Nq, D), k (..., H, Nk, D) (heads before positions, as
        :class:`~panther.nn.RandMultiHeadAttention` holds them) → (q̂, k̂) of shapes
        (..., H, Nq, R) and (..., H, Nk, R).

    Raises:
        TypeError / ValueError: non-int or non-positive sizes; in ``forward``, inputs of the wrong
            shape, dtype or device.

    Example:
        >>> import torch
        >>> from panther.nn.pawXimpl import sinSRPE
        >>> spe = sinSRPE(num_heads=2, perHead_in=8, sines=4, num_realizations=32)
        >>> q, k = torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
        >>> qh, kh = spe(q, k)
        >>> qh.shape, kh.shape
        (torch.Size([3, 2, 10, 32]), torch.Size([3, 2, 10, 32]))
    """

    def __init__(
        self,
        num_heads: int,
        perHead_in: int,
        sines: int,
        num_realizations: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = check_int("num_heads", num_heads)
        self.perHead_in = check_int("perHead_in", perHead_in)
        self.sines = check_int("sines", sines)
        self.num_realizations = check_int("num_realizations", num_realizations)
        check_dtype(dtype)
        H, D, S, R = self.num_heads, self.perHead_in, self.sines, self.num_realizations
        factory = {"device": device, "dtype": dtype}
        self.frequencies = nn.Parameter(torch.empty(H, D, S, **factory))
        self.phases = nn.Parameter(torch.empty(H, D, S, **factory))
        self.gains = nn.Parameter(torch.empty(H, D, S, **factory))
        self.register_buffer("Z1", torch.empty(H, D, S, R, **factory))
        self.register_buffer("Z2", torch.empty(H, D, S, R, **factory))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Frequencies log-spaced in [1e-4, 0.5] (dimension d takes every D-th), phases 0, gains
        1/√S, and fresh ``Z1, Z2`` (:meth:`redraw`): everything a new module starts from, e.g.
        after ``to_empty`` on a module built on the meta device."""
        H, D, S = self.frequencies.shape
        exps = torch.linspace(0.0, 1.0, D * S, dtype=torch.float64)
        f = _F_MIN * (_F_MAX / _F_MIN) ** exps  # index s·D + d: each d spans the whole range
        self.frequencies.copy_(f.view(S, D).T.expand(H, D, S))
        self.phases.zero_()
        self.gains.fill_(1.0 / math.sqrt(S))
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh ``Z1, Z2`` ~ N(0, 1) from ``generator`` (default: the global RNG)."""
        check_generator(generator)
        for z in (self.Z1, self.Z2):
            draw_device = z.device if generator is None else generator.device
            z.copy_(torch.randn(z.shape, generator=generator, device=draw_device, dtype=z.dtype))

    def kernel(self, lags: Tensor) -> Tensor:
        """``P_d(τ) = Σ_s λ²_ds cos(2π f_ds τ + θ_ds)`` for each lag τ: shape (H, D, len(lags)).

        ``E[q̂(m)·k̂(n)] = Σ_d q_d(m) k_d(n) P_d(m − n)`` (expectation over ``Z1, Z2``).
        """
        tau = lags.to(self.frequencies).reshape(-1)
        angle = 2 * math.pi * self.frequencies[..., None] * tau + self.phases[..., None]
        return (self.gains.square()[..., None] * torch.cos(angle)).sum(-2)

    def _codes(self, x: Tensor, phase: bool) -> Tensor:
        """x (..., H, N, D) -> codes (..., H, N, R); see the class docstring."""
        H, D, S, R = self.Z1.shape
        N = x.shape[-2]
        lead = x.shape[:-3]
        # Angles in at least fp32: positions and f·t lose too much in half precision.
        wide = torch.promote_types(x.dtype, torch.float32)
        pos = torch.arange(N, device=x.device, dtype=wide)
        angle = 2 * math.pi * pos[:, None, None] * self.frequencies.to(wide)[:, None]  # (H, N, D, S)
        if phase:
            angle = angle + self.phases.to(wide)[:, None]
        gains = self.gains[:, None] * (1.0 / math.sqrt(R))
        cos_t = gains * torch.cos(angle).to(x.dtype)  # R^(-1/2)·λ·cos, (H, N, D, S)
        sin_t = gains * torch.sin(angle).to(x.dtype)
        if R <= 2 * S * math.prod(lead):
            # The batch-independent codebook Q̄ (H, N, D, R) is smaller than the (..., H, N, D, 2S)
            # features, and costs fewer FLOPs: form it, then q̂ = Σ_d x_d·Q̄_d.
            book = torch.einsum("hnds,hdsr->hndr", cos_t, self.Z1) + torch.einsum("hnds,hdsr->hndr", sin_t, self.Z2)
            return torch.einsum("...hnd,hndr->...hnr", x, book)
        # Otherwise never form (N, D, R): q̂ = [x·λcos, x·λsin] @ [Z1; Z2] per head.
        xh = x.movedim(-3, 0).unsqueeze(-1)  # (H, ..., N, D, 1)
        bcast = (H,) + (1,) * len(lead) + (N, D, S)
        rows = math.prod(lead) * N
        cos_f = (xh * cos_t.view(bcast)).reshape(H, rows, D * S)
        sin_f = (xh * sin_t.view(bcast)).reshape(H, rows, D * S)
        out = torch.bmm(cos_f, self.Z1.reshape(H, D * S, R)) + torch.bmm(sin_f, self.Z2.reshape(H, D * S, R))
        return out.reshape(H, *lead, N, R).movedim(0, -3)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Codes (q̂, k̂) of queries q (..., H, Nq, D) and keys k (..., H, Nk, D); see the class docstring."""
        check_tensor("q", q)
        check_tensor("k", k)
        # Under torch.autocast the codes come out in its dtype (the einsums / bmms cast
        # themselves; the angles stay in fp32, as they do for low-precision inputs).
        dt = autocast_dtype(q)
        for name, x in (("q", q), ("k", k)):
            check_input(name, x, min_ndim=3, like=self.Z1, autocast=dt)
            if x.shape[-3] != self.num_heads or x.shape[-1] != self.perHead_in:
                raise ValueError(
                    f"sinSRPE expects {name} of shape (..., num_heads={self.num_heads}, seq, "
                    f"perHead_in={self.perHead_in}), got {tuple(x.shape)}"
                )
        q, k = autocast_cast(dt, q, k)
        return self._codes(q, phase=True), self._codes(k, phase=False)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, perHead_in={self.perHead_in}, sines={self.sines}, "
            f"num_realizations={self.num_realizations}"
        )
