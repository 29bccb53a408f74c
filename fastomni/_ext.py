"""Lazy loading of the compiled extensions: ``fastomni._C_<op>`` (C++ CPU, one per op, built by
setup.py from ``csrc/<op>_cpu.cpp``) and ``fastomni._cuda_<op>`` (built only with
``FASTOMNI_BUILD_CUDA=1``). Loading a library registers its kernels under
``torch.ops.fastomni_cpu`` / ``torch.ops.fastomni_cuda``; nothing is compiled at import time."""
from __future__ import annotations

import functools
import importlib.util

import torch


@functools.lru_cache(maxsize=None)
def load(module: str) -> str | None:
    """Load the shared library ``fastomni.<module>``; return None on success, else why not."""
    spec = importlib.util.find_spec(f"fastomni.{module}")
    if spec is None or spec.origin is None:
        return (f"extension fastomni.{module} is not built; reinstall with "
                "`pip install -e . --no-build-isolation` on a machine with a C++ compiler")
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as exc:  # ABI mismatch, missing symbol, duplicate registration
        return f"extension fastomni.{module} failed to load: {exc}"
    return None
