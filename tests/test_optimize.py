"""The optimization loop: checkpoints in the original's format, and a run stopped by a signal or
killed between checkpoints resumes to exactly the state of a run never stopped."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_sampler import make_sequence

import fastomni.optimize as opt_mod
from fastomni.checkpoint import checkpoint_step, latest_checkpoint
from fastomni.cli import main
from fastomni.config import preset
from fastomni.optimize import Interrupted, load_run, optimize

CFG = preset("cpu").replace(num_pairs=2, num_pts=8, num_samples_ray=4, num_iters=4, i_weight=2, i_cache=2,
                            i_print=1, use_error_map=True, start_interval=2, chunk_size=64, lrate_decay_steps=3)


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    return make_sequence(tmp_path_factory.mktemp("seq"))


@pytest.fixture(scope="module")
def reference_run(seq, tmp_path_factory):
    """An uninterrupted 4-step run."""
    run = str(tmp_path_factory.mktemp("ref"))
    return optimize(seq, run, CFG, progress=False), run


def _state(result):
    ckpt = torch.load(result.checkpoint, weights_only=True)
    return result.model.state_dict(), ckpt


def _assert_same(a, b):
    (sa, ca), (sb, cb) = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k in ("step", "scheduler"):
        assert ca[k] == cb[k]
    oa, ob = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for k in oa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[k][name], ob[k][name])
    assert torch.equal(ca["rng"]["generator"], cb["rng"]["generator"])
    assert ca["rng"]["sampler"] == cb["rng"]["sampler"]


def test_checkpoints_and_files(reference_run):
    result, run = reference_run
    assert result.step == 4 and os.path.basename(result.checkpoint) == "model_000004.pth"
    names = sorted(os.listdir(run))
    assert {"model_000002.pth", "model_000004.pth", "error_cache_000002.npz", "config.txt", "log.txt"} <= set(names)
    assert "error_cache_000004.npz" not in names  # made when a step needs it, so never after the last
    assert not [n for n in names if n.startswith(".")]  # no temporaries left
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert {"optimizer", "scheduler", "deform_mlp", "feature_mlp", "color_mlp"} <= set(ckpt)  # the original's keys
    assert ckpt["num_imgs"] == 6 and tuple(ckpt["image_size"]) == (10, 12)
    with open(os.path.join(run, "log.txt")) as f:
        assert len(f.read().splitlines()) == 4
    assert not result.model.training


def test_signal_then_resume_equals_uninterrupted(seq, tmp_path, monkeypatch, reference_run):
    real_step = opt_mod.training_step

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if args[4] == 3:  # the step number: SIGTERM arrives while step 3 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(opt_mod, "training_step", step_then_signal)
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted) as info:
        optimize(seq, run, CFG, progress=False)
    assert info.value.step == 3 and info.value.checkpoint.endswith("model_000003.pth")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(opt_mod, "training_step", real_step)
    resumed = optimize(seq, run, CFG, progress=False)
    assert resumed.step == 4
    _assert_same(resumed, reference_run[0])


def test_killed_after_checkpoint_resumes_exactly(seq, tmp_path, reference_run):
    run = str(tmp_path / "run")
    first = optimize(seq, run, CFG.replace(num_iters=2), progress=False)  # as if killed right after step 2
    assert first.step == 2
    resumed = optimize(seq, run, CFG, progress=False)
    _assert_same(resumed, reference_run[0])
    again = optimize(seq, run, CFG, progress=False)  # already done: nothing more
    assert again.step == 4 and again.checkpoint == resumed.checkpoint


def test_load_run_gives_the_trained_model(reference_run):
    result, run = reference_run
    model, cfg, step = load_run(run, device="cpu")
    assert step == 4 and cfg.num_samples_ray == 4 and (model.h, model.w, model.num_imgs) == (10, 12, 6)
    for k, v in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_refuses_mismatched_or_forbidden_resume(seq, reference_run):
    _, run = reference_run
    with pytest.raises(ValueError, match="num_samples_ray: 4 -> 6"):
        optimize(seq, run, CFG.replace(num_samples_ray=6), progress=False)
    with pytest.raises(ValueError, match="no_reload"):
        optimize(seq, run, CFG.replace(no_reload=True), progress=False)


def test_starts_from_ckpt_path_in_a_new_folder(seq, tmp_path, reference_run):
    result, _ = reference_run
    run = str(tmp_path / "fine")
    out = optimize(seq, run, CFG.replace(ckpt_path=result.checkpoint, num_iters=5), progress=False)
    assert out.step == 5 and latest_checkpoint(run).endswith("model_000005.pth")
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        optimize(seq, str(tmp_path / "x"), CFG.replace(ckpt_path=str(tmp_path / "none.pth")), progress=False)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no color/"):
        optimize(str(tmp_path), str(tmp_path / "run"), CFG, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written for a bad sequence
    with pytest.raises(FileNotFoundError, match="no config.txt"):
        load_run(str(tmp_path))
    with pytest.raises(ValueError, match="not a torch device"):
        opt_mod.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            opt_mod.resolve_device("cuda")


def test_snapshot_written_every_i_img(seq, tmp_path):
    run = str(tmp_path / "run")
    optimize(seq, run, CFG.replace(num_iters=2, i_img=2, use_error_map=False), progress=False)
    assert os.listdir(os.path.join(run, "vis")) == ["tracks_000002.png"]
    assert not any(n.startswith("error_cache") for n in os.listdir(run))
    with open(os.path.join(run, "log.txt")) as f:
        losses = [float(re.search(r"loss: ([-0-9.e+na]+)", line).group(1)) for line in f]
    assert len(losses) == 2 and np.isfinite(losses).all()


def _files(folder):
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            st = os.stat(os.path.join(root, n))
            out[os.path.relpath(os.path.join(root, n), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def test_refuses_to_resume_a_run_of_another_clip(seq, tmp_path, reference_run):
    _, ref = reference_run
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    before = _files(run)
    other_size = make_sequence(tmp_path / "small", h=8, w=10)
    with pytest.raises(ValueError, match=r"another clip \(image size: 12x10 -> 10x8; data_dir: "):
        optimize(other_size, run, CFG.replace(num_iters=6), progress=False)
    other_len = make_sequence(tmp_path / "short", t=5)
    with pytest.raises(ValueError, match="frames: 6 -> 5"):
        optimize(other_len, run, CFG.replace(num_iters=6), progress=False)
    moved = str(tmp_path / "moved")
    shutil.copytree(seq, moved)  # the same frames elsewhere: another data_dir all the same
    with pytest.raises(ValueError, match=f"data_dir: {re.escape(seq)} -> {re.escape(moved)}"):
        optimize(moved, run, CFG.replace(num_iters=6), progress=False)
    assert _files(run) == before  # config.txt, log.txt, checkpoints: nothing rewritten
    with pytest.raises(ValueError, match="image size"):  # a ckpt_path of another clip, into a new folder
        optimize(other_size, str(tmp_path / "new"), CFG.replace(ckpt_path=latest_checkpoint(ref)), progress=False)
    assert not (tmp_path / "new").exists()


def _logged_steps(run):
    path = os.path.join(run, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [int(m.group(1)) for m in re.finditer(r"^step: (\d+) ", f.read(), re.M)]


def _assert_equal_nested(a, b, where="checkpoint"):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_sigkill_between_checkpoints_resumes_exactly(seq, tmp_path):
    """A real training process, SIGKILLed after a checkpoint and some later steps, then run again:
    the final checkpoint (model, Adam, schedule, RNGs, sampler) and the log equal an uninterrupted run."""
    argv = [sys.executable, "-m", "fastomni", "--threads", "1", "train", seq, "--preset", "cpu", "--num_pairs", "2",
            "--num_pts", "8", "--num_samples_ray", "4", "--num_iters", "8", "--i_weight", "3", "--i_cache", "3",
            "--use_error_map", "true", "--i_print", "1", "--start_interval", "2", "--chunk_size", "64",
            "--lrate_decay_steps", "3", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    assert main(argv[3:] + ["--out", ref]) == 0  # uninterrupted, in this process: the same numbers

    proc = subprocess.Popen(argv + ["--out", run], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, "training finished before it could be killed"
            assert time.monotonic() < deadline
            ckpt = latest_checkpoint(run) if os.path.isdir(run) else None
            if ckpt and max(_logged_steps(run), default=0) > checkpoint_step(ckpt):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    last, logged = checkpoint_step(latest_checkpoint(run)), _logged_steps(run)
    assert last < max(logged) < 8  # killed between two checkpoints, with steps after the last one logged

    subprocess.run(argv + ["--out", run], check=True, env=env, capture_output=True)
    assert _logged_steps(run) == list(range(1, 9))  # the redone steps are listed once
    with open(os.path.join(ref, "log.txt")) as f, open(os.path.join(run, "log.txt")) as g:
        assert g.read() == f.read()  # and with the same losses
    _assert_equal_nested(torch.load(os.path.join(run, "model_000008.pth"), weights_only=True),
                         torch.load(os.path.join(ref, "model_000008.pth"), weights_only=True))


def test_resume_drops_log_lines_after_the_checkpoint(seq, tmp_path):
    run = str(tmp_path / "run")
    optimize(seq, run, CFG.replace(num_iters=2), progress=False)
    with open(os.path.join(run, "log.txt"), "a") as f:
        f.write("step: 3 | loss: 1.0 | lr: 0.1\nstep: 4 | loss: 1.0 | lr: 0.1\nstep: 5 | lo")  # then killed
    optimize(seq, run, CFG, progress=False)
    assert _logged_steps(run) == [1, 2, 3, 4]
