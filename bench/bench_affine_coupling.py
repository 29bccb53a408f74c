"""affine_coupling per backend at OmniMotion's sizes (widths 18 -> 256, 256 -> 256 -> 256 -> 2),
float32:

- ``test_affine_coupling``: one layer, modes fwd / bwd / fwd+bwd (gradients of y, code_bias and every
  weight), on a training batch (8 frames x 8,192 samples = 65,536 points, one direction of one
  layer of a training step) and a small batch (8 x 64 points, where the ~70 us custom-op call shows);
- ``test_coupling_stack``: NVPSimplified's 6 coupling layers forward then inverse, fwd+bwd, as a
  training step uses them (8 x 1,024 points, to keep the reference's rounds short);
- ``test_kernel_call``: the small layer through the C++ kernel directly, without the custom op
  (the difference to ``test_affine_coupling[cpu-small]`` is the op's Python cost, which a
  whole-stack op would save 11 times per direction).

Run: ``pytest bench/bench_affine_coupling.py --benchmark-only --benchmark-group-by=func``.
"""
from __future__ import annotations

import pytest
import torch
from _backends import MODES, device_for, fwd_bwd, sync

from fastomni.nn import NVPSimplified
from fastomni.ops import use_backend
from fastomni.ops.affine_coupling import affine_coupling

SIZES = {"train_8x8192": (8, 8192), "small_8x64": (8, 64)}
BACKENDS = ["reference", "cpu", "triton", "cuda"]


def _layer(n: int, P: int, device: str) -> list:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    sigma = (torch.pi * 2.0 ** torch.arange(4.0)).to(device)
    return [rnd(n, P, 3), rnd(n, 256, scale=0.3), rnd(256, 18, scale=0.25), rnd(256, scale=0.1),
            rnd(256, 256, scale=1 / 16), [rnd(256, 256, scale=1 / 16) for _ in range(2)],
            [rnd(256, scale=0.1) for _ in range(2)], rnd(2, 256, scale=1 / 16), rnd(2, scale=0.1), sigma]


def _leaves(args: list) -> list:
    return [*args[:5], *args[5], *args[6], args[7], args[8]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_coupling(benchmark, backend, size, mode):
    device = device_for("affine_coupling", backend)
    n, P = SIZES[size]
    args = _layer(n, P, device)
    leaves = [t.requires_grad_() for t in _leaves(args)]
    benchmark.extra_info.update(backend=backend, shape=f"{n}x{P}x3", widths="18-256-256-256-256-2", mode=mode)

    def forward():
        return affine_coupling(*args, 1, False)

    with use_backend(backend):
        benchmark(fwd_bwd(mode, forward, leaves, device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_coupling_stack(benchmark, backend):
    device = device_for("affine_coupling", backend)
    torch.manual_seed(0)
    nvp = NVPSimplified(n_layers=6, feature_dims=128, hidden_size=[256, 256, 256], proj_dims=256,
                        proj_type="fixed_positional_encoding", pe_freq=4, normalization=False).to(device)
    t, feat = torch.rand(8, 1, device=device), torch.randn(8, 128, device=device)
    x = torch.rand(8, 32, 32, 3, device=device)
    benchmark.extra_info.update(backend=backend, shape="8x32x32x3", layers=6, mode="fwd+bwd")

    def run():
        u = nvp.forward(t, feat, x)
        nvp.inverse(t, feat, u).square().sum().backward()
        sync(device)

    with use_backend(backend):
        benchmark(run)


def test_kernel_call(benchmark):
    device_for("affine_coupling", "cpu")
    args = _layer(*SIZES["small_8x64"], "cpu")
    benchmark.extra_info.update(backend="cpu (kernel only)", shape="8x64x3", mode="fwd")
    benchmark(lambda: torch.ops.fastomni_cpu.affine_coupling_fwd(*args, 1, False, 0.01))
