"""One command that verifies a GPU machine end to end: ``python bench/gpu_check.py``.

On a machine with a CUDA GPU and a CUDA build of torch (no network needed) it runs, in order, each
step under its own time limit and all of them within ``--budget`` seconds (8 minutes by default):

1. ``build``: the CUDA extension, ``FASTOMNI_BUILD_CUDA=1 FASTOMNI_REQUIRE_NATIVE=1 pip install -e .
   --no-build-isolation --no-deps`` (a failed native build is an error);
2. ``backends``: every op reports ``triton`` and ``cuda`` available (else their tests would skip);
3. ``op-tests``: every op test and the Triton launch checks for ``triton`` and ``cuda``, full-width
   tests included (``pytest -k "triton or cuda"``);
4. ``golden``: the golden test for ``triton`` and ``cuda``;
5. ``train-<backend>`` for ``reference``, ``triton``, ``cuda``: the default training step (8 pairs x
   256 points x 32 samples, OmniMotion 50 frames of 270 x 480), one fresh process each: the first
   step's losses on the same weights and batch (compared with the reference's, relative tolerance
   ``LOSS_RTOL``), then ``--steps`` steps timed with ``torch.cuda.synchronize()`` (median), each in
   an NVTX range ``gpu_check.train_step`` (``nsys profile -t cuda,nvtx python bench/gpu_check.py``
   shows them), and the peak ``torch.cuda.max_memory_allocated``;
6. ``query-<backend>``: a dense query (:func:`fastomni.query.dense_tracks`, every pixel of frame 0
   of a 24-frame 64 x 64 model to every frame), timed the same way, tracks compared with the
   reference's.

It prints one markdown table and writes the results as JSON (``--json``, default
``gpu_check.json``; written to a temporary file, then renamed). It exits 0 only if every step passed.

``--dry-run`` prints the plan (each step and its exact command) and exits 0 on any machine. Without
it, on a machine without a CUDA device, it exits 2 and says so.

Workers (internal): ``--worker backends`` and ``--worker train|query --backend B [--device D]
[--small]`` run one step and print one JSON line; ``--device cpu --small`` lets the tests run the
timing workers without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("reference", "triton", "cuda")
OP_TESTS = ["tests/test_affine_coupling.py", "tests/test_gabor_filter.py", "tests/test_composite.py",
            "tests/test_grid_encode.py", "tests/test_stratified_sample.py", "tests/test_triton_launches.py"]
# float32 losses of one step by two backends: the kernels reorder sums (and Triton's float32 dots are
# tf32x3), so they agree to a few float32 ulps of each term, amplified by the network: 1e-4 relative
LOSS_RTOL = 1e-4
# dense-query tracks of two backends, pixels (float32 positions through 12 coupling layers and back)
TRACK_ATOL = 1e-2


@dataclass
class Step:
    """One step of the plan: a command run from the repository root with extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 120
    what: str = ""

    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def plan(steps: int) -> list[Step]:
    """The steps, in order (see the module docstring)."""
    py = sys.executable
    me = os.path.relpath(os.path.abspath(__file__), REPO)
    out = [
        Step("build", [py, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps"],
             {"FASTOMNI_BUILD_CUDA": "1", "FASTOMNI_REQUIRE_NATIVE": "1"}, 240,
             "build the CUDA extension (sm_80, sm_90 SASS + compute_90 PTX)"),
        Step("backends", [py, me, "--worker", "backends"], {}, 60, "every op has triton and cuda available"),
        Step("op-tests", [py, "-m", "pytest", "-q", "-rs", *OP_TESTS, "-k", "triton or cuda"], {}, 300,
             "op tests (forward, backward, gradcheck, opcheck, full width) for triton and cuda"),
        Step("golden", [py, "-m", "pytest", "-q", "-rs", "tests/test_golden.py", "-k", "triton or cuda"], {}, 120,
             "golden tensors for triton and cuda"),
    ]
    for backend in BACKENDS:
        out.append(Step(f"train-{backend}", [py, me, "--worker", "train", "--backend", backend, "--steps", str(steps)],
                        {}, 120, f"training step on {backend}: time, peak memory, losses"))
    for backend in BACKENDS:
        out.append(Step(f"query-{backend}", [py, me, "--worker", "query", "--backend", backend], {}, 120,
                        f"dense query on {backend}: time, tracks"))
    return out


# ----------------------------------------------------------------------------------------------- workers

def _timed(fn, device: str, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, synchronizing the GPU around each."""
    import torch

    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else None


def worker_backends() -> dict:
    """Why ``triton`` or ``cuda`` cannot run an op here, per backend and op (empty: all available)."""
    from fastomni.ops import backends

    report = backends()
    missing = {b: {op: why for op, why in report[b].items() if why != "available"} for b in BACKENDS[1:]}
    return {b: ops for b, ops in missing.items() if ops}


def worker_train(backend: str, device: str, steps: int, small: bool) -> dict:
    """The first step's losses, then ``steps`` timed training steps (after 2 warm-up steps)."""
    import torch

    from fastomni._nvtx import annotate
    from fastomni.nn import OmniMotion
    from fastomni.ops import use_backend
    from fastomni.train import compute_losses, make_optimizer, synthetic_batch, training_step

    torch.manual_seed(0)
    pairs, pts, samples = (2, 16, 8) if small else (8, 256, 32)
    model = OmniMotion(num_imgs=50, h=270, w=480, num_samples_ray=samples).to(device)
    opt, sched = make_optimizer(model)
    batch = synthetic_batch(model, pairs, pts, seed=0)
    with use_backend(backend):
        loss, terms, _ = compute_losses(model, batch, step=1000, generator=torch.Generator(device).manual_seed(1))
        first = {"loss": float(loss.detach()), "terms": {k: float(v.detach()) for k, v in terms.items()}}
        del loss, terms
        step = [0]

        def one_step():
            with annotate("gpu_check.train_step"):
                training_step(model, opt, sched, batch, 1000 + step[0])
            step[0] += 1

        _timed(one_step, device, 2)  # warm-up: compiles, allocator
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        times = _timed(one_step, device, steps)
    return {"backend": backend, "device": device, "shape": [pairs, pts, samples], **first,
            "step_ms": 1e3 * statistics.median(times), "step_ms_all": [1e3 * t for t in times],
            "peak_mib": _peak_mib(device)}


def worker_query(backend: str, device: str, small: bool) -> dict:
    """A dense query from frame 0 (2 timed runs after one warm-up); the tracks go to a .npy file so
    the parent can compare backends."""
    import numpy as np
    import torch

    from fastomni._nvtx import annotate
    from fastomni.nn import OmniMotion
    from fastomni.ops import use_backend
    from fastomni.query import dense_tracks

    torch.manual_seed(0)
    frames, h, w, samples = (3, 8, 8, 8) if small else (24, 64, 64, 32)
    model = OmniMotion(num_imgs=frames, h=h, w=w, num_samples_ray=samples).to(device).eval()
    result = {}

    def query():
        with annotate("gpu_check.dense_query"):
            result["tracks"] = dense_tracks(model, 0)[0]

    with use_backend(backend):
        _timed(query, device, 1)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        times = _timed(query, device, 2)
    fd, path = tempfile.mkstemp(prefix=f"gpu_check_tracks_{backend}_", suffix=".npy")
    os.close(fd)
    np.save(path, result["tracks"])
    return {"backend": backend, "device": device, "shape": [frames, h, w, samples],
            "query_ms": 1e3 * statistics.median(times), "peak_mib": _peak_mib(device), "tracks_file": path}


# ------------------------------------------------------------------------------------------------ driver

def _run(step: Step, timeout_s: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, cwd=REPO, env={**os.environ, **step.env}, capture_output=True,
                              text=True, timeout=timeout_s)
        rc, stdout, out = proc.returncode, proc.stdout, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        stdout = ""
        rc, out = None, f"timed out after {timeout_s:.0f} s\n" + (exc.stdout or b"").decode(errors="replace")
    lines = stdout.strip().splitlines()
    return {"step": step.name, "command": step.command(), "rc": rc, "seconds": time.perf_counter() - start,
            "ok": rc == 0, "output_tail": out[-4000:], "last_stdout_line": lines[-1] if lines else ""}


def _compare(results: dict) -> None:
    """Marks the train/query steps of triton and cuda failed when they disagree with the reference."""
    import numpy as np

    ref_train = results.get("train-reference", {}).get("result")
    ref_query = results.get("query-reference", {}).get("result")
    ref_tracks = np.load(ref_query["tracks_file"]) if ref_query else None
    for backend in BACKENDS[1:]:
        train = results.get(f"train-{backend}", {})
        if train.get("result") and ref_train:
            got, want = train["result"], ref_train
            diffs = {k: abs(got["terms"][k] - v) / max(abs(v), 1e-12) for k, v in want["terms"].items()}
            diffs["loss"] = abs(got["loss"] - want["loss"]) / max(abs(want["loss"]), 1e-12)
            train["loss_max_rel_diff"] = max(diffs.values())
            if train["loss_max_rel_diff"] > LOSS_RTOL:
                train["ok"] = False
                train["why"] = f"losses differ from the reference's by {train['loss_max_rel_diff']:.3g} (relative)"
        query = results.get(f"query-{backend}", {})
        if query.get("result") and ref_tracks is not None:
            err = float(np.abs(np.load(query["result"]["tracks_file"]) - ref_tracks).max())
            query["tracks_max_abs_diff"] = err
            if not err <= TRACK_ATOL:
                query["ok"] = False
                query["why"] = f"tracks differ from the reference's by {err:.3g} px"


def _table(results: dict) -> str:
    ref_step = results.get("train-reference", {}).get("result", {}).get("step_ms")
    ref_query = results.get("query-reference", {}).get("result", {}).get("query_ms")
    lines = ["| step | ok | seconds | result |", "|---|---|---|---|"]
    for name, r in results.items():
        res = r.get("result") or {}
        if "step_ms" in res:
            ratio = f", {ref_step / res['step_ms']:.2f}x reference" if ref_step else ""
            mem = f", peak {res['peak_mib']:.0f} MiB" if res.get("peak_mib") is not None else ""
            diff = f", loss rel. diff {r['loss_max_rel_diff']:.2g}" if "loss_max_rel_diff" in r else ""
            detail = f"step {res['step_ms']:.1f} ms{ratio}{mem}, loss {res['loss']:.6g}{diff}"
        elif "query_ms" in res:
            ratio = f", {ref_query / res['query_ms']:.2f}x reference" if ref_query else ""
            diff = f", tracks max diff {r['tracks_max_abs_diff']:.2g} px" if "tracks_max_abs_diff" in r else ""
            detail = f"dense query {res['query_ms']:.1f} ms{ratio}{diff}"
        else:
            tail = [ln for ln in r.get("output_tail", "").splitlines() if ln.strip()]
            detail = r.get("why") or (tail[-1][:100] if tail else "")
        ok = "yes" if r["ok"] else ("not run" if r.get("rc", 0) == "not run" else "**NO**")
        lines.append(f"| {name} | {ok} | {r.get('seconds', 0):.0f} | {detail.replace('|', '/')} |")
    return "\n".join(lines)


def _write_json(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gpu_check.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit 0")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the results (default %(default)s)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps (default %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per backend (default %(default)s)")
    parser.add_argument("--worker", choices=("backends", "train", "query"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.backend is None and args.worker != "backends":
            parser.error("--worker train/query needs --backend")
        sys.path.insert(0, REPO)
        if args.worker == "backends":
            missing = worker_backends()
            print(json.dumps(missing or "triton and cuda available"))
            return 1 if missing else 0
        out = (worker_train(args.backend, args.device, args.steps, args.small) if args.worker == "train"
               else worker_query(args.backend, args.device, args.small))
        print(json.dumps(out))
        return 0

    steps = plan(args.steps)
    if args.dry_run:
        print(f"gpu_check plan ({len(steps)} steps, budget {args.budget:.0f} s, from {REPO}):")
        for i, step in enumerate(steps, 1):
            print(f"{i:2d}. {step.name}: {step.what} (limit {step.timeout_s} s)\n    $ {step.command()}")
        print(f"then: one markdown table on stdout, results as JSON in {args.json}")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is present (torch.cuda.is_available() is False"
              f"{'; torch is a CPU build' if torch.version.cuda is None else ''}); nothing was run. "
              "Use --dry-run to see the plan.", file=sys.stderr)
        return 2

    deadline = time.perf_counter() + args.budget
    results: dict[str, dict] = {}
    for step in steps:
        left = deadline - time.perf_counter()
        if left < 5:
            results[step.name] = {"step": step.name, "command": step.command(), "rc": "not run", "ok": False,
                                  "why": "not run: time budget spent"}
            continue
        print(f"== {step.name}: {step.command()}", flush=True)
        r = _run(step, min(step.timeout_s, left))
        if r["ok"] and step.name.startswith(("train-", "query-")):
            r["result"] = json.loads(r["last_stdout_line"])
        results[step.name] = r
        print(f"   {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.0f} s", flush=True)
    _compare(results)
    table = _table(results)
    print(table)
    props = torch.cuda.get_device_properties(0)
    _write_json(args.json, {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "loss_rtol": LOSS_RTOL, "track_atol": TRACK_ATOL, "steps": results, "table": table})
    print(f"results: {args.json}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
