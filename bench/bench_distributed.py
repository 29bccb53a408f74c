"""Data-parallel training steps on 1 and 2 gloo ranks (CPU): steps per second, and the share of a
step spent in the gradient all-reduce and in the loss inputs' all-gather (see
:mod:`fastomni.distributed`). Not a timed test: on a machine with 2 cores, 2 ranks cannot be faster
than 1 (each rank does a full step on its own pairs); the point is the communication's overhead.

Run: ``python bench/bench_distributed.py [--family original|fast] [--steps 20] [--json OUT]``
(``original``: the ``cpu`` preset's networks and batch, 4 pairs x 64 points x 8 samples per rank;
``fast``: the ``fast`` preset's grid model, 4 x 128 x 8). Each configuration runs in fresh processes
(torch.multiprocessing spawn, a FileStore rendezvous), one torch thread per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastomni.config import preset
from fastomni.distributed import Comm
from fastomni.optimize import build_model
from fastomni.train import make_optimizer, synthetic_batch, training_step

WARMUP = 3
FRAMES = 24
SIZES = {"original": ("cpu", 64), "fast": ("fast", 128)}


class _TimedComm(Comm):
    """A :class:`Comm` that adds up the seconds and bytes of its gathers and gradient reductions."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reset()

    def reset(self):
        self.seconds = {"all_reduce": 0.0, "all_gather": 0.0}
        self.bytes = {"all_reduce": 0, "all_gather": 0}

    def gather(self, tensors):
        start = time.perf_counter()
        out = super().gather(tensors)
        self.seconds["all_gather"] += time.perf_counter() - start
        self.bytes["all_gather"] += 4 * sum(t.numel() for t in tensors)
        return out

    def reduce_grads(self, model):
        start = time.perf_counter()
        super().reduce_grads(model)
        self.seconds["all_reduce"] += time.perf_counter() - start
        self.bytes["all_reduce"] += 4 * (sum(p.numel() for p in model.parameters()) + len(list(model.parameters())))


def _rank(rank: int, world: int, store: str, family: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    comm = None
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        comm = _TimedComm(rank, world, rank)
    name, size = SIZES[family]
    cfg = preset(name)
    model = build_model(cfg, FRAMES, size, size)
    optimizer, scheduler = make_optimizer(model, cfg.lr_feature, cfg.lr_deform, cfg.lr_color, cfg.lrate_decay_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = [synthetic_batch(model, cfg.num_pairs, cfg.num_pts, seed=1000 * rank + s) for s in range(WARMUP + steps)]
    kw = {} if comm is None else {"comm": comm}
    for s in range(WARMUP):
        training_step(model, optimizer, scheduler, batches[s], s + 1, generator=generator, **kw)
    if comm is not None:
        comm.reset()
        dist.barrier()
    start = time.perf_counter()
    for s in range(WARMUP, WARMUP + steps):
        training_step(model, optimizer, scheduler, batches[s], s + 1, generator=generator, **kw)
    seconds = time.perf_counter() - start
    if rank == 0:
        result = {"world_size": world, "steps": steps, "steps_per_s": steps / seconds,
                  "pairs_per_s": steps * world * cfg.num_pairs / seconds,
                  "parameters": sum(p.numel() for p in model.parameters())}
        if comm is not None:
            for k in comm.seconds:
                result[f"{k}_share"] = comm.seconds[k] / seconds
                result[f"{k}_bytes_per_step"] = comm.bytes[k] // steps
        with open(out, "w") as f:
            json.dump(result, f)
    if comm is not None:
        dist.destroy_process_group()


def measure(family: str, world: int, steps: int) -> dict:
    """Spawn ``world`` ranks, time ``steps`` training steps after a warm-up; rank 0's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), family, steps, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(SIZES), default="original")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    results = [measure(args.family, world, args.steps) for world in (1, 2)]
    for r in results:
        line = (f"{args.family}: {r['world_size']} rank(s): {r['steps_per_s']:.2f} steps/s, "
                f"{r['pairs_per_s']:.1f} pairs/s")
        if r["world_size"] > 1:
            line += (f"; all-reduce {100 * r['all_reduce_share']:.1f}% of the step "
                     f"({r['all_reduce_bytes_per_step'] / 2**20:.1f} MiB), "
                     f"all-gather {100 * r['all_gather_share']:.1f}% ({r['all_gather_bytes_per_step'] / 2**10:.1f} KiB)")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
