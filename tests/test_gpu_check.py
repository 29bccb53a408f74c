"""bench/gpu_check.py without a GPU: the dry run prints every step with its exact command and exits 0;
a real run on a machine without CUDA exits non-zero saying so; the timing workers and the comparison
with the reference run on the CPU (small sizes)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_plan():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    gpu_check = _module()
    steps = gpu_check.plan(10)
    assert [s.name for s in steps] == ["build", "backends", "op-tests", "golden", "train-reference", "train-triton",
                                      "train-cuda", "query-reference", "query-triton", "query-cuda"]
    for step in steps:
        assert f"{step.name}: " in out.stdout and step.command() in out.stdout, step.name
    build, _, op_tests, golden = steps[:4]
    assert build.env == {"FASTOMNI_BUILD_CUDA": "1", "FASTOMNI_REQUIRE_NATIVE": "1"}
    assert "--no-build-isolation" in build.argv
    assert op_tests.argv[-2:] == ["-k", "triton or cuda"] and "tests/test_affine_coupling.py" in op_tests.argv
    assert "tests/test_golden.py" in golden.argv and golden.argv[-1] == "triton or cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the real run would start")
def test_without_cuda_exits_nonzero_and_says_why(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "r.json")], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2
    assert "no CUDA device is present" in out.stderr
    assert not (tmp_path / "r.json").exists()


def test_workers_and_comparison_on_cpu(tmp_path, monkeypatch):
    """The train and query workers on the CPU (reference backend, small), then the comparison: equal
    results pass, a loss off by more than LOSS_RTOL or tracks off by more than TRACK_ATOL fail."""
    import numpy as np

    gpu_check = _module()
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the query worker's tracks file
    monkeypatch.setattr(gpu_check.tempfile, "tempdir", None)
    train = gpu_check.worker_train("reference", "cpu", steps=1, small=True)
    assert train["loss"] > 0 and set(train["terms"]) and train["step_ms"] > 0 and train["peak_mib"] is None
    query = gpu_check.worker_query("reference", "cpu", small=True)
    tracks = np.load(query["tracks_file"])
    assert tracks.shape == (8 * 8, 3, 2) and query["query_ms"] > 0

    assert query["tracks_file"].startswith(str(tmp_path))

    def results(loss_scale, track_shift, tmp):
        shifted = tmp + ".shifted.npy"
        np.save(shifted, tracks + track_shift)
        off = dict(train, loss=train["loss"] * loss_scale)
        return {"train-reference": {"ok": True, "result": train}, "train-triton": {"ok": True, "result": off},
                "query-reference": {"ok": True, "result": query},
                "query-triton": {"ok": True, "result": dict(query, tracks_file=shifted)}}

    same = results(1.0, 0.0, query["tracks_file"])
    gpu_check._compare(same)
    assert same["train-triton"]["ok"] and same["query-triton"]["ok"]
    assert "1.00x reference" in gpu_check._table(same)
    off = results(1 + 10 * gpu_check.LOSS_RTOL, 10 * gpu_check.TRACK_ATOL, query["tracks_file"])
    gpu_check._compare(off)
    assert not off["train-triton"]["ok"] and "losses differ" in off["train-triton"]["why"]
    assert not off["query-triton"]["ok"] and "tracks differ" in off["query-triton"]["why"]
