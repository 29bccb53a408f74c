"""The full default OmniMotion training step (8 pairs x 256 points x 32 samples: forward, losses,
backward, Adam) per provider, plus its peak memory measured in a fresh process per provider.

Providers: the backends ``reference`` and ``cpu``, and ``original``: the reference backend doing the
original code's work (the frame code concatenated to every point, the smoothness points mapped
forward again; see ``_original_step.py``), the step the original trainer runs.

Run: ``pytest bench/bench_train_step.py --benchmark-only`` (about 15 minutes at the default size; set
``FASTOMNI_BENCH_SMALL=1`` for a quick smoke run). Each provider's losses are checked against the
reference backend's on the same batch and weights. glibc returns the step's large freed buffers to
the system and faults them in again every step; to time the providers with freed memory kept
instead, run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` in the environment
(the peak-memory processes inherit it), one provider per pytest process (``-k``): with nothing
given back, a process that ran one provider keeps its memory while the next one's is measured.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from _original_step import original_formulation

from fastomni.nn import OmniMotion
from fastomni.ops import use_backend
from fastomni.train import compute_losses, make_optimizer, synthetic_batch, training_step

SMALL = os.environ.get("FASTOMNI_BENCH_SMALL") == "1"
PAIRS, PTS, SAMPLES = (2, 32, 8) if SMALL else (8, 256, 32)
PROVIDERS = ["original", "reference", "cpu"]


def _setup(seed=0):
    torch.manual_seed(seed)
    model = OmniMotion(num_imgs=50, h=270, w=480, num_samples_ray=SAMPLES)
    opt, sched = make_optimizer(model)
    return model, opt, sched, synthetic_batch(model, PAIRS, PTS, seed=seed)


def provider_context(provider: str) -> contextlib.ExitStack:
    """The backend (and, for ``original``, the original's formulation) of ``provider``."""
    stack = contextlib.ExitStack()
    stack.enter_context(use_backend("reference" if provider == "original" else provider))
    if provider == "original":
        stack.enter_context(original_formulation())
    return stack


def _losses(provider):
    model, _, _, batch = _setup()
    with provider_context(provider):
        loss, terms, _ = compute_losses(model, batch, step=1000, generator=torch.Generator().manual_seed(1))
    return float(loss.detach()), {k: float(v) for k, v in terms.items()}


def _peak_rss_mib(provider: str, steps: int = 2) -> float:
    """Peak RSS of a fresh process running ``steps`` training steps of ``provider``: VmHWM, which
    starts afresh at exec (ru_maxrss would inherit this process's high-water mark through fork)."""
    code = (
        "import sys, torch, json;"
        "sys.path.insert(0, 'bench');"
        "from bench_train_step import _setup, training_step, provider_context;"
        "m, o, s, b = _setup();"
        f"ctx = provider_context({provider!r});"
        "ctx.__enter__();"
        f"[training_step(m, o, s, b, i) for i in range({steps})];"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "print(json.dumps(int(hwm.split()[1]) / 1024))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider):
    peak = _peak_rss_mib(provider)  # first, while this process holds little memory
    if provider != "reference":
        _, ref_terms = _losses("reference")
        _, terms = _losses(provider)
        for k in ref_terms:
            assert abs(terms[k] - ref_terms[k]) <= 1e-4 * max(1.0, abs(ref_terms[k])), (k, terms[k], ref_terms[k])
    model, opt, sched, batch = _setup()
    with provider_context(provider):
        step = iter(range(10**6))
        rounds = 5 if SMALL else 2 if provider == "original" else 3
        benchmark.pedantic(lambda: training_step(model, opt, sched, batch, next(step)), rounds=rounds,
                           iterations=1, warmup_rounds=1)
    # the original's step is 2.44 TFLOP at the default size (SPEC.md); fastomni does less work
    # (no repeated smoothness mapping, per-frame code bias), so this is original-equivalent GFLOP/s
    flops = 2.44e12 * (PAIRS * PTS * SAMPLES) / 65536
    benchmark.extra_info.update(provider=provider, pairs=PAIRS, points=PTS, samples=SAMPLES,
                                orig_equiv_gflops_per_s=flops / benchmark.stats.stats.min / 1e9,
                                peak_rss_mib=peak)


def test_matmul_peak(benchmark):
    """This machine's float32 GEMM throughput (torch.mm 2048^3): the ceiling the step is judged by."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    benchmark.pedantic(torch.mm, args=(a, b), rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(backend="torch.mm", gflops_per_s=2 * 2048**3 / benchmark.stats.stats.min / 1e9)
