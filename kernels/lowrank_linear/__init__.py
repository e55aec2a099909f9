"""Low-rank linear y = scale·((x·A)·B) + b, in SKLinear's per-term layout and in plain (A, B) form."""

from .reference import (
    lowrank_backward,
    lowrank_forward,
    sklinear_backward,
    sklinear_forward,
)

__all__ = ["sklinear_forward", "sklinear_backward", "lowrank_forward", "lowrank_backward"]
