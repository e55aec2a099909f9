"""Explicit sketched layers."""
