"""bench/quality.py runs end to end at a tiny size and writes the report's keys (not a timing test)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "quality.py")


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_bench_tiny(quality, tmp_path, capsys):
    out = tmp_path / "q.json"
    quality.main(["--clips", "nonrigid", "--frames", "4", "--size", "24", "--points", "12", "--budget-scale", "0.008",
                  "--threads", "1", "--json", str(out), "--workdir", str(tmp_path / "work"), "--quiet"])
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "settings", "clips", "summary", "total_s"}
    assert {"cpu", "cores", "torch", "threads"} <= set(report["machine"])
    (clip,) = report["clips"]
    assert "error" not in clip and set(clip["systems"]) == set(quality.SYSTEMS)
    for name, system in clip["systems"].items():
        assert "error" not in system, system.get("traceback")
        assert {"metrics", "timings", "steps"} <= set(system)
        assert {"average_jaccard", "average_pts_within_thresh", "occlusion_accuracy"} <= set(system["metrics"]["strided"])
        assert set(system["timings"]) == {"preprocess", "optimize", "query", "total"}
        budget = system["metrics"]["error_budget"]
        assert budget["average_jaccard"] == system["metrics"]["strided"]["average_jaccard"]
        assert budget["both"] >= max(budget["found"], budget["exact"]) - 1e-12
        if name not in ("chained", "chained_fine", "chained_refined"):  # no model, no steps
            assert system["steps"] >= 1 and system["checkpoints"][-1]["step"] == system["steps"]
            assert "time_to_chained_aj_s" in system
    assert clip["systems"]["fast2x"]["steps"] == 2 * clip["systems"]["fast"]["steps"]
    printed = capsys.readouterr().out
    assert "| nonrigid | fast |" in printed and "Error budget" in printed
    assert not os.listdir(tmp_path / "work")  # run folders are removed unless --keep


def test_quality_bench_records_a_failed_clip(quality, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(quality, "run_clip", broken)
    report = quality.main(["--clips", "2", "--frames", "4", "--size", "24", "--quiet", "--workdir", str(tmp_path)])
    assert [c["error"] for c in report["clips"]] == ["RuntimeError: boom"] * 2
