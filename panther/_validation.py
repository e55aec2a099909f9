"""Argument checks shared by the public API.

Every check raises before any work is done, and every message names the parameter, the value
given and what is allowed.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any

import torch


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ``>= minimum``; raise TypeError/ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}")
    return int(value)


def check_float(name: str, value: Any, *, low: float, high: float, high_inclusive: bool = False) -> float:
    """Return ``value`` as float if ``low <= value < high`` (or ``<= high``); raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return float(value)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``; raise ValueError listing them otherwise."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool; raise TypeError otherwise (a truthy string is no flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_generator(generator: Any) -> torch.Generator | None:
    """Return ``generator`` if it is None or a ``torch.Generator``; raise TypeError otherwise."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_dtype(dtype: Any) -> torch.dtype | None:
    """Return ``dtype`` if it is None or a floating-point ``torch.dtype``; raise TypeError otherwise."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """Return ``value`` if it is a tensor; raise TypeError otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_input(
    name: str,
    x: Any,
    *,
    last_dim: int | None = None,
    dim_index: int = -1,
    dim_label: str = "features",
    min_ndim: int = 1,
    exact_ndim: int | None = None,
    like: torch.Tensor | None = None,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Validate a layer input: type, rank, feature size, and dtype/device against ``like``.

    With ``autocast`` (the dtype ``torch.autocast`` is on with, :func:`autocast_dtype`), dtypes
    that autocast casts to it (floating, not float64) match each other.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: wrong rank, wrong size along ``dim_index``, or a dtype/device that does not
            match the layer's parameters (``like``).
    """
    check_tensor(name, x)
    if exact_ndim is not None and x.dim() != exact_ndim:
        raise ValueError(f"{name} must be a {exact_ndim}-D tensor, got shape {tuple(x.shape)}")
    if x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    if last_dim is not None and x.shape[dim_index] != last_dim:
        raise ValueError(
            f"{name} has {x.shape[dim_index]} {dim_label} (shape {tuple(x.shape)}), "
            f"but the layer expects {last_dim}"
        )
    if like is not None:
        if x.dtype != like.dtype and not (autocast is not None and _autocast_eligible(x) and _autocast_eligible(like)):
            raise ValueError(
                f"{name} has dtype {x.dtype}, but the layer's parameters are {like.dtype}; "
                f"convert one of them (e.g. layer.to({x.dtype}))"
            )
        if x.device != like.device:
            raise ValueError(
                f"{name} is on {x.device}, but the layer's parameters are on {like.device}"
            )
    return x


def _autocast_eligible(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on ``x``'s device, or None where it is off."""
    dev = x.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(dev) if on else None


def autocast_cast(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` as ``torch.autocast`` casts a matmul's arguments: floating tensors other than
    float64 to ``dtype`` (differentiably: gradients reach the parameters in their own dtype).
    With ``dtype`` None (autocast off) they come back unchanged.

    panther's ops are custom ops, which autocast does not cast by itself; the layers call this
    (and run the op under :func:`autocast_off`) so that under ``torch.autocast`` they compute
    as an explicit copy of the layer in the lower precision would, as ``nn.Linear`` does.
    """
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and _autocast_eligible(t) else t for t in tensors)


def autocast_off(x: torch.Tensor, dtype: torch.dtype | None):
    """A context with autocast off on ``x``'s device where ``dtype`` says it was on (else a no-op):
    the ops' reference math keeps its fp32 internals instead of autocast lowering them again."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, enabled=False)


def warn_budget(layer: str, num_terms: int, low_rank: int, n_in: int, n_out: int, stacklevel: int = 3) -> None:
    """Warn when the sketch's stored values 2·L·k·(in+out) (trainable S and fixed U alike) are not
    fewer than the dense in·out."""
    import warnings

    sketched = 2 * num_terms * low_rank * (n_in + n_out)
    dense = n_in * n_out
    if sketched >= dense:
        warnings.warn(
            f"{layer}: the sketch holds 2*num_terms*low_rank*(in+out) = 2*{num_terms}*{low_rank}*"
            f"({n_in}+{n_out}) = {sketched} values (trainable S and fixed U), not fewer than the dense layer's "
            f"{n_in}*{n_out} = {dense}; lower num_terms or low_rank to save memory",
            UserWarning,
            stacklevel=stacklevel,
        )
