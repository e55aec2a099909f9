"""The state one run of the pipeline shares between passes."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from panther.options import PantherOptions

from .graph import GraphInputs, fake_mode_of
from .report import Candidate, Report

__all__ = ["PassContext"]

log = logging.getLogger("panther")


@dataclass
class PassContext:
    """Working GraphModule, its real inputs, the options, and what the passes found.

    ``grad_enabled`` is the grad mode the graph was captured under (Dynamo guards on it).
    """

    gm: fx.GraphModule
    example_inputs: list[Any]
    options: PantherOptions
    report: Report
    grad_enabled: bool = field(default_factory=torch.is_grad_enabled)
    candidates: list[Candidate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inputs = GraphInputs(self.gm, self.example_inputs)
        self.fake_mode = fake_mode_of(self.gm, self.example_inputs)
        self.shape_env = getattr(self.fake_mode, "shape_env", None)
        self._buffer_count = 0

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def seed_for(self, cand: Candidate) -> int:
        """A per-layer seed derived from ``options.seed`` and the layer's path (stable across runs)."""
        return (self.options.seed * 1_000_003 + zlib.crc32(cand.label.encode())) % (2**31 - 1)

    def add_buffer(self, hint: str, tensor: torch.Tensor) -> fx.Node:
        """Register ``tensor`` as a buffer of the working module and return a get_attr node for it."""
        safe = "".join(ch if ch.isalnum() else "_" for ch in hint)
        name = f"_panther_{self._buffer_count}_{safe}"
        self._buffer_count += 1
        self.gm.register_buffer(name, tensor)
        node = self.graph.get_attr(name)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        return node
