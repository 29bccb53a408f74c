"""Shared test settings: the one tolerance table, the golden file, small model fixtures.

No CUDA calls at collection time."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# (atol, rtol) per dtype for comparing a backend with the reference backend. float32: kernels
# reorder sums (GEMM blocking, fused reductions), so a few ulps of the largest terms; float64: tight.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-8),
}
# Golden comparisons against the original code's float32 outputs: relative to each output's
# largest magnitude (see tests/test_golden.py for why end-to-end chains need more).
GOLDEN_RTOL = 1e-4

REPO = Path(__file__).resolve().parent.parent
GOLDEN_PATH = Path(os.environ.get("FASTOMNI_GOLDEN", REPO.parent / "shared" / "reference" / "omnimotion_golden.pt"))


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN_PATH.exists():
        pytest.fail(f"golden file not found at {GOLDEN_PATH} (set FASTOMNI_GOLDEN)")
    return torch.load(GOLDEN_PATH, weights_only=True)


@pytest.fixture
def tiny_model():
    """A small OmniMotion (5 frames, 12x16 pixels, 7 samples per ray), fixed seed, float64."""
    from fastomni.nn import OmniMotion

    torch.manual_seed(0)
    return OmniMotion(num_imgs=5, h=12, w=16, num_samples_ray=7, use_affine=True).double()


NATIVE_BACKENDS = ("cpu", "triton", "cuda")


def backend_device(op: str, backend: str) -> str:
    """The device ``backend``'s tests of ``op`` run on. Skips when a GPU backend cannot run here
    (triton needs CUDA or TRITON_INTERPRET=1 set before import; cuda needs CUDA and its extension);
    a missing ``cpu`` extension fails the test unless FASTOMNI_ALLOW_NO_NATIVE=1."""
    from fastomni.ops import backends

    why = backends()[backend][op]
    if why != "available":
        if backend == "cpu" and os.environ.get("FASTOMNI_ALLOW_NO_NATIVE") != "1":
            pytest.fail(f"cpu backend of {op} unavailable: {why}")
        pytest.skip(f"{backend} backend of {op} unavailable: {why}")
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return "cpu" if backend == "cpu" or interpreted else "cuda"
