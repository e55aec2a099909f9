from __future__ import annotations


def find_conv(ctx):
    return []
