"""Checkpoints in the original's format: ``model_{step:06d}.pth`` holding ``optimizer``,
``scheduler``, ``deform_mlp``, ``feature_mlp`` and ``color_mlp`` state dicts (fastomni adds
``step`` and, for exact resumption, ``rng``; the original ignores extra keys).

Writes are atomic: a temporary file in the same folder, then a rename.
"""
from __future__ import annotations

import glob
import os
import re

import torch
from torch import nn

from fastomni._atomic import atomic_output

__all__ = ["load_deform_state", "load_checkpoint", "save_checkpoint", "latest_checkpoint", "checkpoint_step"]

_NETS = ("feature_mlp", "deform_mlp", "color_mlp")
_NAME = re.compile(r"model_(\d+)\.pth$")


def load_deform_state(deform_mlp: nn.Module, state: dict, transformed: list[int] | None = None) -> None:
    """Load an ``NVPSimplified`` state dict with ``strict=True``.

    Checkpoints saved before the coupling masks were buffers lack ``layers1.{i}.mask``; for those,
    ``transformed`` gives each layer's transformed coordinate (0, 1 or 2) and the masks are set
    from it.
    """
    n = len(deform_mlp.layers1)
    missing = [f"layers1.{i}.mask" for i in range(n) if f"layers1.{i}.mask" not in state]
    if missing:
        if transformed is None:
            raise ValueError(
                f"checkpoint lacks the coupling masks {missing} (saved before they were buffers); "
                "pass transformed=[c_0, ..., c_{n-1}], the coordinate each layer transforms")
        state = dict(state)
        deform_mlp.set_masks(transformed)
        for i in range(n):
            state[f"layers1.{i}.mask"] = deform_mlp.layers1[i].mask.detach().clone()
    deform_mlp.load_state_dict(state, strict=True)


def checkpoint_step(path: str) -> int:
    m = _NAME.search(os.path.basename(path))
    if m is None:
        raise ValueError(f"{path} is not named model_XXXXXX.pth")
    return int(m.group(1))


def latest_checkpoint(folder: str) -> str | None:
    """The ``model_XXXXXX.pth`` with the highest step in ``folder``, or None."""
    paths = [p for p in glob.glob(os.path.join(folder, "model_*.pth")) if _NAME.search(p)]
    return max(paths, key=checkpoint_step) if paths else None


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None,
                    transformed: list[int] | None = None, map_location="cpu") -> dict:
    """Load an original (or fastomni) checkpoint into ``model`` (an ``OmniMotion``) and, if given
    and present, the optimizer and scheduler. Returns the raw checkpoint dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file to the user
        raise ValueError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    absent = [k for k in _NETS if k not in ckpt]
    if absent:
        raise ValueError(f"{path} is not an OmniMotion checkpoint: missing {absent}")
    model.feature_mlp.load_state_dict(ckpt["feature_mlp"], strict=True)
    load_deform_state(model.deform_mlp, ckpt["deform_mlp"], transformed)
    model.color_mlp.load_state_dict(ckpt["color_mlp"], strict=True)
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and "scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt


def save_checkpoint(folder: str, step: int, model: nn.Module, optimizer=None, scheduler=None, **extra) -> str:
    """Atomically write ``folder/model_{step:06d}.pth``; returns its path."""
    os.makedirs(folder, exist_ok=True)
    state = {name: getattr(model, name).state_dict() for name in _NETS}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    state.update(extra)
    path = os.path.join(folder, f"model_{step:06d}.pth")
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path
