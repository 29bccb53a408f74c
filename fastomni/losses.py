"""OmniMotion's loss terms, with the original's exact semantics (``criterion.py``, ``trainer.py``).

Every masked L1 drops the single largest error (``err < quantile(err, 1)``), as the original
does. Where that leaves nothing (all errors equal, or one element) the original returns NaN;
fastomni returns 0 instead, so a degenerate batch cannot poison the optimizer.

Example::

    >>> import torch
    >>> float(masked_l1_loss(torch.tensor([[0.], [1.], [5.]]), torch.zeros(3, 1)))
    0.5
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["masked_l1_loss", "trimmed_l1_loss", "gradient_loss", "depth_range_loss", "distortion_loss",
           "canonical_sphere_loss"]


def _mean_or_zero(x: Tensor) -> Tensor:
    return x.mean() if x.numel() else x.sum()


def trimmed_l1_loss(pred: Tensor, gt: Tensor, quantile: float = 0.9) -> Tensor:
    """Mean over points of the per-point L1 (mean over the last dim), keeping points whose error is
    below the ``quantile`` of errors. pred, gt: ``[..., D]``."""
    err = F.l1_loss(pred, gt, reduction="none").mean(dim=-1)
    if err.numel() == 0:
        return err.sum()
    return _mean_or_zero(err[err < torch.quantile(err, quantile)])


def masked_l1_loss(pred: Tensor, gt: Tensor, mask: Tensor | None = None, normalize: bool = True,
                   quantile: float = 1.0) -> Tensor:
    """Weighted per-point L1 with the largest error dropped.

    pred, gt: ``[M, D]``; mask: ``[M, 1]`` weights or None (then :func:`trimmed_l1_loss`).
    ``normalize``: divide by the sum of kept weights, else take the mean over kept points.
    """
    if mask is None:
        return trimmed_l1_loss(pred, gt, quantile)
    err = F.l1_loss(pred, gt, reduction="none").mean(dim=-1, keepdim=True)  # [M, 1]
    if err.numel() == 0:
        return err.sum()
    keep = (err < torch.quantile(err, quantile)).squeeze(-1)
    weighted = (err * mask)[keep]
    if normalize:
        return weighted.sum() / (err.shape[-1] * mask[keep].sum() + 1e-8)
    return _mean_or_zero(weighted)


def gradient_loss(pred: Tensor, gt: Tensor, weight: Tensor | None = None) -> Tensor:
    """L1 between consecutive differences along the point list: pred, gt ``[M, D]``; weight
    ``[M, 1]`` (a difference's weight is the product of its two ends' weights)."""
    pred_grad = pred[..., 1:, :] - pred[..., :-1, :]
    gt_grad = gt[..., 1:, :] - gt[..., :-1, :]
    weight_grad = None if weight is None else weight[..., 1:, :] * weight[..., :-1, :]
    return masked_l1_loss(pred_grad, gt_grad, weight_grad)


def depth_range_loss(depth: Tensor, min_th: float = 0.0, max_th: float = 2.0) -> Tensor:
    """Squared excess of depths outside ``[min_th, max_th]``, summed, over the element count."""
    n = max(depth.numel(), 1)
    lower = ((depth[depth < min_th] - min_th) ** 2).sum() / n
    upper = ((depth[depth > max_th] - max_th) ** 2).sum() / n
    return upper + lower


def distortion_loss(t: Tensor, w: Tensor) -> Tensor:
    """mip-NeRF 360 distortion: ``t [..., K+1]`` interval edges, ``w [..., K]`` weights; mean over rays."""
    mid = (t[..., 1:] + t[..., :-1]) / 2
    inter = torch.sum(w * torch.sum(w[..., None, :] * torch.abs(mid[..., :, None] - mid[..., None, :]), dim=-1), dim=-1)
    intra = torch.sum(w**2 * (t[..., 1:] - t[..., :-1]), dim=-1) / 3
    return (inter + intra).mean()


def canonical_sphere_loss(u: Tensor, radius: float = 1.0) -> Tensor:
    """Mean of ``(|u|^2 - 1)^2`` over canonical points with ``|u|^2 >= radius``; 0 if none."""
    sq = (u**2).sum(dim=-1)
    outside = sq[sq >= radius]
    return ((outside - 1) ** 2).mean() if outside.numel() else sq.new_zeros(())
