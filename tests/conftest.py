"""Shared test fixtures.

* Without CUDA, Triton kernels run under ``TRITON_INTERPRET=1`` (set before anything imports
  triton, because the interpreter is chosen when a kernel is decorated).
* ``poison`` makes every fresh allocation (torch.empty & co.) come back filled with NaN, so an
  output element a kernel forgot to write fails the comparison.
* ``device`` parametrizes over CPU and, where present, CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from panther_testing import assert_close  # noqa: E402,F401  (re-exported for tests)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def poison():
    """Fill every uninitialized allocation with NaN for the duration of the test."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    """Each test file starts with Dynamo's caches empty: files that compile the same model code
    many times would otherwise push later files past Dynamo's recompile limit (it then runs
    the model eagerly, without calling the backend under test)."""
    torch._dynamo.reset()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
