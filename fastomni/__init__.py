"""fastomni: fast dense long-range pixel tracking (OmniMotion) with fused kernels.

``import fastomni`` never compiles anything or touches CUDA; native extensions load lazily, and
the names below are imported on first use.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "backends": "fastomni.ops._registry",
    "use_backend": "fastomni.ops._registry",
    "BackendUnavailable": "fastomni.ops._registry",
    "load_tracks": "fastomni.query",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastomni' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
