"""Explicit sketched layers (see the API spec): drop-in, cheaper versions of dense layers."""

from . import pawXimpl
from .attention import RandMultiHeadAttention
from .conv import SKConv2d
from .linear import SKLinear, SKLinear_triton
from .lowrank import LowRankConv2d, LowRankLinear

__all__ = ["LowRankConv2d", "LowRankLinear", "RandMultiHeadAttention", "SKConv2d", "SKLinear", "SKLinear_triton", "pawXimpl"]
