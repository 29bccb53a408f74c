"""Drop-in modules: every constructor option of the original builds the original's state_dict
keys, the bijection inverts, bad inputs raise clear errors, checkpoints round-trip atomically."""
import os

import pytest
import torch
from conftest import TOLERANCES
from torch import nn

from fastomni.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastomni.nn import GaborNet, NVPSimplified, OmniMotion


@pytest.mark.parametrize("affine", [False, True])
def test_inverse_of_forward_is_identity(affine):
    torch.manual_seed(0)
    nvp = NVPSimplified(n_layers=6, feature_dims=128, hidden_size=[256, 256, 256], proj_dims=256,
                        proj_type="fixed_positional_encoding", normalization=False, affine=affine)
    t = torch.rand(3, 1)
    feat = torch.randn(3, 128)
    x = torch.rand(3, 17, 5, 3) * 2 - 1
    with torch.no_grad():
        y = nvp.forward(t, feat, x)
        assert (y - x).abs().max() > 1e-3  # a real mapping, not the identity
        torch.testing.assert_close(nvp.inverse(t, feat, y), x, **TOLERANCES["float32_round_trip"])


def _keys(module):
    return set(module.state_dict())


def test_default_nvp_keys_match_original_layout():
    nvp = NVPSimplified(6, 128, [256, 256, 256], 256, proj_type="fixed_positional_encoding", normalization=False,
                        affine=True)
    keys = _keys(nvp)
    for i in range(6):
        assert f"layers1.{i}.mask" in keys
        assert f"layers1.{i}.projection.proj.0.weight" in keys
        for j in (0, 2, 4, 6):
            assert f"layers1.{i}.map_st.0.mlp.{j}.weight" in keys
        assert {f"code_projectors.{i}.mlp.0.weight", f"code_projectors.{i}.mlp.2.bias"} <= keys
    assert {f"affine_mlp.hidden.{k}.0.weight" for k in range(7)} | {"affine_mlp.hidden.7.weight"} <= keys
    assert sum(p.numel() for n, p in nvp.named_parameters() if n.startswith("affine_mlp")) == 398_853
    assert nvp.layers1[0].map_st[0].mlp[0].weight.shape == (256, 384)


@pytest.mark.parametrize("proj_type,extra", [
    ("simple", {"layers1.0.projection.proj.0.weight", "layers1.0.projection.proj.2.weight"}),
    ("gaussianrff", {"layers1.0.projection.B", "layers1.0.projection.proj.0.weight"}),
    ("gabor", {"layers1.0.projection.mu", "layers1.0.projection.gamma", "layers1.0.projection.linear2.weight"}),
    ("identity", set()),
])
def test_projection_variants_build_original_keys(proj_type, extra):
    nvp = NVPSimplified(3, 8, 16, 4, proj_type=proj_type, normalization=False)
    assert extra <= _keys(nvp)


def test_simple_projection_with_batchnorm_and_code_hidden_runs_and_inverts():
    torch.manual_seed(1)
    nvp = NVPSimplified(4, 8, [16, 16], 6, code_proj_hidden_size=[12], proj_type="simple", normalization=True,
                        activation=nn.ELU)
    keys = _keys(nvp)
    assert "layers1.0.map_st.0.mlp.1.running_mean" in keys  # BatchNorm after the first linear
    assert nvp.code_projectors[0].mlp[0].weight.shape == (12, 8)
    assert isinstance(nvp.layers1[0].map_st[0].mlp[2], nn.ELU)
    nvp.eval()
    t, feat, x = torch.rand(2, 1), torch.randn(2, 8), torch.rand(2, 5, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(nvp.inverse(t, feat, nvp.forward(t, feat, x)), x, **TOLERANCES["float32_round_trip"])


def test_projection_taking_three_coords_names_the_problem():
    nvp = NVPSimplified(3, 8, 16, 4, proj_type="gaussianrff", normalization=False)
    with pytest.raises(ValueError, match="coordinates"):
        nvp.forward(torch.rand(1, 1), torch.randn(1, 8), torch.rand(1, 2, 2, 3))


def test_unknown_projection_type():
    with pytest.raises(ValueError, match="proj_type"):
        NVPSimplified(3, 8, 16, 4, proj_type="fourier")


def test_gabornet_keys_and_shapes():
    net = GaborNet(in_size=3, hidden_size=32, n_layers=3, alpha=3, out_size=4)
    assert _keys(net) >= {"filters.3.mu", "filters.3.gamma", "filters.0.linear.weight", "linear.2.bias",
                          "output_linear.weight"}
    assert net(torch.rand(2, 7, 3)).shape == (2, 7, 4)
    assert GaborNet(1, 16, 4, n_layers=2, bias=False)(torch.rand(5, 1)).shape == (5, 4)


def test_model_bad_inputs():
    m = OmniMotion(num_imgs=4, h=8, w=8, num_samples_ray=3)
    with pytest.raises(IndexError, match="frame ids"):
        m.correspondences([0], torch.zeros(1, 2, 2), [4])
    with pytest.raises(ValueError, match="shape"):
        m.correspondences([0, 1], torch.zeros(1, 2, 2), [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        m.correspondences([0], torch.full((1, 2, 2), float("nan")), [1])
    with pytest.raises(TypeError, match="floating"):
        m.correspondences([0], torch.zeros(1, 2, 2, dtype=torch.long), [1])
    with pytest.raises(ValueError, match="at least 2 frames"):
        OmniMotion(num_imgs=1, h=8, w=8)


def test_checkpoint_roundtrip_is_atomic_and_complete(tmp_path):
    from fastomni.train import make_optimizer

    torch.manual_seed(0)
    m = OmniMotion(num_imgs=4, h=8, w=8, num_samples_ray=3, use_affine=True)
    opt, sched = make_optimizer(m)
    path = save_checkpoint(str(tmp_path), 1234, m, opt, sched)
    assert os.path.basename(path) == "model_001234.pth"
    assert sorted(os.listdir(tmp_path)) == ["model_001234.pth"]  # no temporary file left behind
    assert latest_checkpoint(str(tmp_path)) == path
    ckpt = torch.load(path, weights_only=False)
    assert {"optimizer", "scheduler", "deform_mlp", "feature_mlp", "color_mlp"} <= set(ckpt)
    torch.manual_seed(1)
    m2 = OmniMotion(num_imgs=4, h=8, w=8, num_samples_ray=3, use_affine=True)
    load_checkpoint(path, m2)
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n


def test_checkpoint_errors(tmp_path):
    m = OmniMotion(num_imgs=4, h=8, w=8, num_samples_ray=3)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "model_000001.pth"), m)
    bad = tmp_path / "model_000002.pth"
    torch.save({"feature_mlp": {}}, bad)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(str(bad), m)
    junk = tmp_path / "model_000003.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="readable"):
        load_checkpoint(str(junk), m)
