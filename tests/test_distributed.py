"""Data-parallel training on 2 gloo ranks (torchrun, CPU): the same model as one rank with twice the
pairs, exact resumption after a kill, world size 1 as the plain command, and the sharded queries."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import tol, torch_threads
from test_sampler import make_sequence

import fastomni.optimize as opt_mod
from fastomni.config import preset
from fastomni.distributed import rank_generator, shard
from fastomni.inputs import InputError
from fastomni.optimize import load_run, optimize
from fastomni.sampler import PairSampler

CFG = preset("cpu").replace(num_pairs=2, num_pts=8, num_samples_ray=4, num_iters=4, i_weight=2, i_cache=2,
                            i_print=1, use_error_map=False, start_interval=2, chunk_size=64, lrate_decay_steps=3)
FLAGS = ["--preset", "cpu", "--num_pairs", "2", "--num_pts", "8", "--num_samples_ray", "4", "--i_weight", "2",
         "--i_cache", "2", "--i_print", "1", "--start_interval", "2", "--chunk_size", "64", "--lrate_decay_steps", "3",
         "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "fastomni", *args]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(_torchrun_cmd(nproc, *args), env=ENV, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    return make_sequence(tmp_path_factory.mktemp("seq"))


@pytest.fixture(scope="module")
def two_rank_run(seq, tmp_path_factory):
    """4 steps on 2 ranks, 2 pairs each."""
    run = str(tmp_path_factory.mktemp("r2"))
    _torchrun(2, "train", seq, "--out", run, "--num_iters", "4", "--use_error_map", "false", *FLAGS, "--i_weight", "1")
    return run


def _log_numbers(path: str) -> np.ndarray:
    with open(path) as f:
        return np.array([[float(v) for v in re.findall(r": (-?[\d.]+(?:e-?\d+)?)", line)] for line in f])


def test_rank_streams():
    assert shard(7, 0, 3) == range(0, 3) and shard(7, 1, 3) == range(3, 5) and shard(7, 2, 3) == range(5, 7)
    assert shard(1, 1, 2) == range(1, 1)
    assert rank_generator(12, 0).bit_generator.state == np.random.Generator(np.random.PCG64(12)).bit_generator.state
    assert rank_generator(12, 0).integers(1 << 30) != rank_generator(12, 1).integers(1 << 30)


def _both_ranks_batch(samplers, step):
    parts = [s.sample(step) for s in samplers]
    return {k: torch.cat([p[k] for p in parts]).to(torch.float64) if parts[0][k].is_floating_point()
            else torch.cat([p[k] for p in parts]) for k in parts[0]}


def _samplers(seq_dir, ranks, num_pairs=2):
    out = []
    for r in ranks:
        s = PairSampler(seq_dir, num_pairs, CFG.num_pts, CFG.num_imgs, CFG.start_interval, CFG.use_count_map, False,
                        seed=CFG.loader_seed)
        s.rng = rank_generator(CFG.loader_seed, r)
        out.append(s)
    return out


def _train_float64(seq_dir, num_pairs, steps, comm=None, ranks=(0,)):
    """``steps`` training steps of a float64 model on the pairs of ``ranks``' samplers (concatenated)."""
    from fastomni.optimize import build_model
    from fastomni.train import make_optimizer, training_step

    samplers = _samplers(seq_dir, ranks, num_pairs)
    model = build_model(CFG, samplers[0].num_imgs, samplers[0].h, samplers[0].w).double()
    optimizer, scheduler = make_optimizer(model, CFG.lr_feature, CFG.lr_deform, CFG.lr_color, CFG.lrate_decay_steps)
    generator = torch.Generator().manual_seed(CFG.seed)
    losses = []
    for step in range(1, steps + 1):
        r = training_step(model, optimizer, scheduler, _both_ranks_batch(samplers, step), step, generator=generator,
                          **({} if comm is None else {"comm": comm}))
        losses.append(r.loss)
    return model.state_dict(), losses


def _float64_rank(rank, store_path, seq_dir, out_path):
    import torch.distributed as dist

    from fastomni.distributed import Comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        state, losses = _train_float64(seq_dir, 2, 3, Comm(rank, 2, rank), ranks=(rank,))
        if rank == 0:
            torch.save({"state": state, "losses": losses}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_rank_with_twice_the_pairs(seq, tmp_path):
    """3 steps of 2 gloo ranks x 2 pairs == 3 steps of one process with those 4 pairs (rank 0's, then
    rank 1's), in float64 so that Adam's normalization (which turns a gradient's float32 rounding into
    an update of up to ~lr where the gradient is ~0) does not hide a difference."""
    os.environ["OMP_NUM_THREADS"] = "1"
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_float64_rank, args=(str(tmp_path / "store"), seq, out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    ref_state, ref_losses = _train_float64(seq, 2, 3, ranks=(0, 1))
    np.testing.assert_allclose(two["losses"], ref_losses, rtol=1e-12)
    for k in ref_state:
        torch.testing.assert_close(two["state"][k], ref_state[k], **tol(torch.float64), msg=k)
    alone, _ = _train_float64(seq, 2, 3)  # rank 0's pairs only: rank 1's pairs changed the model
    assert max(float((alone[k] - ref_state[k]).abs().max()) for k in ref_state) > 1e-4


def test_torchrun_two_ranks_gradient_and_losses(seq, two_rank_run, tmp_path, monkeypatch):
    """The float32 command: the first step's gradient (Adam's first moment / 0.1) and the logged losses
    of a 2-rank torchrun run are those of the plain loop with num_pairs 4 and the same pairs."""

    class BothRanks(PairSampler):
        def __init__(self, seq_dir, num_pairs, *args, seed, **kw):
            super().__init__(seq_dir, num_pairs, *args, seed=seed, **kw)
            self.ranks = [PairSampler(seq_dir, num_pairs // 2, *args, seed=seed, **kw) for _ in range(2)]
            for r, sampler in enumerate(self.ranks):
                sampler.rng = rank_generator(seed, r)

        def sample(self, step):
            parts = [s.sample(step) for s in self.ranks]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    monkeypatch.setattr(opt_mod, "PairSampler", BothRanks)
    optimize(seq, str(tmp_path / "r1"), CFG.replace(num_pairs=4, num_iters=2, i_weight=1), progress=False)
    a = torch.load(str(tmp_path / "r1" / "model_000001.pth"), weights_only=True)["optimizer"]["state"]
    b = torch.load(os.path.join(two_rank_run, "model_000001.pth"), weights_only=True)["optimizer"]["state"]
    assert a.keys() == b.keys()
    t = tol(torch.float32)
    for k in a:  # float32 sums in another order: tolerance relative to each gradient's scale
        scale = float(a[k]["exp_avg"].abs().max())
        torch.testing.assert_close(b[k]["exp_avg"], a[k]["exp_avg"], rtol=t["rtol"], atol=t["rtol"] * scale)
    np.testing.assert_allclose(_log_numbers(os.path.join(two_rank_run, "log.txt"))[:2],
                               _log_numbers(str(tmp_path / "r1" / "log.txt")), atol=2e-5)


def test_resume_refuses_another_world_size(seq, two_rank_run, tmp_path):
    import shutil

    run = str(tmp_path / "copy")
    shutil.copytree(two_rank_run, run)
    with pytest.raises(InputError, match="2 rank"):
        optimize(seq, run, CFG.replace(num_iters=5), progress=False)
    assert opt_mod.latest_checkpoint(run).endswith("model_000004.pth")  # nothing written
    assert optimize(seq, run, CFG.replace(num_iters=5), progress=False, allow_resize=True).step == 5


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_killed_two_rank_run_resumes_exactly(seq, tmp_path):
    """SIGKILL to every process of a 2-rank run after its step-4 checkpoint, then the same command
    (to step 12) again: the same checkpoint, sampler streams, hard-mining cache and log as a run
    never stopped."""
    flags = [*FLAGS, "--use_error_map", "true", "--i_cache", "3"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    _torchrun(2, "train", seq, "--out", ref, "--num_iters", "12", *flags)
    proc = subprocess.Popen(_torchrun_cmd(2, "train", seq, "--out", run, "--num_iters", "100000", *flags), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not os.path.exists(os.path.join(run, "model_000004.pth")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run to kill ended or stalled"
            time.sleep(0.05)
    finally:  # the ranks first (torchrun starts each in its own session), then torchrun itself
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = opt_mod.checkpoint_step(opt_mod.latest_checkpoint(run))
    assert 4 <= killed_at < 12, killed_at
    _torchrun(2, "train", seq, "--out", run, "--num_iters", "12", *flags)
    a = torch.load(os.path.join(ref, "model_000012.pth"), weights_only=True)
    b = torch.load(os.path.join(run, "model_000012.pth"), weights_only=True)
    for net in ("deform_mlp", "feature_mlp", "color_mlp"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    assert a["rng"]["sampler_ranks"] == b["rng"]["sampler_ranks"] and a["world_size"] == b["world_size"] == 2
    assert a["rng"]["sampler_ranks"][0] != a["rng"]["sampler_ranks"][1]
    with np.load(os.path.join(ref, "error_cache_000009.npz")) as za, \
            np.load(os.path.join(run, "error_cache_000009.npz")) as zb:
        assert np.array_equal(za["error_maps"], zb["error_maps"])
    with open(os.path.join(ref, "log.txt")) as fa, open(os.path.join(run, "log.txt")) as fb:
        assert fa.read() == fb.read()


def test_world_size_one_is_the_plain_command(seq, tmp_path):
    """Bit for bit, with one torch thread on both sides (the command's default here is half the
    cores; on some CPUs another thread count splits the GEMMs into blocks rounded differently)."""
    _torchrun(1, "--threads", "1", "train", seq, "--out", str(tmp_path / "t1"), "--num_iters", "4", "--use_error_map",
              "true", *FLAGS)
    with torch_threads(1):
        plain = optimize(seq, str(tmp_path / "p"), CFG.replace(use_error_map=True), progress=False)
    a = torch.load(plain.checkpoint, weights_only=True)
    b = torch.load(str(tmp_path / "t1" / "model_000004.pth"), weights_only=True)
    assert a.keys() == b.keys() and "world_size" not in b
    for net in ("deform_mlp", "feature_mlp", "color_mlp"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert a["rng"]["sampler"] == b["rng"]["sampler"]
    with open(plain.run_dir + "/log.txt") as fa, open(tmp_path / "t1" / "log.txt") as fb:
        assert fa.read() == fb.read()


# -- collectives and sharded queries, 2 spawned gloo ranks ------------------------------------------
def _ranks_worker(rank: int, store_path: str):
    import torch.distributed as dist

    from fastomni.distributed import Comm, pair_flows_sharded, sharded_iter_tracks
    from fastomni.nn import OmniMotion
    from fastomni.query import iter_tracks, pair_flows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        comm = Comm(rank, 2, rank)
        # gather: rank order, own part keeps its graph, bools stay bools
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        mask = torch.tensor([rank == 0, True])
        xs, masks = comm.gather([x * 2, mask])
        assert xs.shape == (4, 3) and masks.dtype == torch.bool and masks.tolist() == [True, True, False, True]
        assert xs[:2].eq(2).all() and xs[2:].eq(4).all()
        xs.sum().backward()
        assert x.grad.eq(2).all()  # only the own part is differentiated
        # gradient sum; a parameter touched by no rank keeps grad None, one touched by one rank gets it
        lin = torch.nn.Linear(2, 1)
        lin.weight.grad = torch.full((1, 2), float(rank + 1))
        lin.bias.grad = torch.ones(1) if rank == 1 else None
        comm.reduce_grads(lin)
        assert lin.weight.grad.eq(3).all() and lin.bias.grad.eq(1).all()
        lin.weight.grad = lin.bias.grad = None
        comm.reduce_grads(lin)
        assert lin.weight.grad is None and lin.bias.grad is None
        assert comm.any(rank == 1) and not comm.any(False)
        # the hard-mining flows and tracks split over ranks equal one process's, to float32 rounding: a
        # rank's share can be a GEMM of a few rows, which some CPUs (AVX2) compute by another kernel
        torch.manual_seed(0)
        model = OmniMotion(num_imgs=5, h=8, w=10, num_samples_ray=4)
        ids1, ids2 = np.arange(5), np.array([1, 2, 3, 4, 3])
        np.testing.assert_allclose(pair_flows_sharded(comm, model, ids1, ids2, chunk_size=16),
                                   pair_flows(model, ids1, ids2, chunk_size=16), rtol=0, atol=1e-4)
        q = np.array([[0, 1.0, 2.0], [1, 3.0, 4.0], [4, 7.0, 9.0]])
        for (j, xy, occ, sc), (j1, xy1, occ1, sc1) in zip(sharded_iter_tracks(comm, model, q, chunk_size=16),
                                                          iter_tracks(model, q, chunk_size=16), strict=True):
            assert j == j1
            np.testing.assert_allclose(xy, xy1, rtol=0, atol=1e-4)
            np.testing.assert_array_equal(occ, occ1)
            np.testing.assert_allclose(sc, sc1, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_collectives_and_sharded_queries(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_ranks_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_torchrun_export_splits_pixels_and_writes_one_file(two_rank_run, tmp_path):
    from fastomni.query import export_dense, load_tracks

    _torchrun(2, "export", two_rank_run, "--out", str(tmp_path / "d2.npz"), "--exact_occlusion", "--quiet")
    model, cfg, _ = load_run(two_rank_run, device="cpu")
    export_dense(model, 0, str(tmp_path / "d1.npz"), cfg.use_max_loc, cfg.occlusion_th, chunk_size=cfg.chunk_size,
                 progress=False)
    a, b = load_tracks(str(tmp_path / "d1.npz")), load_tracks(str(tmp_path / "d2.npz"))
    assert a.keys() == b.keys() and a["tracks"].shape == (10 * 12, 6, 2)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert sorted(os.listdir(tmp_path)) == ["d1.npz", "d2.npz"]  # one file, no temporaries
