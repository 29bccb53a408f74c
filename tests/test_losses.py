"""Each loss term against a value computed by hand on a tiny input, and the weight schedules."""
import pytest
import torch

from fastomni import losses
from fastomni.train import loss_weights


def test_trimmed_l1_drops_largest():
    # per-point errors 0, 1, 5 -> drop 5 -> mean(0, 1)
    assert losses.masked_l1_loss(torch.tensor([[0.0], [1.0], [5.0]]), torch.zeros(3, 1)).item() == pytest.approx(0.5)


def test_masked_l1_weighted_mean_and_normalized():
    pred = torch.tensor([[0.0, 0.0], [1.0, 3.0], [4.0, 4.0]])  # per-point mean errors 0, 2, 4
    mask = torch.tensor([[1.0], [0.5], [2.0]])
    # drop the 4: kept weighted errors 0*1, 2*0.5 -> mean 0.5; normalized: (0 + 1) / (1 + 0.5)
    assert losses.masked_l1_loss(pred, torch.zeros(3, 2), mask, normalize=False).item() == pytest.approx(0.5)
    assert losses.masked_l1_loss(pred, torch.zeros(3, 2), mask).item() == pytest.approx(1 / 1.5)


def test_masked_l1_degenerate_is_zero_not_nan():
    assert losses.masked_l1_loss(torch.ones(4, 2), torch.zeros(4, 2)).item() == 0.0
    assert losses.masked_l1_loss(torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 1), normalize=False).item() == 0.0
    assert losses.masked_l1_loss(torch.zeros(0, 2), torch.zeros(0, 2)).item() == 0.0


def test_gradient_loss():
    # differences 1, 2, 3 against 0 -> drop 3 -> mean 1.5
    assert losses.gradient_loss(torch.tensor([[0.0], [1.0], [3.0], [6.0]]), torch.zeros(4, 1)).item() == pytest.approx(1.5)
    # weighted: difference weights 1*2, 2*1, 1*4 = 2, 2, 4; errors 1, 2, 3 -> drop 3 -> (2 + 4) / (2 + 2)
    w = torch.tensor([[1.0], [2.0], [1.0], [4.0]])
    assert losses.gradient_loss(torch.tensor([[0.0], [1.0], [3.0], [6.0]]), torch.zeros(4, 1), w).item() == pytest.approx(1.5)


def test_depth_range_loss():
    # (0 - -1)^2 + (3 - 2)^2 over 4 elements
    assert losses.depth_range_loss(torch.tensor([-1.0, 0.5, 3.0, 2.0]), 0.0, 2.0).item() == pytest.approx(0.5)


def test_distortion_loss():
    # mids 0.5, 1.5: inter = 2 * 0.5 * 0.5 * 1 = 0.5; intra = (0.25 + 0.25) / 3
    t, w = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.5, 0.5]])
    assert losses.distortion_loss(t, w).item() == pytest.approx(0.5 + 1 / 6)


def test_canonical_sphere_loss():
    assert losses.canonical_sphere_loss(torch.tensor([[2.0, 0, 0], [0.5, 0, 0]])).item() == pytest.approx(9.0)
    assert losses.canonical_sphere_loss(torch.tensor([[0.5, 0, 0]])).item() == 0.0


@pytest.mark.parametrize("step,expected", [
    (0, dict(rgb=0.0, flow_grad=0.0, distortion=0.0)),
    (2500, dict(rgb=0.5, flow_grad=0.005, distortion=0.0)),
    (41000, dict(rgb=8.2, flow_grad=0.082, distortion=0.5)),
    (200000, dict(rgb=10.0, flow_grad=0.1, distortion=10.0)),
])
def test_loss_weight_schedules(step, expected):
    w = loss_weights(step)
    for k, v in expected.items():
        assert w[k] == pytest.approx(v), k
    assert w["scene_flow_smooth"] == 20.0 and w["depth_range"] == 10.0
