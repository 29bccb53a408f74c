"""Checkpoints in the original's format: ``model_{step:06d}.pth`` holding ``optimizer``,
``scheduler``, ``deform_mlp``, ``feature_mlp`` and ``color_mlp`` state dicts (fastomni adds
``step`` and, for exact resumption, ``rng``; the original ignores extra keys).

Writes are atomic: a temporary file in the same folder, then a rename.

Reads never run code from the file: checkpoints are unpickled with ``torch.load(weights_only=True)``,
which admits tensors, state dicts and plain Python data (numbers, strings, lists, tuples, dicts)
and nothing else. That is everything the original and fastomni store (fastomni's RNG states are
byte tensors and a dict of ints), so no other type is registered as safe; a file holding any other
object is refused with :class:`~fastomni.inputs.InputError`.
"""
from __future__ import annotations

import glob
import os
import pickle
import re

import torch
from torch import nn

from fastomni._atomic import atomic_output
from fastomni.inputs import InputError, require_keys

__all__ = ["load_deform_state", "load_checkpoint", "networks", "read_checkpoint", "restore_checkpoint", "save_checkpoint",
           "latest_checkpoint", "checkpoint_step"]

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
            raise InputError(
                f"checkpoint lacks the coupling masks {missing} (saved before they were buffers); "
                "pass transformed=[c_0, ..., c_{n-1}], the coordinate each layer transforms")
        state = dict(state)
        deform_mlp.set_masks(transformed)
        for i in range(n):
            state[f"layers1.{i}.mask"] = deform_mlp.layers1[i].mask.detach().clone()
    deform_mlp.load_state_dict(state, strict=True)


def networks(family: str) -> tuple[str, ...]:
    """The state dicts a checkpoint of model ``family`` holds (the fast family has no frame codes)."""
    return _NETS if family == "original" else ("deform_mlp", "color_mlp")


def checkpoint_step(path: str) -> int:
    m = _NAME.search(os.path.basename(path))
    if m is None:
        raise InputError(f"{path} is not named model_XXXXXX.pth")
    return int(m.group(1))


def latest_checkpoint(folder: str) -> str | None:
    """The ``model_XXXXXX.pth`` with the highest step in ``folder``, or None."""
    paths = [p for p in glob.glob(os.path.join(folder, "model_*.pth")) if _NAME.search(p)]
    return max(paths, key=checkpoint_step) if paths else None


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict in ``path``, unpickled with ``weights_only=True`` (see the module
    docstring), checked to hold the networks' state dicts. Raises ``FileNotFoundError`` or
    :class:`~fastomni.inputs.InputError` for a missing, truncated, foreign or unsafe file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message: a generic header, the reason, a pointer to the docs; keep the reason.
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        parts = [line.split("error:")[-1].strip() for line in lines if "documentation" not in line]
        reason = " ".join(p for p in parts if p)
        if "GLOBAL" in reason:
            raise InputError(f"refusing to load {path}: it holds objects other than tensors and plain data, "
                             f"which could run code when unpickled ({reason})") from None
        raise InputError(f"{path} is not a readable torch checkpoint ({reason or exc})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # truncated or not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a readable torch checkpoint ({first})") from None
    family = ckpt.get("family", "original") if isinstance(ckpt, dict) else "original"
    return require_keys(ckpt, networks(family), f"OmniMotion checkpoint {path}")


def restore_checkpoint(ckpt: dict, model: nn.Module, optimizer=None, scheduler=None,
                       transformed: list[int] | None = None) -> dict:
    """Load a checkpoint dict (:func:`read_checkpoint`) into ``model`` (an ``OmniMotion``) and, if
    given and present, the optimizer and scheduler. Returns ``ckpt``."""
    family = ckpt.get("family", "original")
    if family != model.family:
        raise InputError(f"the checkpoint holds a {family!r} model, not a {model.family!r} one")
    if family == "original":
        model.feature_mlp.load_state_dict(ckpt["feature_mlp"], strict=True)
        load_deform_state(model.deform_mlp, ckpt["deform_mlp"], transformed)
    else:
        model.deform_mlp.load_state_dict(ckpt["deform_mlp"], strict=True)
    model.color_mlp.load_state_dict(ckpt["color_mlp"], strict=True)
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and "scheduler" in ckpt:
        scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt


def load_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None,
                    transformed: list[int] | None = None, map_location="cpu") -> dict:
    """Load an original (or fastomni) checkpoint into ``model`` (an ``OmniMotion``) and, if given
    and present, the optimizer and scheduler: :func:`read_checkpoint` then
    :func:`restore_checkpoint`. Returns the raw checkpoint dict."""
    return restore_checkpoint(read_checkpoint(path, map_location), model, optimizer, scheduler, transformed)


def save_checkpoint(folder: str, step: int, model: nn.Module, optimizer=None, scheduler=None, **extra) -> str:
    """Atomically write ``folder/model_{step:06d}.pth``; returns its path."""
    os.makedirs(folder, exist_ok=True)
    state = {name: getattr(model, name).state_dict() for name in networks(model.family)}
    if model.family != "original":  # the original's files stay exactly the original's layout
        state["family"], state["model_options"] = model.family, dict(model.options)
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    if model.shots is not None:
        state["shots"] = [int(s) for s in model.shots]
    state.update(extra)
    path = os.path.join(folder, f"model_{step:06d}.pth")
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path
