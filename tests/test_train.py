"""The training step: gradients reach every parameter, the losses equal the original's formula
(its structure re-stated here independently), bad batches raise clear errors, and it runs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastomni import losses
from fastomni.nn import OmniMotion
from fastomni.train import compute_losses, loss_weights, make_optimizer, synthetic_batch, training_step


def _model(**kw):
    torch.manual_seed(0)
    return OmniMotion(num_imgs=6, h=20, w=24, num_samples_ray=6, **kw)


def _original_total(model, batch, step, generator):
    """The original's compute_all_losses: smoothness maps its points forward again from scratch."""
    ids1, ids2, px1, px2 = batch["ids1"], batch["ids2"], batch["pts1"], batch["pts2"]
    x1, d1 = model.sample_rays(px1, det=False, generator=generator)
    x2, u1 = model.map_between(x1, ids1, ids2)
    out = model.blend(u1)
    wts = out.weights * ((x2[..., -1] >= model.min_depth) & (x2[..., -1] <= model.max_depth)).float()
    px2p, _ = model.project((wts[..., None] * x2).sum(-2))
    inr = (px2p[..., 0] >= 0) & (px2p[..., 0] <= model.w - 1) & (px2p[..., 1] >= 0) & (px2p[..., 1] <= model.h - 1)
    rgbm = (px1[..., 0] >= 0) & (px1[..., 0] <= model.w - 1) & (px1[..., 1] >= 0) & (px1[..., 1] <= model.h - 1)
    w = loss_weights(step)
    loss = losses.masked_l1_loss(px2p[inr], px2[inr], batch["weights"][inr], normalize=False)
    loss = loss + w["rgb"] * (F.mse_loss(out.rendered_rgbs[rgbm], batch["gt_rgb1"][rgbm])
                              + losses.gradient_loss(out.rendered_rgbs[rgbm], batch["gt_rgb1"][rgbm]))
    loss = loss + 10 * losses.depth_range_loss(x2[..., 2:], model.min_depth, model.max_depth)
    t = torch.cat([d1[..., 0], d1[..., 0][..., -1:]], dim=-1)
    loss = loss + w["distortion"] * losses.distortion_loss(t, wts)
    valid = (ids1 >= 1) & (ids1 < model.num_imgs - 1)
    xs = x1[:, : int(px1.shape[1] / 4)][valid]
    ids = ids1[valid]
    both, _ = model.map_between(torch.cat([xs, xs]), torch.cat([ids, ids]), torch.cat([ids - 1, ids + 1]))
    prev, nxt = both.split(len(ids))
    loss = loss + 20 * losses.masked_l1_loss(xs - prev, nxt - xs)
    loss = loss + w["flow_grad"] * losses.gradient_loss(px2p[inr], px2[inr], batch["weights"][inr])
    return loss


@pytest.mark.parametrize("step", [0, 3000, 45000])
def test_losses_match_original_structure(step):
    model = _model(use_affine=True).double()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in synthetic_batch(model, 4, 12, seed=3).items()}
    batch["ids1"] = torch.tensor([0, 2, 3, 5])  # frames at both ends too (smoothness skips them)
    ours, _, _ = compute_losses(model, batch, step, generator=torch.Generator().manual_seed(7))
    theirs = _original_total(model, batch, step, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_affine", [False, True])
def test_every_parameter_gets_a_finite_gradient(use_affine):
    model = _model(use_affine=use_affine)
    opt, sched = make_optimizer(model)
    batch = synthetic_batch(model, 3, 16, seed=1)
    loss, _, _ = compute_losses(model, batch, step=6000)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_training_step_updates_and_reports():
    model = _model()
    opt, sched = make_optimizer(model, lrate_decay_steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    r = training_step(model, opt, sched, synthetic_batch(model, 2, 8, seed=2), step=10)
    assert np.isfinite(r.loss) and r.px2s_proj.shape == (2, 8, 2) and r.in_range.shape == (2, 8)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if b.requires_grad)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)  # StepLR stepped once with step_size 1


def test_optimizer_learning_rates():
    opt, sched = make_optimizer(_model())
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4, 3e-4]
    assert sched.step_size == 20000 and sched.gamma == 0.5


@pytest.mark.parametrize("mutate,error,match", [
    (lambda b: b.pop("pts2"), KeyError, "missing"),
    (lambda b: b.__setitem__("pts1", b["pts1"][..., :1]), ValueError, "pts1"),
    (lambda b: b["pts2"].__setitem__((0, 0, 0), float("nan")), ValueError, "NaN"),
    (lambda b: b.__setitem__("ids2", torch.tensor([0, 99])), IndexError, "outside"),
    (lambda b: b.__setitem__("ids1", torch.tensor([0.0, 1.0])), TypeError, "integer"),
    (lambda b: b.__setitem__("weights", b["weights"][:1]), ValueError, "weights"),
])
def test_bad_batches_raise_clear_errors(mutate, error, match):
    model = _model()
    batch = synthetic_batch(model, 2, 8, seed=0)
    mutate(batch)
    with pytest.raises(error, match=match):
        compute_losses(model, batch, step=0)
