"""Collectives with gradients for the contrastive losses, and a small spawn helper for tests.

Everything here handles a different row count on each rank (a rank's hard negatives vary from
step to step, the last batch may be short): row counts are exchanged first (one tiny all_gather),
then the rows themselves, padded to the largest rank.

- ``gather_parts_with_grad``: all_gather of several [n_i, D] tensors in ONE collective, with a
  backward that sums every rank's gradient for this rank's rows (all_reduce, then this rank's slice),
  so a loss over the gathered batch gives every rank the exact gradient of its own rows.
- ``exchange_with_grad``: point-to-point send/receive (neighbour exchange in a ring) whose backward
  sends the gradients back the way the rows came.
- ``run_spawned``: run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes on
  CPU and return the results in rank order (tests, small checks).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.autograd import Function


def require_group(world_size: int, group=None) -> None:
    """world_size > 1 needs an initialised process group of that size."""
    if world_size <= 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, or use world_size=1)")
    got = dist.get_world_size(group)
    if got != world_size:
        raise RuntimeError(f"loss built for world_size={world_size} but the process group has {got} ranks")


def gather_counts(counts: Sequence[int], world_size: int, device: torch.device, group=None) -> list[list[int]]:
    """All ranks' count vectors: ``out[r][i]`` is rank r's ``counts[i]``. No gradient."""
    if world_size <= 1:
        return [list(map(int, counts))]
    # gloo and nccl both take int64; nccl needs the tensor on the current device
    t = torch.tensor(list(counts), dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def _gather_rows(x: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Concatenate every rank's [sizes[r], ...] rows (rank order). x is this rank's rows."""
    width = max(sizes)
    if width == 0:  # every rank agrees (sizes are global): nothing to send
        return x.new_zeros((0,) + tuple(x.shape[1:]))
    x = x.contiguous()
    if x.shape[0] < width:
        x = torch.cat([x, x.new_zeros((width - x.shape[0],) + tuple(x.shape[1:]))])
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _GatherRows(Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):  # noqa: D401 - autograd signature
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # d(loss_s)/d(x_r) lives on every rank s; the rows' owner needs their sum. all_reduce works on
        # every backend (gloo has no reduce_scatter); each rank keeps its own slice.
        grad = grad.contiguous().clone()
        if grad.numel():
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


def gather_rows(x: torch.Tensor, sizes: Sequence[int], rank: int, group=None, with_grad: bool = True) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; ``sizes[r]`` is rank r's row count."""
    if len(sizes) == 1:
        return x
    if with_grad and torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, list(sizes), rank, group)
    with torch.no_grad():
        return _gather_rows(x, sizes, group)


def gather_parts_with_grad(parts: Sequence[torch.Tensor], counts: list[list[int]], rank: int, group=None,
                           with_grad: bool = True) -> list[torch.Tensor]:
    """Gather several tensors of the same width in one collective.

    ``parts`` are this rank's [n_i, D] tensors; ``counts[r][i]`` is rank r's n_i (from ``gather_counts``;
    only its first ``len(parts)`` columns are used). Returns, for each part i, the concatenation over
    ranks (rank order) of that part, with gradients flowing back to the owning rank.
    """
    k = len(parts)
    if len(counts) == 1:
        return list(parts)
    local = torch.cat(list(parts)) if k > 1 else parts[0]
    sizes = [sum(c[:k]) for c in counts]
    allrows = gather_rows(local, sizes, rank, group, with_grad=with_grad)
    out: list[list[torch.Tensor]] = [[] for _ in range(k)]
    start = 0
    for c in counts:
        for i in range(k):
            out[i].append(allrows[start:start + c[i]])
            start += c[i]
    return [torch.cat(o) for o in out]


def _p2p(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[tuple[int, ...], int]], like: torch.Tensor,
         group=None) -> list[torch.Tensor]:
    bufs = [like.new_empty(shape) for shape, _ in recvs]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst, group) for t, dst in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, b, src, group) for b, (_, src) in zip(bufs, recvs) if b.numel()]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return bufs


class _Exchange(Function):
    @staticmethod
    def forward(ctx, dsts, recvs, group, *tensors):
        ctx.dsts, ctx.recvs, ctx.group = dsts, recvs, group
        ctx.send_shapes = [tuple(t.shape) for t in tensors]
        return tuple(_p2p(list(zip(tensors, dsts)), recvs, tensors[0], group))

    @staticmethod
    def backward(ctx, *grads):
        # send each received tensor's gradient back to where it came from; receive ours from where we sent
        back = _p2p([(g, src) for g, (_, src) in zip(grads, ctx.recvs)],
                    list(zip(ctx.send_shapes, ctx.dsts)), grads[0], ctx.group)
        return (None, None, None) + tuple(back)


def exchange_with_grad(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[int, int]], group=None
                       ) -> list[torch.Tensor]:
    """Point-to-point exchange with gradient. ``sends``: (tensor, destination rank); ``recvs``:
    (source rank, row count); received tensors have the senders' trailing shape. Every pair of ranks
    must agree (what r sends to s, s receives from r with the same row count)."""
    tensors = [t for t, _ in sends]
    tail = tuple(tensors[0].shape[1:])
    return list(_Exchange.apply(tuple(d for _, d in sends), tuple(((n,) + tail, src) for src, n in recvs), group,
                                *tensors))


# -- spawned gloo processes (tests, small checks) -----------------------------------------------
def _spawn_entry(rank: int, world_size: int, fn: Callable, init: str, args: tuple, queue) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
            # plain pickle bytes: tensors travel by value (torch's queue would share them through
            # file descriptors that die with this process)
            queue.put((rank, True, pickle.dumps(result)))
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report anything to the parent, then exit
        queue.put((rank, False, traceback.format_exc()))


def run_spawned(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a gloo group
    (file:// rendezvous); returns the results in rank order. ``fn`` and ``args`` must be picklable
    (fn a module-level function of an importable module). Raises RuntimeError with the worker's
    traceback when a worker fails or does not answer within ``timeout`` seconds."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    fd, path = tempfile.mkstemp(prefix="recap-dist-")
    os.close(fd)
    os.unlink(path)  # the file store creates it; a stale file would confuse the rendezvous
    procs = [ctx.Process(target=_spawn_entry, args=(r, world_size, fn, f"file://{path}", args, q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            try:
                rank, ok, payload = q.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:  # died before reporting (crashed at import, killed)
                    raise RuntimeError(f"spawned workers exited without a result: rank, exit code {dead}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"spawned workers did not answer within {timeout:.0f}s "
                                       f"(got ranks {sorted(results)})") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if os.path.exists(path):
            os.unlink(path)
    return [results[r] for r in range(world_size)]
