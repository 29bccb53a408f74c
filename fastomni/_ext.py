"""Lazy loading of the compiled extensions: ``fastomni._C_<op>`` (C++ CPU, one per op, built by
setup.py from ``csrc/<op>_cpu.cpp``) and ``fastomni._cuda_<op>`` (built only with
``FASTOMNI_BUILD_CUDA=1``). Loading registers the kernels under ``torch.ops.fastomni_cpu`` /
``torch.ops.fastomni_cuda``; nothing is compiled at import time."""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def load(module: str) -> str | None:
    """Import ``fastomni.<module>``; return None on success, else why it is unavailable."""
    try:
        importlib.import_module(f"fastomni.{module}")
    except ImportError as exc:
        return (f"extension fastomni.{module} is not built ({exc}); reinstall with "
                "`pip install -e . --no-build-isolation` on a machine with a C++ compiler")
    except OSError as exc:  # a library that exists but fails to load (ABI mismatch, missing symbol)
        return f"extension fastomni.{module} failed to load: {exc}"
    return None
