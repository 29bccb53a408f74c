"""One OmniMotion training step: sampling, mapping, rendering, the original's losses with their
schedules, backward and an Adam step (``trainer.py``'s ``compute_all_losses`` and
``train_one_step``).

Deviation from the original, same result: the scene-flow smoothness term reuses the canonical
points the main term already computed (the original maps the same points forward again), so only
the two inverse mappings (to frames i-1 and i+1) are new work.

Example::

    >>> import torch
    >>> from fastomni.nn import OmniMotion
    >>> m = OmniMotion(num_imgs=4, h=16, w=16, num_samples_ray=4)
    >>> opt, sched = make_optimizer(m)
    >>> batch = synthetic_batch(m, num_pairs=2, num_pts=8, seed=0)
    >>> r = training_step(m, opt, sched, batch, step=0)
    >>> sorted(r.terms)[:3]
    ['canonical_unit_sphere', 'depth_range', 'distortion']
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastomni import losses
from fastomni._nvtx import annotate
from fastomni.nn.model import OmniMotion

__all__ = ["loss_weights", "make_optimizer", "compute_losses", "training_step", "StepResult", "synthetic_batch",
           "check_batch"]


def _ramp(step: int, start: int, rate: float, lo: float, hi: float) -> float:
    w = 0.0 if step <= start else rate * (step - start)
    return float(np.clip(w, lo, hi))


def loss_weights(step: int) -> dict[str, float]:
    """The original's loss weights at ``step``: rgb ramps to 10 by 1/5000 per step, flow gradient
    to 0.1 by 1/500000, distortion from step 40000 to 10 by 1/2000; the rest constant."""
    return {
        "rgb": _ramp(step, 0, 1.0 / 5000, 0, 10),
        "flow_grad": _ramp(step, 0, 1.0 / 500000, 0, 0.1),
        "distortion": _ramp(step, 40000, 1.0 / 2000, 0, 10),
        "scene_flow_smooth": 20.0,
        "depth_range": 10.0,
        "canonical_unit_sphere": 0.0,
    }


def make_optimizer(model: OmniMotion, lr_feature: float = 1e-3, lr_deform: float = 1e-4, lr_color: float = 3e-4,
                   lrate_decay_steps: int = 20000, lrate_decay_factor: float = 0.5):
    """Adam with the original's per-module learning rates (codes, bijection, canonical volume) and
    StepLR. Returns ``(optimizer, scheduler)``."""
    # a model family without per-frame codes (the fast one) has no feature_mlp group
    rates = (("feature_mlp", lr_feature), ("deform_mlp", lr_deform), ("color_mlp", lr_color))
    # The fast family's grid tables hold millions of parameters: its Adam is the fused one (3x the
    # foreach Adam's speed on the CPU). The original family keeps torch's default, for the same numbers.
    optimizer = torch.optim.Adam([{"params": getattr(model, name).parameters(), "lr": lr}
                                  for name, lr in rates if hasattr(model, name)],
                                 fused=True if getattr(model, "family", "") == "fast" else None)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lrate_decay_steps, gamma=lrate_decay_factor)
    return optimizer, scheduler


_BATCH_KEYS = {"ids1": 1, "ids2": 1, "pts1": 3, "pts2": 3, "gt_rgb1": 3, "weights": 3}


def check_batch(model: OmniMotion, batch: dict) -> None:
    """Raise a clear error for a malformed batch (missing keys, shapes, dtypes, NaN, bad ids)."""
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; expected keys {sorted(_BATCH_KEYS)}")
    n = len(batch["ids1"])
    last = {"pts1": 2, "pts2": 2, "gt_rgb1": 3, "weights": 1}
    p = batch["pts1"].shape[1] if batch["pts1"].dim() == 3 else None
    for key, ndim in _BATCH_KEYS.items():
        v = torch.as_tensor(batch[key])
        if v.dim() != ndim or v.shape[0] != n:
            raise ValueError(f"batch[{key!r}] must have {ndim} dims with {n} rows, got shape {tuple(v.shape)}")
        if key in last:
            if not v.is_floating_point():
                raise TypeError(f"batch[{key!r}] must be floating point, got {v.dtype}")
            if v.shape != (n, p, last[key]):
                raise ValueError(f"batch[{key!r}] must have shape [{n}, {p}, {last[key]}], got {tuple(v.shape)}")
            if torch.isnan(v).any():
                raise ValueError(f"batch[{key!r}] contains NaN")
        else:
            if v.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"batch[{key!r}] must hold integer frame ids, got {v.dtype}")
            if n and (int(v.min()) < 0 or int(v.max()) >= model.num_imgs):
                raise IndexError(f"batch[{key!r}] has frame ids outside 0..{model.num_imgs - 1}: {v.tolist()}")


def _in_image(px: Tensor, h: int, w: int, pad: float = 0) -> Tensor:
    return (px[..., 0] >= -pad) & (px[..., 0] <= w - 1 + pad) & (px[..., 1] >= -pad) & (px[..., 1] <= h - 1 + pad)


def _scene_flow_errors(model: OmniMotion, ids1: Tensor, x1: Tensor, u1: Tensor) -> tuple[Tensor, Tensor]:
    """The per-sample errors ``[n, P', K]`` of :func:`_scene_flow_smoothness` for every pair, and the
    pairs ``[n]`` that count (frame i neither the first nor the last): its terms before the batch-wide
    trimmed mean, for a global batch assembled over ranks (:mod:`fastomni.distributed`)."""
    valid = (ids1 >= 1) & (ids1 < model.num_imgs - 1)
    if model.num_imgs < 3:  # no frame has two neighbours
        return x1.new_zeros(x1.shape[:-1]), valid
    ids = ids1.clamp(1, model.num_imgs - 2)
    both = model.map_from_canonical(torch.cat([u1, u1]), torch.cat([ids - 1, ids + 1]))
    x_prev, x_next = both.split(len(ids))
    return F.l1_loss(x1 - x_prev, x_next - x1, reduction="none").mean(dim=-1), valid


def _scene_flow_smoothness(model: OmniMotion, ids1: Tensor, x1: Tensor, u1: Tensor) -> Tensor:
    """L1 of ``x_{i+1} - 2 x_i + x_{i-1}`` (local 3D, frame i's samples mapped to i-1 and i+1),
    with the largest error dropped; pairs whose frame i is the first or last frame are skipped.

    x1, u1: ``[n, P', K, 3]`` local samples and their canonical points."""
    valid = (ids1 >= 1) & (ids1 < model.num_imgs - 1)
    if not bool(valid.any()):
        return x1.new_zeros(())
    ids, xs, us = ids1[valid], x1[valid], u1[valid]
    both = model.map_from_canonical(torch.cat([us, us]), torch.cat([ids - 1, ids + 1]))
    x_prev, x_next = both.split(len(ids))
    return losses.masked_l1_loss(xs - x_prev, x_next - xs)


def compute_losses(model: OmniMotion, batch: dict, step: int, generator: torch.Generator | None = None,
                   max_padding: float = 0, mask_near: bool = False, comm=None
                   ) -> tuple[Tensor, dict[str, Tensor], dict]:
    """The original's total loss on a batch (see :mod:`fastomni.train`).

    With ``comm`` (a :class:`fastomni.distributed.Comm`) the loss is that of the global batch, every
    rank's pairs in rank order (see :mod:`fastomni.distributed`), and the same on every rank.

    Returns ``(loss, terms, data)``: ``terms`` the unweighted loss terms, ``data`` the predicted
    pixels ``px2s_proj [n, P, 2]`` and the in-image mask ``in_range [n, P]`` (this rank's pairs).
    """
    check_batch(model, batch)
    device = next(model.parameters()).device
    ids1 = torch.as_tensor(batch["ids1"], dtype=torch.long, device=device)
    ids2 = torch.as_tensor(batch["ids2"], dtype=torch.long, device=device)
    px1, px2 = batch["pts1"].to(device), batch["pts2"].to(device)
    gt_rgb1, pair_w = batch["gt_rgb1"].to(device), batch["weights"].to(device)
    num_pts = px1.shape[1]
    w = loss_weights(step)

    with annotate("train.sample"):
        if comm is None:
            x1, depths1 = model.sample_rays(px1, det=False, generator=generator)
        else:
            x1, depths1 = model.sample_rays(px1, noise=comm.rank_noise(generator, px1.shape[:2], model.num_samples_ray,
                                                                      px1.dtype, px1.device))
    with annotate("train.map"):
        x2, u1 = model.map_between(x1, ids1, ids2)
    with annotate("train.render"):
        in_depth = (x2[..., 2] >= model.min_depth) & (x2[..., 2] <= model.max_depth)
        blend = model.blend(u1, mask_near=mask_near, points=x2, points_mask=in_depth)
        weights = blend.weights * in_depth
        px2_proj, _ = model.project(blend.point)
        _, px2_sample_depths = model.project(x2)

    with annotate("train.losses"):
        in_range = _in_image(px2_proj, model.h, model.w, max_padding)
        rgb_mask = _in_image(px1, model.h, model.w)
        zero = x1.new_zeros(())
        terms: dict[str, Tensor] = {}
        rgbs, local_px2_proj, local_in_range = blend.rendered_rgbs, px2_proj, in_range
        if comm is not None:
            global_terms, (rgbs, gt_rgb1, rgb_mask, px2_proj, px2, pair_w, in_range) = _gather_loss_inputs(
                comm, model, w, ids1, x1, u1, depths1, weights, px2_sample_depths, num_pts,
                [rgbs, gt_rgb1, rgb_mask, px2_proj, px2, pair_w, in_range])
        if bool(in_range.any()):
            terms["rgb"] = F.mse_loss(rgbs[rgb_mask], gt_rgb1[rgb_mask])
            terms["rgb_grad"] = losses.gradient_loss(rgbs[rgb_mask], gt_rgb1[rgb_mask])
            terms["flow"] = losses.masked_l1_loss(px2_proj[in_range], px2[in_range], pair_w[in_range], normalize=False)
            terms["flow_grad"] = losses.gradient_loss(px2_proj[in_range], px2[in_range], pair_w[in_range])
        else:
            terms.update(rgb=zero, rgb_grad=zero, flow=zero, flow_grad=zero)
        if comm is not None:
            terms.update(global_terms)
        else:
            terms["depth_range"] = losses.depth_range_loss(px2_sample_depths, model.min_depth, model.max_depth)
            d = depths1[..., 0]
            terms["distortion"] = losses.distortion_loss(torch.cat([d, d[..., -1:]], dim=-1), weights)
            quarter = int(num_pts / 4)
            terms["scene_flow_smoothness"] = _scene_flow_smoothness(model, ids1, x1[:, :quarter], u1[:, :quarter])
            terms["canonical_unit_sphere"] = (losses.canonical_sphere_loss(u1) if w["canonical_unit_sphere"] > 0
                                              else zero)
        loss = (terms["flow"] + w["rgb"] * (terms["rgb"] + terms["rgb_grad"])
                + w["depth_range"] * terms["depth_range"] + w["distortion"] * terms["distortion"]
                + w["scene_flow_smooth"] * terms["scene_flow_smoothness"]
                + w["canonical_unit_sphere"] * terms["canonical_unit_sphere"]
                + w["flow_grad"] * terms["flow_grad"])
    return loss, terms, {"px2s_proj": local_px2_proj.detach(), "in_range": local_in_range}


def _gather_loss_inputs(comm, model: OmniMotion, w: dict, ids1: Tensor, x1: Tensor, u1: Tensor, depths1: Tensor,
                        weights: Tensor, sample_depths: Tensor, num_pts: int, per_point: list[Tensor]):
    """The global batch's loss inputs, in one all-gather: ``per_point`` tensors ``[n, P, ...]``
    concatenated over ranks, and the terms that need no per-point data: depth range and distortion
    (means over the same count on every rank: the mean of the ranks' means), the scene-flow term
    (the trimmed mean of every rank's per-sample errors) and the canonical-sphere term (sum / count)."""
    d = depths1[..., 0]
    quarter = int(num_pts / 4)
    sf_err, sf_valid = _scene_flow_errors(model, ids1, x1[:, :quarter], u1[:, :quarter])
    sq = (u1 ** 2).sum(dim=-1)
    outside = sq[sq >= 1.0] if w["canonical_unit_sphere"] > 0 else sq.new_zeros(0)
    scalars = torch.stack([losses.depth_range_loss(sample_depths, model.min_depth, model.max_depth),
                           losses.distortion_loss(torch.cat([d, d[..., -1:]], dim=-1), weights),
                           ((outside - 1) ** 2).sum(), sq.new_tensor(float(outside.numel()))])[None]
    gathered = comm.gather(per_point + [sf_err, sf_valid, scalars])
    sf_err, sf_valid, scalars = gathered[-3:]
    kept = sf_err[sf_valid]
    sphere = scalars[:, 2].sum() / scalars[:, 3].sum() if float(scalars[:, 3].detach().sum()) > 0 else x1.new_zeros(())
    terms = {"depth_range": scalars[:, 0].mean(), "distortion": scalars[:, 1].mean(),
             "scene_flow_smoothness": (losses.trimmed_l1_loss(kept[..., None], torch.zeros_like(kept[..., None]), 1.0)
                                       if kept.numel() else x1.new_zeros(())),
             "canonical_unit_sphere": sphere if w["canonical_unit_sphere"] > 0 else x1.new_zeros(())}
    return terms, gathered[:-3]


@dataclass
class StepResult:
    """What a training step reports: the total loss, each unweighted term, the detached predicted
    pixels ``[n, P, 2]`` (for hard-mining error caches) and their in-image mask ``[n, P]``."""

    loss: float
    terms: dict[str, float]
    px2s_proj: Tensor
    in_range: Tensor


def training_step(model: OmniMotion, optimizer, scheduler, batch: dict, step: int,
                  generator: torch.Generator | None = None, grad_clip: float = 0.0, max_padding: float = 0,
                  mask_near: bool = False, comm=None) -> StepResult:
    """One optimization step on ``batch`` (keys ids1, ids2 ``[n]``; pts1, pts2 ``[n, P, 2]`` pixels;
    gt_rgb1 ``[n, P, 3]``; weights ``[n, P, 1]``): zero grads, losses, backward, optional per-tensor
    gradient clipping, Adam step, scheduler step. Raises if the loss or a gradient is not finite.
    With ``comm`` (:mod:`fastomni.distributed`): the global batch's loss, gradients summed over ranks."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, terms, data = compute_losses(model, batch, step, generator, max_padding, mask_near and step < 4000, comm)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}: terms " +
                                 ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
    with annotate("train.backward"):
        loss.backward()
    if comm is not None:
        with annotate("train.all_reduce"):
            comm.reduce_grads(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # one fused pass over the gradients; names are looked up only when one is not finite
    if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        raise FloatingPointError(f"non-finite gradients at step {step} in {bad[:5]}")
    if grad_clip > 0:
        for p in model.parameters():
            torch.nn.utils.clip_grad_norm_(p, grad_clip)
    with annotate("train.optimizer"):
        optimizer.step()
        scheduler.step()
    return StepResult(float(loss.detach()), {k: float(v.detach()) for k, v in terms.items()}, data["px2s_proj"], data["in_range"])


def synthetic_batch(model: OmniMotion, num_pairs: int = 8, num_pts: int = 256, seed: int = 0) -> dict:
    """A random batch of the default shape (for benchmarks and tests): pairs of frames at most 3
    apart, random pixels, targets near the source pixels, random colours, pair weights as the
    original's cosine schedule."""
    g = torch.Generator().manual_seed(seed)
    ids1 = torch.randint(0, model.num_imgs, (num_pairs,), generator=g)
    step = torch.randint(1, 4, (num_pairs,), generator=g)
    ids2 = torch.where(ids1 + step < model.num_imgs, ids1 + step, (ids1 - step).clamp_min(0))
    ids2 = torch.where(ids2 == ids1, (ids1 + 1) % model.num_imgs, ids2)
    scale = torch.tensor([model.w - 1.0, model.h - 1.0])
    pts1 = torch.rand(num_pairs, num_pts, 2, generator=g) * scale
    pts2 = (pts1 + 2 * torch.randn(num_pairs, num_pts, 2, generator=g)).clamp(torch.zeros(2), scale)
    interval = (ids2 - ids1).abs().float()
    pw = torch.cos((interval - 1) / 20 * math.pi / 2)[:, None, None].expand(num_pairs, num_pts, 1).clone()
    return {"ids1": ids1, "ids2": ids2, "pts1": pts1, "pts2": pts2,
            "gt_rgb1": torch.rand(num_pairs, num_pts, 3, generator=g), "weights": pw}
