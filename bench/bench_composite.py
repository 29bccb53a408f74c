"""composite per backend at OmniMotion's sizes: a training batch (8 pairs x 256 rays x 32 samples,
colors and mapped points with the depth-range mask) and a dense query (128 x 128 rays x 32
samples, max-weight point), float32, modes fwd / bwd / fwd+bwd.

Run: ``pytest bench/bench_composite.py --benchmark-only --benchmark-group-by=param:size,param:mode``.
GPU backends run when a CUDA device (or, for triton, ``TRITON_INTERPRET=1``) is present.
"""
from __future__ import annotations

import pytest
import torch
from _backends import MODES, device_for, fwd_bwd

from fastomni.ops import use_backend
from fastomni.ops.composite import composite

SIZES = {"train_8x256x32": ((8, 256), 32, False), "dense_128x128x32": ((128, 128), 32, True)}
BACKENDS = ["reference", "cpu", "triton", "cuda"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_composite(benchmark, backend, size, mode):
    device = device_for("composite", backend)
    lead, K, select_max = SIZES[size]
    g = torch.Generator().manual_seed(0)
    density = (torch.rand(*lead, K, generator=g) * 4).to(device).requires_grad_()
    colors = torch.rand(*lead, K, 3, generator=g).to(device).requires_grad_()
    points = (torch.rand(*lead, K, 3, generator=g) * 2).to(device).requires_grad_()
    mask = (points[..., 2] <= 1.9).detach()
    benchmark.extra_info.update(backend=backend, shape=f"{lead}x{K}", select_max=select_max, mode=mode)

    def forward():
        return composite(density, colors, points, mask, select_max=select_max)

    def loss(out):
        return out.rgb.sum() + out.point.sum() + out.weights.square().sum()

    with use_backend(backend):
        benchmark(fwd_bwd(mode, forward, (density, colors, points), device, loss=loss))
