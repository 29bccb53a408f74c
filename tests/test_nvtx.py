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
