"""What changes when a weight does: :func:`weight_stamp`.

A weight's factors are cached (:func:`.factorize.cached_factors`) and served by a compiled graph
(:class:`panther.backend.PantherCompiled`) only while its stamp is the one they were computed
from. The stamp is the in-place version (``_version``: ``copy_``, ``mul_``, ``load_state_dict``,
optimizers with ``foreach``), the storage (``.data =``, ``vector_to_parameters``, a swapped
Parameter) and the optimizer steps that held the weight: fused optimizers (``Adam(fused=True)``)
update parameters without bumping ``_version``, so the steps of any optimizer that update a
watched weight (it has a gradient; torch.optim skips the others) are counted by a global step
post-hook (installed by the first :func:`watch_weight`). Writes
through ``weight.data`` (``w.data.copy_(...)``) are invisible, as they are to autograd.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["watch_weight", "weight_stamp", "step_epoch"]

# id(watched weight) -> optimizer steps that updated it.
_STEPS: dict[int, int] = {}
# Bumped whenever a step updates any watched weight: callers compare it before looking up steps.
_EPOCH = 0
_STEP_HOOK = None


def _count_steps(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _EPOCH
    if not _STEPS:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            # torch.optim skips parameters without a gradient: a frozen weight is not updated.
            if p.grad is not None and id(p) in _STEPS:
                _STEPS[id(p)] += 1
                _EPOCH += 1


def step_epoch() -> int:
    """A counter that changes whenever an optimizer step updates some watched weight."""
    return _EPOCH


def watch_weight(weight: torch.Tensor) -> None:
    """Count the optimizer steps over ``weight`` from now on (until it is freed)."""
    global _STEP_HOOK
    if id(weight) not in _STEPS:
        _STEPS[id(weight)] = 0
        weakref.finalize(weight, _STEPS.pop, id(weight), None)
    if _STEP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK = register_optimizer_step_post_hook(_count_steps)


def weight_stamp(weight: torch.Tensor) -> tuple[int, int, int]:
    """(in-place version, storage address, optimizer steps): equal stamps, unchanged weight
    (short of writes through ``.data``)."""
    return (weight._version, weight.data_ptr(), _STEPS.get(id(weight), 0))
