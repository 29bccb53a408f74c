"""grid_encode per backend at the sizes of a training step's inner loop: 3D points (N = 2^14 and 2^17),
16 levels of 2 features from resolution 16 to 2048 with 2^19 rows per level at most (Instant-NGP's
defaults: 6.1 M rows, the 11 finest levels hashed), float32, modes fwd / bwd / fwd+bwd (the gradient
reaches the points and the table).

Run: ``pytest bench/bench_grid_encode.py --benchmark-only --benchmark-group-by=param:size,param:mode``.
"""
from __future__ import annotations

import pytest
import torch
from _backends import MODES, device_for, fwd_bwd

from fastomni.ops import use_backend
from fastomni.ops.grid_encode import grid_encode
from fastomni.reference.grid_encode import grid_levels

# name: (points, dims, levels, features, base resolution, max resolution, log2 rows per level)
SIZES = {"n16k_d3_l16_f2": (2 ** 14, 3, 16, 2, 16, 2048, 19), "n131k_d3_l16_f2": (2 ** 17, 3, 16, 2, 16, 2048, 19),
         "n16k_d3_l8_f4": (2 ** 14, 3, 8, 4, 16, 512, 17)}
BACKENDS = ["reference", "cpu", "triton", "cuda"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_encode(benchmark, backend, size, mode):
    device = device_for("grid_encode", backend)
    n, dim, levels, feats, base, top, log2 = SIZES[size]
    res, off = grid_levels(dim, levels, base, top, log2)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, dim, generator=gen).to(device).requires_grad_()
    table = (torch.rand(off[-1], feats, generator=gen) * 2e-4 - 1e-4).to(device).requires_grad_()
    benchmark.extra_info.update(backend=backend, shape=f"x[{n}, {dim}] table[{off[-1]}, {feats}] L={levels}",
                                mode=mode)

    with use_backend(backend):
        benchmark(fwd_bwd(mode, lambda: grid_encode(x, table, res, off), (x, table), device))
