"""Performer (FAVOR+) random-feature attention: reference math (and Triton kernels on CUDA)."""

from .reference import (
    causal_key_max,
    feature_map,
    feature_map_backward,
    linear_attention,
    performer_attention,
    performer_attention_backward,
)

__all__ = [
    "causal_key_max",
    "feature_map",
    "feature_map_backward",
    "linear_attention",
    "performer_attention",
    "performer_attention_backward",
]
