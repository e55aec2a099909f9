"""Kernel launches with everything but the tensors fixed, shared by the kernel families.

A :class:`Launch` is built once per call shape (by a family's cached plan) and then called with the
tensors alone. Its first call goes through ``kernel[grid](...)`` (through ``wrap_triton`` while
tracing, so Inductor sees the kernel); later calls hand the compiled kernel its arguments directly,
as ``JITFunction.run`` does after its argument binding, specialization and cache lookup, all of
which a fixed shape makes redundant. That is most of a launch's host time: tens of µs for a kernel
of ~40 arguments, against a few µs for the direct call.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import wrap_triton

try:  # launch hooks, as JITFunction.run passes them (triton >= 3.4)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton: no direct launches
    _knobs = None

__all__ = ["FAST_LAUNCH", "Launch", "traced"]

# Direct launches once a kernel has compiled. Off under the interpreter, which compiles nothing.
FAST_LAUNCH = os.environ.get("TRITON_INTERPRET") != "1" and _knobs is not None

try:  # the current CUDA stream, as triton's CUDA driver reads it
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - CPU-only torch: no direct launches happen

    def _raw_stream(idx):
        return torch.cuda.current_stream(idx).cuda_stream


def traced(x: Tensor) -> bool:
    """Whether x is a tracing stand-in (FakeTensor, FunctionalTensor, ...): launches then go
    through wrap_triton and nothing is cached or timed."""
    return type(x) is not torch.Tensor


class Launch:
    """One kernel launch whose grid and arguments, all but the leading tensors, are fixed.

    The first call launches through ``kernel[grid](...)`` (``wrap_triton`` while tracing, so
    Inductor sees the kernel); with ``fast`` it keeps the compiled kernel that call returns and
    later calls hand it the arguments directly, as JITFunction.run does after its binding and
    cache lookup (both of which a plan's fixed shapes make redundant).
    """

    __slots__ = ("compiled", "fast", "fn", "grid", "meta", "opts", "scalars", "tail", "trace")

    def __init__(self, fn, grid, n_ptr: int, scalars: tuple, meta: dict, opts: dict, fast: bool, trace: bool):
        names = fn.arg_names
        rest = names[n_ptr + len(scalars) :]
        if len(names) != n_ptr + len(scalars) + len(meta) or set(rest) != set(meta):
            raise AssertionError(f"launch of {names} with {n_ptr} tensors, {len(scalars)} scalars, {sorted(meta)}")
        self.fn = fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.scalars = scalars
        self.meta = meta
        self.opts = opts
        self.tail = (*scalars, *(meta[n] for n in rest))
        self.fast = fast and FAST_LAUNCH
        self.compiled = None
        self.trace = trace

    def __call__(self, *tensors) -> None:
        k = self.compiled
        if k is not None:
            args = (*tensors, *self.tail)
            stream = _raw_stream(torch.cuda.current_device())
            g = self.grid
            enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
            meta = k.launch_metadata(g, stream, *args) if getattr(enter, "calls", True) else None
            k.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, meta, enter, leave, *args)
            return
        fn = wrap_triton(self.fn) if self.trace else self.fn
        ret = fn[self.grid](*tensors, *self.scalars, **self.meta, **self.opts)
        if self.fast and hasattr(ret, "packed_metadata") and hasattr(ret, "function"):
            self.compiled = ret

