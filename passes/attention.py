from __future__ import annotations


def find_attention(ctx):
    return []
