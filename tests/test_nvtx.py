"""NVTX ranges are emitted (through the ``nvtx`` package, which works without a GPU) around the
training phases and inside the ops."""
import contextlib

import pytest
import torch

import fastomni._nvtx as fnvtx
from fastomni.nn import OmniMotion
from fastomni.train import make_optimizer, synthetic_batch, training_step


class _Recorder:
    def __init__(self):
        self.names = []

    def annotate(self, name, domain=None):
        assert domain == fnvtx.DOMAIN
        self.names.append(name)
        return contextlib.nullcontext()


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(fnvtx, "_nvtx", rec)
    return rec


def test_real_nvtx_package_runs_without_gpu():
    import nvtx

    assert fnvtx._nvtx is nvtx
    with fnvtx.annotate("fastomni.test"):
        pass


def test_training_phases_are_annotated(recorder):
    torch.manual_seed(0)
    m = OmniMotion(num_imgs=4, h=8, w=8, num_samples_ray=3)
    opt, sched = make_optimizer(m)
    training_step(m, opt, sched, synthetic_batch(m, 2, 4), step=0)
    for phase in ("train.sample", "train.map", "train.render", "train.losses", "train.backward", "train.optimizer"):
        assert phase in recorder.names, phase


def test_ops_and_dense_query_are_annotated(recorder):
    from fastomni.query import track_points

    torch.manual_seed(0)
    m = OmniMotion(num_imgs=3, h=6, w=6, num_samples_ray=3)
    track_points(m, [[0, 2.0, 3.0]])
    for name in ("query.canonical", "query.to_frame", "query.occlusion"):
        assert name in recorder.names, name
    assert any(n.startswith("affine_coupling") for n in recorder.names), recorder.names
    assert any(n.startswith("gabor_filter") for n in recorder.names), recorder.names
