"""Sketching operators (placeholder module; filled in by the sketch work)."""
