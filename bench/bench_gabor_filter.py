"""GaborNet per provider at OmniMotion's sizes, float32, modes fwd / bwd / fwd+bwd:

- ``color_65536``: color_mlp (3 -> 512, 3 hidden 512x512 linears, 4 filters -> 4) on a training
  step's 65,536 canonical samples;
- ``color_2048``: the same network on a small batch;
- ``feature_50``: feature_mlp (1 -> 256, 2 hidden linears -> 128) on 50 frame times.

Providers: the backends (``reference``: eager PyTorch autograd; ``cpu``; ``cpu-recompute``: the cpu
backend keeping nothing of size [N, H] for the backward; ``triton``; ``cuda``) and
``reference-compiled``: ``torch.compile`` (inductor) of the reference, the bar to beat.
``test_peak_memory`` measures each provider's peak RSS for one color_65536 fwd+bwd in a fresh process.

Run: ``pytest bench/bench_gabor_filter.py --benchmark-only --benchmark-group-by=param:size,param:mode``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _backends import MODES, device_for, fwd_bwd
from fastomni.ops import use_backend
from fastomni.ops.gabor_filter import gabor_net
from fastomni.reference import gabor_filter as ref

# (points, in, hidden, out, hidden linears, alpha)
SIZES = {"color_65536": (65536, 3, 512, 4, 3, 3.0), "color_2048": (2048, 3, 512, 4, 3, 3.0),
         "feature_50": (50, 1, 256, 128, 2, 4.5)}
PROVIDERS = ["reference", "reference-compiled", "cpu", "cpu-recompute", "triton", "cuda"]


def make_inputs(size: str, device: str, seed: int = 0):
    """x and GaborNet parameters with the original's initialisation, as leaves needing grad."""
    N, n_in, H, O, L, alpha = SIZES[size]
    from fastomni.nn.mfn import GaborNet

    torch.manual_seed(seed)
    net = GaborNet(n_in, H, O, n_layers=L, alpha=alpha).to(device)
    x = (torch.rand(N, n_in, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(device).requires_grad_()
    params = ([f.linear.weight for f in net.filters], [f.linear.bias for f in net.filters],
              [f.mu for f in net.filters], [f.gamma for f in net.filters], [lin.weight for lin in net.linear],
              [lin.bias for lin in net.linear], net.output_linear.weight, net.output_linear.bias)
    params = tuple([t.detach().requires_grad_() for t in p] if isinstance(p, list) else p.detach().requires_grad_()
                   for p in params)
    leaves = [x, *(t for p in params for t in (p if isinstance(p, list) else [p]))]
    return x, params, leaves


def make_forward(provider: str):
    """(backend to select, forward function of (x, params))."""
    if provider == "reference-compiled":
        compiled = torch.compile(ref.gabor_net)
        return "reference", lambda x, params: compiled(x, *params)
    backend, recompute = provider.removesuffix("-recompute"), provider.endswith("-recompute")
    return backend, lambda x, params: gabor_net(x, *params, recompute=recompute)


def _device(provider: str) -> str:
    backend = provider.removesuffix("-recompute")
    return device_for("gabor_filter", "reference" if backend == "reference-compiled" else backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gabor_net(benchmark, provider, size, mode):
    device = _device(provider)
    x, params, leaves = make_inputs(size, device)
    backend, forward = make_forward(provider)
    grad = torch.randn(SIZES[size][0], SIZES[size][3], generator=torch.Generator().manual_seed(1)).to(device)
    benchmark.extra_info.update(provider=provider, backend=backend, shape=str(SIZES[size]), mode=mode)
    with use_backend(backend):
        run = fwd_bwd(mode, lambda: forward(x, params), leaves, device, grad=grad)
        run()  # warm-up: torch.compile compiles here, kernels load
        big = SIZES[size][0] >= 65536
        benchmark.pedantic(run, rounds=3 if big else 10, iterations=1, warmup_rounds=0 if big else 1)


_PEAK_SCRIPT = """
import json, resource, sys
import torch
sys.path.insert(0, {bench!r})
from bench_gabor_filter import SIZES, make_forward, make_inputs
from fastomni.ops import use_backend
x, params, leaves = make_inputs("color_65536", "cpu")
backend, forward = make_forward({provider!r})
grad = torch.randn(SIZES["color_65536"][0], SIZES["color_65536"][3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with use_backend(backend):
    torch.autograd.grad(forward(x, params), leaves, grad)
print(json.dumps(dict(peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      before_gib=base / 2**20)))
"""


@pytest.mark.parametrize("provider", ["reference", "cpu", "cpu-recompute"])
def test_peak_memory(benchmark, provider):
    """Peak RSS of one color_65536 fwd+bwd (GiB), in a fresh process (ru_maxrss never decreases)."""
    _device(provider)
    script = _PEAK_SCRIPT.format(bench=str(Path(__file__).parent), provider=provider)

    def run():
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(provider=provider, **{k: round(v, 3) for k, v in result.items()},
                                activations_gib=round(result["peak_gib"] - result["before_gib"], 3))
