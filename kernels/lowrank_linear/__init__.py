"""Low-rank linear y = scale·((x·A)·B) + b, in SKLinear's per-term layout and in plain (A, B) form.

The names here are the reference (``reference.py``, plain PyTorch, any device). The GPU kernels
with the same signatures are in ``triton.py`` (``from panther.kernels.lowrank_linear import
triton``); it needs the ``triton`` package, so it is not imported here.
"""

from .reference import (
    lowrank_backward,
    lowrank_forward,
    sklinear_backward,
    sklinear_forward,
)

__all__ = ["lowrank_backward", "lowrank_forward", "sklinear_backward", "sklinear_forward"]
