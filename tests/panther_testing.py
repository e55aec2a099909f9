"""One tolerance helper for every numerical comparison in the tests.

``rel_err(a, ref) = ‖a − ref‖ / max(‖ref‖, floor)`` computed in float64; NaN never passes.
Default tolerances per dtype are the accuracy each arithmetic can deliver (fp32 with a TF32
margin, bf16/fp16 operand rounding), not values tuned to make a test pass.
"""

from __future__ import annotations

import torch

# Relative RMS error each dtype's arithmetic reaches on well-conditioned data.
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1.6e-2,
    torch.float16: 4e-3,
}
# Looser fp32 bound for GPU matmuls that may run in TF32.
RTOL_TF32 = 2e-3


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """Relative RMS error of ``actual`` against ``expected`` in float64; inf if NaN/inf appear."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).norm() / max(float(e.norm()), floor))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None, name: str = "") -> None:
    """Assert ``rel_err(actual, expected) <= rtol`` (default: by actual's dtype)."""
    tol = RTOL[actual.dtype] if rtol is None else rtol
    err = rel_err(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{name or 'tensor'}: relative error {err:.3e} > tolerance {tol:.1e}")
