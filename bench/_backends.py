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


MODES = ("fwd", "bwd", "fwd+bwd")


def fwd_bwd(mode: str, forward, leaves, device: str, grad=None, loss=None):
    """The timed function of one mode of an op benchmark: ``fwd`` (``forward()`` without autograd),
    ``bwd`` (the gradients w.r.t. ``leaves`` of one forward, done before timing, its graph kept for
    every round) or ``fwd+bwd``. The gradients are of ``loss(forward())`` when ``loss`` is given,
    else of ``forward()`` with the incoming gradient ``grad`` (ones when None). Call it inside the
    benchmark's ``use_backend``: the ``bwd`` mode runs its forward here."""
    def target(out):
        if loss is not None:
            return loss(out), None
        return out, torch.ones_like(out) if grad is None else grad

    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
            sync(device)
    elif mode == "bwd":
        out, out_grad = target(forward())

        def run():
            torch.autograd.grad(out, leaves, out_grad, retain_graph=True)
            sync(device)
    elif mode == "fwd+bwd":
        def run():
            out, out_grad = target(forward())
            torch.autograd.grad(out, leaves, out_grad)
            sync(device)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return run
