"""Data-parallel training and sharded queries on ``torch.distributed`` (``torchrun``; gloo on CPU,
NCCL on CUDA).

Under ``torchrun --nproc_per_node=N`` every rank holds the whole model, draws its own
``num_pairs`` pairs from its own sampler stream (:func:`rank_generator`: the loader seed's PCG64
stream jumped ``rank`` times, so the streams never overlap and rank 0's is the plain run's), and
all ranks take the same optimizer step. The effective batch is ``N x num_pairs``.

**Why an explicit all-reduce and not DDP.** The original's losses are not sums of per-pair
terms: each masked L1 drops the largest error of the whole batch, the gradient losses difference
consecutive points of the batch's flattened point list, and the rgb and flow means divide by the
batch's count of in-image points, which differs between ranks. DDP averages per-rank gradients,
i.e. it optimizes the mean of N per-rank losses, which is not the loss of the N x ``num_pairs``
batch. Here each rank instead computes the loss of the *global* batch: its own per-point loss
inputs keep their autograd graph, the other ranks' arrive detached through one ``all_gather``
(:meth:`Comm.gather`, about ``13 + K/4`` floats per sampled point), so every rank evaluates the
same scalar, and rank r's backward yields the part of the gradient that flows through its own
pairs. One ``all_reduce(SUM)`` of the flattened gradients after backward (:meth:`Comm.reduce_grads`)
then gives every rank exactly the gradient of the global loss: a 2-rank run equals a 1-rank run
with twice ``num_pairs`` and the same pairs, up to float32 summation order. The custom ops
(``register_autograd``) need nothing special: the comm happens outside them, on plain tensors.
The ray jitter of the global batch is drawn on every rank from the shared generator and sliced
(:meth:`Comm.rank_noise`), as a 1-rank run with the larger batch draws it.

Rank 0 alone writes checkpoints, logs, snapshots and the hard-mining cache; the other ranks only
read the run folder (when resuming), so for several nodes it must be on a shared file system.

Example (two processes on one machine)::

    torchrun --standalone --nproc_per_node=2 -m fastomni train SEQ --out RUN --preset fast
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "export_dense_sharded", "init_from_env", "leave", "pair_flows_sharded", "rank_generator", "shard",
           "sharded_iter_tracks"]


def rank_generator(seed: int, rank: int) -> np.random.Generator:
    """Rank ``rank``'s sampler stream: ``PCG64(seed)`` jumped ``rank`` times (2^127 draws apart;
    rank 0's is ``PCG64(seed)`` itself, the single-process stream)."""
    return np.random.Generator(np.random.PCG64(seed).jumped(rank) if rank else np.random.PCG64(seed))


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world_size`` takes (sizes differ by <= 1)."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


@dataclass
class Comm:
    """This process's place in the process group: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (one tiny all-reduce)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- training ------------------------------------------------------------------------------
    def rank_noise(self, generator: torch.Generator | None, lead: tuple[int, int], num_samples: int,
                   dtype: torch.dtype, device: torch.device) -> Tensor:
        """This rank's rows ``[n, P, K]`` of the global batch's ray jitter ``[N n, P, K]``, drawn from the
        (identical on every rank) ``generator`` exactly as a 1-rank run with ``N n`` pairs draws it."""
        n, p = lead
        noise = torch.rand(self.world_size * n, p, num_samples, generator=generator, dtype=dtype, device=device)
        return noise[self.rank * n:(self.rank + 1) * n]

    def gather(self, tensors: list[Tensor]) -> list[Tensor]:
        """Concatenate each tensor over ranks along dim 0 (rank order), in one ``all_gather``: this rank's
        part is the tensor itself (its graph kept), the others' are detached copies. Every tensor must
        have the same shape on every rank; bool tensors come back bool."""
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat)
        sizes = [t.numel() for t in tensors]
        out = []
        per_rank = [p.split(sizes) for p in parts]
        for k, t in enumerate(tensors):
            pieces = [t if r == self.rank else per_rank[r][k].reshape(t.shape).to(t.dtype)
                      for r in range(self.world_size)]
            out.append(torch.cat(pieces))
        return out

    def reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over ranks (one flattened ``all_reduce``). A parameter no rank
        touched keeps ``grad = None``, as in a single process (Adam skips it)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        ref = params[0]
        has = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params] + [has])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        grads = flat[:-len(params)].split([p.numel() for p in params])
        for p, g, touched in zip(params, grads, flat[-len(params):].tolist()):
            p.grad = g.reshape(p.shape).clone() if touched > 0 else None


_joined = False  # whether init_from_env created the default process group (leave() destroys it)


def init_from_env(timeout: timedelta | None = None) -> Comm | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``): NCCL with one GPU per local rank when CUDA is available, else
    gloo; ``timeout`` bounds a collective's wait (torch's default, 10-30 min, when None). Returns
    None, and initializes nothing, outside torchrun or with ``WORLD_SIZE=1`` (the plain
    single-process path)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    global _joined
    if not dist.is_initialized():
        kw = {} if timeout is None else {"timeout": timeout}
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", **kw)
        else:
            dist.init_process_group("gloo", **kw)
        _joined = True
    return Comm(dist.get_rank(), dist.get_world_size(), local_rank)


def leave() -> None:
    """Destroy the process group :func:`init_from_env` created, if it did (one created by the caller
    is left alone), before the interpreter exits: left to the exit, gloo's threads can abort the
    process ("terminate called without an active exception", seen once in a 2-rank test run)."""
    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


# -- sharded inference ----------------------------------------------------------------------------
def pair_flows_sharded(comm: Comm, model, ids1, ids2, use_max_loc: bool = True, chunk_size: int = 10000) -> np.ndarray:
    """:func:`fastomni.query.pair_flows` with the pairs split over ranks (contiguous blocks) and
    gathered: every rank returns all ``[n, H, W, 2]`` flows."""
    from fastomni.query import pair_flows

    n = len(ids1)
    mine = shard(n, comm.rank, comm.world_size)
    per = -(-n // comm.world_size)
    dev = next(model.parameters()).device
    block = torch.zeros(per, model.h, model.w, 2, device=dev)
    if len(mine):
        block[:len(mine)] = torch.from_numpy(pair_flows(model, np.asarray(ids1)[mine.start:mine.stop],
                                                        np.asarray(ids2)[mine.start:mine.stop], use_max_loc,
                                                        chunk_size)).to(dev)
    parts = [torch.empty_like(block) for _ in range(comm.world_size)]
    dist.all_gather(parts, block)
    return torch.cat([p[:len(shard(n, r, comm.world_size))] for r, p in enumerate(parts)]).cpu().numpy()


def sharded_iter_tracks(comm: Comm, model, query_points, use_max_loc: bool = True, occlusion_th: float = 0.99,
                        chunk_size: int = 10000, progress: bool = False
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`fastomni.query.iter_tracks` with the query points split over ranks (contiguous blocks);
    per target frame the blocks are gathered, so every rank yields the full ``(j, xy [N, 2],
    occluded [N], scores [N])``. Every rank must consume the whole iterator."""
    from fastomni.query import check_query_points, iter_tracks

    q = check_query_points(query_points, model.num_imgs, model.h, model.w)
    n = len(q)
    mine = shard(n, comm.rank, comm.world_size)
    per = -(-n // comm.world_size)
    dev = comm._device()
    own = iter_tracks(model, q[mine.start:mine.stop], use_max_loc, occlusion_th, chunk_size,
                      progress=progress and comm.is_main) if len(mine) else None
    for j in range(model.num_imgs):
        block = torch.zeros(per, 4, dtype=torch.float32, device=dev)  # x, y, occluded, score
        if own is not None:
            jj, xy, occ, sc = next(own)
            assert jj == j
            block[:len(mine)] = torch.from_numpy(np.concatenate([xy, occ[:, None], sc[:, None]], 1).astype(np.float32))
        parts = [torch.empty_like(block) for _ in range(comm.world_size)]
        dist.all_gather(parts, block)
        full = torch.cat([p[:len(shard(n, r, comm.world_size))] for r, p in enumerate(parts)]).cpu().numpy()
        yield j, full[:, :2].copy(), full[:, 2] > 0.5, full[:, 3].copy()


def export_dense_sharded(comm: Comm, model, query_frame: int, path: str, use_max_loc: bool = True,
                         occlusion_th: float = 0.99, half: bool = False, chunk_size: int = 10000,
                         scale_to: tuple[int, int] | None = None, progress: bool = True, refine=None) -> str:
    """:func:`fastomni.query.export_dense` (exact occlusion ray) with the query frame's pixels split
    over ranks (:func:`sharded_iter_tracks`); rank 0 alone writes ``path`` (and runs ``refine``).
    Every rank must call it."""
    from fastomni.query import export_dense

    if not 0 <= query_frame < model.num_imgs:
        raise ValueError(f"query frame {query_frame} outside 0..{model.num_imgs - 1}")
    ys, xs = np.mgrid[0:model.h, 0:model.w]
    queries = np.stack([np.full(xs.size, query_frame), ys.ravel(), xs.ravel()], axis=1).astype(np.float64)
    results = sharded_iter_tracks(comm, model, queries, use_max_loc, occlusion_th, chunk_size, progress)
    if comm.is_main:
        export_dense(model, query_frame, path, use_max_loc, occlusion_th, half, chunk_size, scale_to, progress=False,
                     results=results, refine=refine)
    else:
        for _ in results:  # this rank's share of every frame's all-gather
            pass
    comm.barrier()
    return path
