"""The fast model family: exact invertibility, identity at initialisation, the shared interface,
gradients through the grids, and training on a synthetic batch."""
from __future__ import annotations

import pytest
import torch

from fastomni.nn.fast import FAST_DEFAULTS, FAST_LEGACY, FastOmniMotion
from fastomni.train import make_optimizer, synthetic_batch, training_step
from conftest import tol

SMALL = dict(deform_levels=4, deform_max=16, deform_log2_size=10, color_levels=4, color_max=32, color_log2_size=10)
# with and without the per-frame affine warp of (x, y)
SHAPES = pytest.mark.parametrize("shape", [SMALL, dict(SMALL, affine_levels=3)], ids=["couplings", "affine"])


def _trained_like(model: FastOmniMotion, seed: int = 0) -> FastOmniMotion:
    """Random (non-identity) weights, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


@SHAPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_of_forward_is_identity(dtype, shape):
    m = _trained_like(FastOmniMotion(5, 12, 16, num_samples_ray=7, **shape)).to(dtype)
    x = torch.rand(3, 11, 7, 3, dtype=dtype) * 2 - 1
    u = m.map_to_canonical(x, [0, 2, 4])
    assert (u - x).abs().max() > 1e-2  # the map is not the identity
    back = m.map_from_canonical(u, [0, 2, 4])
    torch.testing.assert_close(back, x, **tol(dtype))


@SHAPES
def test_starts_as_identity(shape):
    m = FastOmniMotion(4, 10, 10, num_samples_ray=5, **shape)
    x = torch.rand(2, 3, 5, 3)
    torch.testing.assert_close(m.map_to_canonical(x, [0, 3]), x, rtol=0, atol=0)
    px = torch.tensor([[[2.0, 3.0], [7.5, 1.0]]])
    px2, depth = m.correspondences([0], px, [3], use_max_loc=True)
    torch.testing.assert_close(px2, px, **tol(torch.float32))


def test_interface_shapes_and_occlusion():
    m = _trained_like(FastOmniMotion(4, 10, 12, num_samples_ray=6, **SMALL))
    px = torch.rand(2, 9, 2) * 9
    px2, score, depth = m.correspondences_and_occlusion([0, 1], px, [3, 2])
    assert px2.shape == (2, 9, 2) and score.shape == (2, 9, 1) and depth.shape == (2, 9, 1)
    assert bool(((score >= 0) & (score <= 1 + 1e-6)).all())
    rgb, density = m.color_density(torch.rand(5, 3))
    assert rgb.shape == (5, 3) and density.shape == (5,) and bool((density >= 0).all())


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unknown FastOmniMotion options"):
        FastOmniMotion(4, 10, 10, hidden_size=3)
    assert set(SMALL) <= set(FAST_DEFAULTS)


@SHAPES
def test_gradients_reach_every_parameter_float64(shape):
    m = _trained_like(FastOmniMotion(4, 8, 8, num_samples_ray=4, **shape)).double()
    x = torch.rand(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    x2, u = m.map_between(x, [0, 1], [2, 3])
    _, density = m.color_density(u)
    (x2.square().sum() + density.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@SHAPES
def test_map_gradcheck_float64(shape):
    m = _trained_like(FastOmniMotion(3, 8, 8, num_samples_ray=2, **shape)).double()
    x = (torch.rand(1, 2, 2, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: m.map_between(a, [0], [2])[0], (x,))


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    m = FastOmniMotion(4, 16, 16, num_samples_ray=6, **SMALL)
    opt, sched = make_optimizer(m, 1e-2, 1e-2, 1e-2)
    batch = synthetic_batch(m, num_pairs=2, num_pts=32, seed=0)
    g = torch.Generator().manual_seed(0)
    losses = [training_step(m, opt, sched, batch, step, generator=g).loss for step in range(1, 61)]
    assert losses[-1] < 0.75 * losses[0], losses


def test_fast_run_checkpoints_its_family_and_reloads(tmp_path):
    """A fast-preset run writes its family and shape into the checkpoint; load_run rebuilds the
    same model, and resuming it under another family is refused."""
    from test_sampler import make_sequence

    from fastomni.checkpoint import read_checkpoint
    from fastomni.config import preset
    from fastomni.optimize import load_run, optimize

    seq = make_sequence(tmp_path / "seq")
    cfg = preset("fast").replace(num_pairs=2, num_pts=8, num_samples_ray=4, num_iters=3, i_weight=3, chunk_size=64)
    result = optimize(seq, str(tmp_path / "run"), cfg, progress=False)
    ckpt = read_checkpoint(result.checkpoint)
    longer_side = max(result.model.h, result.model.w)
    assert ckpt["family"] == "fast" and ckpt["model_options"] == {**FAST_DEFAULTS, "deform_max": longer_side}
    assert "feature_mlp" not in ckpt
    model, loaded_cfg, step = load_run(str(tmp_path / "run"), device="cpu")
    assert isinstance(model, FastOmniMotion) and step == 3 and loaded_cfg.family == "fast"
    px = torch.tensor([[[1.0, 2.0], [3.0, 1.5]]])
    with torch.no_grad():
        torch.testing.assert_close(model.correspondences([0], px, [2]), result.model.correspondences([0], px, [2]),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="family"):
        optimize(seq, str(tmp_path / "run"), preset("cpu").replace(num_iters=4, num_samples_ray=4), progress=False)


def test_checkpoint_from_before_an_option_existed_reloads_and_resumes(tmp_path):
    """A fast checkpoint written before ``affine_levels`` existed (its options lack the key, its
    state has no affine grid) loads as the model it was, and a run resumes from it."""
    from test_sampler import make_sequence

    from fastomni.checkpoint import read_checkpoint
    from fastomni.config import preset
    from fastomni.optimize import load_run, optimize

    assert FAST_LEGACY == {"affine_levels": 0} and FAST_DEFAULTS["affine_levels"] > 0
    seq = make_sequence(tmp_path / "seq")
    cfg = preset("fast").replace(num_pairs=2, num_pts=8, num_samples_ray=4, num_iters=2, i_weight=2, chunk_size=64)
    run = tmp_path / "run"
    optimize(seq, str(run), cfg.replace(num_iters=1), progress=False)  # a run folder to overwrite
    ckpt = read_checkpoint(str(run / "model_000001.pth"))
    options = {k: v for k, v in ckpt["model_options"].items() if k != "affine_levels"}
    legacy = FastOmniMotion(ckpt["num_imgs"], *ckpt["image_size"], num_samples_ray=4, **options, **FAST_LEGACY)
    assert legacy.deform_mlp.affine is None
    ckpt["model_options"] = options
    ckpt["deform_mlp"], ckpt["color_mlp"] = legacy.deform_mlp.state_dict(), legacy.color_mlp.state_dict()
    del ckpt["optimizer"]
    torch.save(ckpt, run / "model_000001.pth")
    model, _, _ = load_run(str(run), device="cpu")
    assert model.deform_mlp.affine is None
    result = optimize(seq, str(run), cfg.replace(load_opt=False), progress=False)
    assert result.step == 2 and result.model.deform_mlp.affine is None


def test_original_checkpoints_keep_the_original_layout(tmp_path):
    from fastomni.checkpoint import read_checkpoint, save_checkpoint
    from fastomni.nn import OmniMotion

    path = save_checkpoint(str(tmp_path), 1, OmniMotion(3, 8, 8, num_samples_ray=4))
    assert set(read_checkpoint(path)) == {"feature_mlp", "deform_mlp", "color_mlp", "step"}
