"""Helpers shared by the op benchmarks: which device a backend's benchmark runs on, and a device sync
so GPU timings include the kernels."""
from __future__ import annotations

import pytest
import torch

from fastomni.ops import backends


def device_for(op: str, backend: str) -> str:
    """The device ``backend`` benchmarks ``op`` on; skips with the reason when it cannot run here."""
    why = backends()[backend][op]
    if why != "available":
        pytest.skip(why)
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
