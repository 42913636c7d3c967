"""The device parameter of the CUDA tests: each test body runs on the CPU in CI and on CUDA under `pytest -m cuda`."""

from __future__ import annotations

import pytest
import torch

NO_CUDA = "needs a CUDA GPU (run `pytest -m cuda tests/cuda` on one; benchmarks/gpu_check.sh does)"
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)], id="cuda"
)
# The CPU copy keeps the test bodies exercised by CI, where no GPU exists
DEVICES = ["cpu", CUDA]


def cuda_only(function):
    """Mark a test that has no CPU form: collected everywhere, skipped without CUDA."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)(function))
