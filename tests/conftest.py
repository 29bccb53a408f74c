"""Shared test settings: the one tolerance table, the golden file, small model fixtures.

No CUDA calls at collection time."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# Every tolerance of the tests (STYLE rule 11). Keyed by dtype: (atol, rtol) for comparing a
# backend with the reference backend. float32: kernels reorder sums (GEMM blocking, fused
# reductions), so a few ulps of the largest terms; float64: tight. Keyed by name: the other
# comparisons, each with why it is that loose.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    # the golden file (tests/test_golden.py), relative to each output's largest magnitude: float64
    # is the original's math (~1e-11 after these weights amplify rounding ~1e4); float32 is
    # ``factor`` x the original's own float32 error, taken as at least ``floor`` (a few ulps)
    "golden_float64": dict(rtol=1e-9),
    "golden_float32": dict(factor=10.0, floor=2.0**-21),
    # inverse(forward(x)) == x in float32 through 6 coupling layers, |x| <= 1 (each layer's exp(s)
    # and its inverse round separately: ~1e-6 measured)
    "float32_round_trip": dict(atol=1e-5, rtol=0.0),
    # pixels of a few-pixel image computed in float64 by two paths and stored as float32 tracks
    # (query.py): float32 storage alone rounds by ~5e-7; the rest is the two paths' sums
    "float32_pixels": dict(atol=1e-4, rtol=0.0),
    # the same float32 tracks from two equal computations in different chunks (sparse vs dense)
    "float32_pixels_same_path": dict(atol=1e-5, rtol=0.0),
    # occlusion scores in [0, 1], float64 by two paths, stored as float32
    "float32_scores": dict(atol=1e-6, rtol=0.0),
    # float16 exports (``--half``): displacements of up to ~2x the image size keep 11 bits
    "float16_pixels": dict(atol=2e-2, rtol=0.0),
    "float16_scores": dict(atol=1e-3, rtol=0.0),
}

REPO = Path(__file__).resolve().parent.parent
GOLDEN_PATH = Path(os.environ.get("FASTOMNI_GOLDEN", REPO.parent / "shared" / "reference" / "omnimotion_golden.pt"))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads; the count before is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
