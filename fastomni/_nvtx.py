"""NVTX ranges for Nsight Systems, through the ``nvtx`` package (a no-op without a GPU).

Never torch's own CUDA NVTX wrapper: it raises on CPU builds of torch. Ranges go inside op bodies (custom
op implementations), so ``torch.compile(fullgraph=True)`` never traces them; ranges in traced Python code
(the training phases) are skipped while dynamo traces it, since the ``nvtx`` package's domain lookup is
a Cython call dynamo cannot trace: each range would break the graph. The compiled code then runs
without them, and the op bodies' ranges still show on the timeline.
"""
from __future__ import annotations

import contextlib

import torch

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a dependency; tolerate its absence anyway
    _nvtx = None

DOMAIN = "fastomni"


def annotate(name: str):
    """Context manager: an NVTX range ``name`` in the ``fastomni`` domain."""
    if _nvtx is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain=DOMAIN)
