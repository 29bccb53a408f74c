"""Backend registry: the one place that decides which implementation runs an op.

Backends, in order of preference for a given device:

- ``reference``: the pure-PyTorch spec (``fastomni.reference``); always available.
- ``cpu``: C++ kernels (``csrc/<op>_cpu.cpp``), CPU tensors.
- ``triton``: Triton kernels (``kernels/<op>.py``), CUDA tensors (or CPU under ``TRITON_INTERPRET=1``).
- ``cuda``: CUDA C++ kernels (``csrc/<op>_cuda.cu``), CUDA tensors.

Each op module registers, per backend, a ``check(*tensors) -> str | None`` that says why the
backend cannot take an input (None if it can). Choice:

- explicit (``FASTOMNI_BACKEND=cpu`` or ``with fastomni.use_backend("cpu"):``): that backend or a
  ``BackendUnavailable`` error listing the reason;
- automatic: the first preferred backend that can take the input; falling back past a preferred
  one warns once per (op, backend, reason).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

__all__ = ["BACKENDS", "BackendUnavailable", "register", "select", "use_backend", "requested_backend",
           "backends", "ops"]

BACKENDS = ("reference", "cpu", "triton", "cuda")
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given input."""


@dataclass
class _Impl:
    check: Callable[..., str | None]


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_state = threading.local()
_warned: set[tuple[str, str, str]] = set()


def register(op: str, backend: str, check: Callable[..., str | None]) -> None:
    """Declare that ``backend`` implements ``op``; ``check(*tensors)`` returns why it cannot run
    an input, or None."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(check)


def requested_backend() -> str | None:
    """The explicitly requested backend (context manager first, then ``FASTOMNI_BACKEND``), or None."""
    name = getattr(_state, "backend", None) or os.environ.get("FASTOMNI_BACKEND") or None
    if name is not None and name != "auto" and name not in BACKENDS:
        raise BackendUnavailable(f"FASTOMNI_BACKEND={name!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return None if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops inside the block with backend ``name`` (``None`` or ``'auto'``: automatic)."""
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")
    prev = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = prev


def _reason(op: str, backend: str, tensors) -> str | None:
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return f"{backend} backend has no implementation of {op}"
    return impl.check(*tensors)


def select(op: str, *tensors: torch.Tensor) -> str:
    """The backend that runs ``op`` on ``tensors`` (see the module docstring for the rules)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_REGISTRY)}")
    explicit = requested_backend()
    if explicit is not None:
        why = _reason(op, explicit, tensors)
        if why is not None:
            raise BackendUnavailable(f"backend {explicit!r} was requested for {op} but cannot run it: {why}")
        return explicit
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    skipped = []
    for name in _PREFERENCE.get(device, ("reference",)):
        why = _reason(op, name, tensors)
        if why is None:
            for prev, prev_why in skipped:
                key = (op, prev, prev_why)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"fastomni: {op} falls back from {prev} to {name}: {prev_why}", stacklevel=3)
            return name
        skipped.append((name, why))
    reasons = "; ".join(f"{n}: {w}" for n, w in skipped)
    raise BackendUnavailable(f"no backend can run {op} on {device} tensors ({reasons})")


def ops() -> list[str]:
    """Names of the registered ops."""
    return sorted(_REGISTRY)


def backends() -> dict[str, dict[str, str]]:
    """For every backend, per op: ``'available'`` or why not, judged on a small float32 CPU input
    for ``reference``/``cpu`` and without input for the GPU backends (their own availability)."""
    from fastomni import ops as _ops  # noqa: F401  (registers every op)

    report: dict[str, dict[str, str]] = {}
    for backend in BACKENDS:
        report[backend] = {}
        for op in ops():
            impl = _REGISTRY[op].get(backend)
            if impl is None:
                report[backend][op] = "not implemented"
                continue
            why = impl.check()
            report[backend][op] = "available" if why is None else why
    return report
