"""Availability checks shared by the op modules: each returns why a backend cannot take the
given tensors, or None. Called with no tensors they judge the backend alone (``fastomni.backends()``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from fastomni import _ext
from fastomni.ops import _registry

__all__ = ["FLOAT_DTYPES", "cpu_native", "cuda_native", "interpreting", "register_backends", "require", "triton"]

FLOAT_DTYPES = (torch.float32, torch.float64)


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dtypes(tensors) -> str | None:
    for t in tensors:
        if t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
            return f"takes float32 or float64 tensors, got {t.dtype}"
    return None


def _devices(tensors, device: str) -> str | None:
    for t in tensors:
        if t.device.type != device:
            return f"takes {device} tensors, got one on {t.device}"
    return None


@torch.compiler.assume_constant_result
def _load(module: str) -> str | None:
    # constant for torch.compile: evaluated once while tracing, so a compiled caller of the public
    # functions never traces into torch.ops.load_library (which dynamo refuses to trace)
    return _ext.load(module)


def cpu_native(module: str, *tensors: torch.Tensor) -> str | None:
    """The C++ CPU backend: extension ``fastomni.<module>`` loads, CPU float32/float64 tensors."""
    return _load(module) or _devices(tensors, "cpu") or _dtypes(tensors)


def triton(*tensors: torch.Tensor) -> str | None:
    """Triton: the package is installed; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if interpreting():
        return _dtypes(tensors)
    if not tensors and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing to run on the CPU)"
    return _devices(tensors, "cuda") or _dtypes(tensors)


def cuda_native(module: str, *tensors: torch.Tensor) -> str | None:
    """The CUDA C++ backend: extension ``fastomni.<module>`` loads, CUDA float32/float64 tensors."""
    if not torch.cuda.is_available():
        return "no CUDA device or torch is a CPU build"
    return _load(module) or _devices(tensors, "cuda") or _dtypes(tensors)


def require(op: str, checks: dict, backend: str, *tensors: torch.Tensor) -> None:
    """Raise :class:`~fastomni.ops.BackendUnavailable` unless ``checks[backend]`` passes on ``tensors`` (none:
    the backend alone): a custom op called directly (bypassing dispatch) names the reason instead of
    failing inside a kernel or the dispatcher (e.g. CPU tensors given to the ``cuda`` backend)."""
    check = checks.get(backend)
    why = f"not one of {tuple(checks)}" if check is None else check(*tensors)
    if why is not None:
        raise _registry.BackendUnavailable(f"{op}: backend {backend!r} cannot run: {why}")


def register_backends(op: str) -> dict:
    """Register the four backends of ``op`` (extensions ``fastomni._C_<op>`` and
    ``fastomni._cuda_<op>``) with the registry; returns the checks by backend name."""
    checks = {
        "reference": lambda *t: None,
        "cpu": lambda *t: cpu_native(f"_C_{op}", *t),
        "triton": triton,
        "cuda": lambda *t: cuda_native(f"_cuda_{op}", *t),
    }
    for name, check in checks.items():
        _registry.register(op, name, check)
    return checks
