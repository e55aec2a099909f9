"""When the layers leave the custom ops for plain aten math: under torch.func transforms and
forward-mode AD (:func:`under_transform`), and in a backward that must itself be differentiable
(:func:`creating_graph`).

The ops carry reverse-mode formulas only (``register_autograd``). functorch's ``jvp`` /
``jacfwd`` then see no tangent rule and treat the op's output as a constant — zero tangents, with
no error — and ``vmap`` of the ops' autograd wrapper fails. Under those transforms the layers
compute the same function from differentiable aten ops (the ops' plain-PyTorch references),
which every transform batches and differentiates in both modes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad


def under_transform(*tensors: Tensor | None) -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, jacrev, jacfwd, hessian, ...) is active,
    or one of ``tensors`` carries a forward-mode tangent (``torch.autograd.forward_ad``). Always
    False while torch.compile traces, where the ops stay (Inductor must see them)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    # A dual level is open only inside ``forward_ad.dual_level()``; outside it no tensor is dual.
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def creating_graph() -> bool:
    """Whether an op's backward runs under ``create_graph=True`` (a second derivative will be
    taken through it) in eager mode. Its backward ops have no derivative of their own, so the
    backward then runs the ops' plain-PyTorch math instead. False while torch.compile traces
    (AOTAutograd traces the backward with grad mode of its own; the ops must stay there)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()
