"""stratified_sample per backend at OmniMotion's sizes: a training batch (8 pairs x 256 pixels x 32
jittered samples) and a dense query (128 x 128 pixels x 32 evenly spaced samples), float32, modes
fwd / bwd / fwd+bwd (the gradient reaches the pixels).

Run: ``pytest bench/bench_stratified_sample.py --benchmark-only --benchmark-group-by=param:size,param:mode``.
"""
from __future__ import annotations

import pytest
import torch
from _backends import MODES, device_for, fwd_bwd

from fastomni.ops import use_backend
from fastomni.ops.stratified_sample import stratified_sample

SIZES = {"train_8x256x32": ((8, 256), 32, True), "dense_128x128x32": ((128, 128), 32, False)}
BACKENDS = ["reference", "cpu", "triton", "cuda"]
H, W = 270, 480


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stratified_sample(benchmark, backend, size, mode):
    device = device_for("stratified_sample", backend)
    lead, K, jitter = SIZES[size]
    px = (torch.rand(*lead, 2, generator=torch.Generator().manual_seed(0)) * 200).to(device).requires_grad_()
    gen = torch.Generator(device).manual_seed(1)
    benchmark.extra_info.update(backend=backend, shape=f"{lead}x{K}", jitter=jitter, mode=mode)

    def forward():
        return stratified_sample(px, H, W, K, 0.0, 2.0, det=not jitter, generator=gen)[0]

    with use_backend(backend):
        benchmark(fwd_bwd(mode, forward, px, device))
