"""The original code's formulation of a training step, for the step benchmark's ``original`` row.

fastomni's model differs from the original's code in two ways that change the work, not the math:
the frame code enters the first coupling linear as a per-frame bias (the original concatenates the
code to every point, a ``[n*P*K, 128 + 256]`` input per layer), and the smoothness term reuses the
canonical points of the main term (the original maps those points forward again). Inside
:func:`original_formulation` both are undone, on the reference backend, so the step does the
original's work (and holds its per-point code copies) while computing the same losses.
"""
from __future__ import annotations

import contextlib

import torch

import fastomni.train as train
from fastomni import losses
from fastomni.nn.nvp import CouplingLayer


def _transform_concat(self, code, y, inverse=False):
    """CouplingLayer.transform as the original runs it: the code expanded to every point and
    concatenated (``CouplingLayer.forward/inverse``, the original's signature)."""
    expanded = code.reshape(code.shape[0], *([1] * (y.dim() - 2)), code.shape[-1]).expand(*y.shape[:-1], -1)
    return (self.inverse if inverse else self.forward)(expanded, y)[0]


def _smoothness_remapped(model, ids1, x1, u1):
    """The smoothness term as the original computes it: frame i's points mapped forward again."""
    valid = (ids1 >= 1) & (ids1 < model.num_imgs - 1)
    if not bool(valid.any()):
        return x1.new_zeros(())
    ids, xs = ids1[valid], x1[valid]
    us = model.map_to_canonical(xs, ids)
    both = model.map_from_canonical(torch.cat([us, us]), torch.cat([ids - 1, ids + 1]))
    x_prev, x_next = both.split(len(ids))
    return losses.masked_l1_loss(xs - x_prev, x_next - xs)


@contextlib.contextmanager
def original_formulation():
    """Within the block, training steps do the original code's work (see the module docstring);
    use it together with ``use_backend("reference")``."""
    saved = CouplingLayer.transform, train._scene_flow_smoothness
    CouplingLayer.transform, train._scene_flow_smoothness = _transform_concat, _smoothness_remapped
    try:
        yield
    finally:
        CouplingLayer.transform, train._scene_flow_smoothness = saved
