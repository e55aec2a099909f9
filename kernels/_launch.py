"""Kernel launches with everything but the tensors fixed, shared by the kernel families.

A :class:`Launch` is built once per call shape (by a family's cached plan) and then called with the
tensors alone. Its first call goes through ``kernel[grid](...)`` (through ``wrap_triton`` while
tracing, so Inductor sees the kernel); later calls hand the compiled kernel its arguments directly,
as ``JITFunction.run`` does after its argument binding, specialization and cache lookup, all of
which a fixed shape makes redundant. That is most of a launch's host time: tens of µs for a kernel
of ~40 arguments, against a few µs for the direct call.

:func:`f32_bits` / :func:`f32_of` carry float scalars into the kernels as int32 bits, so that triton's
launcher and Inductor's generated code type every argument alike and compile one binary.

:func:`compile_ahead` runs a plan's construction once with every launch only compiling its kernel,
all of them at once on a thread pool (triton's ``AsyncCompileMode``), so that a plan that times
dozens of candidate kernels compiles them in parallel rather than one after another.
"""

from __future__ import annotations

import contextvars
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

try:  # launch hooks, as JITFunction.run passes them (triton >= 3.4)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton: no direct launches
    _knobs = None

try:  # compiles on a thread pool (triton >= 3.5)
    from triton.runtime import _async_compile
except ImportError:  # pragma: no cover - older triton: kernels compile at their first launch
    _async_compile = None

__all__ = ["FAST_LAUNCH", "Launch", "compile_ahead", "compiling_ahead", "f32_bits", "f32_of", "traced"]

# Direct launches once a kernel has compiled. Off under the interpreter, which compiles nothing.
FAST_LAUNCH = os.environ.get("TRITON_INTERPRET") != "1" and _knobs is not None

# Set while compile_ahead runs a build: Launch calls then compile their kernel and launch nothing.
_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar("panther_compile_ahead", default=False)


try:  # the current CUDA stream, as triton's CUDA driver reads it
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - CPU-only torch: no direct launches happen

    def _raw_stream(idx):
        return torch.cuda.current_stream(idx).cuda_stream


def _compile_threads() -> int:
    """Threads compile_ahead uses: PANTHER_COMPILE_THREADS, else up to 16 (one per CPU). 0 or 1:
    no compiling ahead."""
    env = os.environ.get("PANTHER_COMPILE_THREADS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"PANTHER_COMPILE_THREADS must be an integer, got {env!r}") from None
    return min(16, os.cpu_count() or 1)


def compiling_ahead() -> bool:
    """Whether the current code runs inside :func:`compile_ahead` (launches compile, run nothing)."""
    return _AHEAD.get()


def compile_ahead(build: Callable[[], object]) -> bool:
    """Call ``build()`` once with every :class:`Launch` call compiling its kernel instead of
    launching it, the compiles submitted together to a thread pool; return once they have all
    finished (True), or at once (False) where that cannot help: under the interpreter, with triton
    before ``AsyncCompileMode``, with fewer than 2 threads, or while a CUDA graph is captured.

    ``build`` is meant to be built again for real right after: whatever it returns is dropped, an
    exception it raises is swallowed (the real build raises it), and so is a kernel that fails to
    compile (its first real launch compiles it again and reports the error). What it allocates is
    freed when it returns."""
    threads = _compile_threads()
    if not FAST_LAUNCH or _async_compile is None or threads < 2 or _AHEAD.get():
        return False
    if _async_compile.active_mode.get() is not None:  # (someone else's, e.g. a compiler's)
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    token = _AHEAD.set(True)
    try:
        with ThreadPoolExecutor(threads) as pool, _async_compile.AsyncCompileMode(pool, ignore_errors=True):
            try:
                build()
            except Exception:  # noqa: BLE001 - the real build that follows raises it
                pass
    finally:
        _AHEAD.reset(token)
    return True


def f32_bits(x: float) -> int:
    """The IEEE-754 binary32 encoding of ``x`` (rounded to nearest) as a signed 32-bit int, which
    :func:`f32_of` turns back into that fp32 value inside a kernel. Raises ``OverflowError`` where
    |x| is beyond the fp32 range.

    The kernels take their float scalars this way because a Python float is typed fp32 by triton's
    launcher but fp64 by the code Inductor generates under torch.compile: the same kernel then
    compiles to two binaries. An fp64 parameter cast once to fp32 moved the compiled _hq_kernel
    from 128 to 133 registers, 4 to 3 programs an SM, and 20.9 to 32.1 µs (H200, bf16, 4096²,
    k = 64, T = 4096; the two cubins launched alike on the same buffers). An int32 is typed alike
    by both, so eager calls, the stand-in timing of traced plans and the compiled graph run one
    binary."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


@triton.jit
def f32_of(bits):
    """The fp32 value whose :func:`f32_bits` is ``bits`` (an int32 kernel argument)."""
    return tl.cast(bits, tl.int32).to(tl.float32, bitcast=True)


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
        if any(isinstance(s, float) for s in scalars):  # (would compile apart under Inductor: f32_bits)
            raise AssertionError(f"launch of {fn.__name__} with a float scalar in {scalars}: pass f32_bits(x)")
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
        if _AHEAD.get():  # (compile_ahead: compile, do not launch)
            if self.compiled is None and not self.trace:
                self.fn.warmup(*tensors, *self.scalars, **self.meta, **self.opts, grid=self.grid)
            return
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

