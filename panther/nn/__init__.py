"""Explicit sketched layers (see the API spec): drop-in, cheaper versions of dense layers."""

from . import pawXimpl
from .attention import RandMultiHeadAttention
from .conv import SKConv2d
from .linear import SKLinear, SKLinear_triton

__all__ = ["RandMultiHeadAttention", "SKConv2d", "SKLinear", "SKLinear_triton", "pawXimpl"]
