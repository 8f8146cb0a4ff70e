"""Many processes, one fit: who is rank 0, which rows each rank evaluates, and how
per-datapoint tables exchange their gradients as rows instead of whole tables.

Lightning's DDP strategy runs the same program in one process per device (it
re-runs the command line for each extra local process; SLURM's ``srun`` and
``torchrun`` start them themselves). Each process trains on its shard of every
global mini-batch and DDP averages the dense gradients. This module adds what DDP
does not do:

* :func:`launch_rank`: the global rank a process *will* have, read from the
  launcher's environment before Lightning starts (so that only rank 0 takes the
  run directory's lock and writes);
* :func:`map_rows`: any per-row evaluation ``fn(x_chunk, rows_chunk) -> {name:
  (B, ...)}`` over a whole set, chunks dealt round-robin to the ranks and the
  per-row results gathered back in the original order on every rank. Chunk ``c``
  draws its random numbers from its own seed, so the result does not depend on
  the number of processes: a 2-process evaluation equals the 1-process one;
* :func:`sync_sparse_grads`: a table whose gradient is a sparse tensor (rows of a
  per-datapoint guide looked up with ``sparse=True``) is kept out of DDP's dense
  all-reduce; its rows are all-gathered instead (B x width numbers per rank and
  step instead of n_data x width) and averaged exactly as DDP averages.

With no process group (one process) every function is the plain local computation.
Nothing here branches on a model's name.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.distributed as tdist

from elbolab.inference.errors import UsageError

EVAL_CHUNK = 1000  # rows per evaluation chunk (and per seed): fixed, so results do not depend on world size


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of the running process group; (0, 1) without one."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


LAUNCHER_ADDRESS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")  # what each node of a multi-node run needs


def _env_int(name: str) -> int | None:
    """An integer environment variable (None if unset); UsageError if it is not one."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"the environment variable {name}={text[:40]!r} is not an integer") from None


PROCESSES_PER_CPU = 4  # CPU processes a run may start per core of this machine (more would only thrash)


def check_local_processes(devices: int, accelerator: str) -> None:
    """Refuse more CPU processes on this machine than it has cores to run them
    (``PROCESSES_PER_CPU`` per core): Lightning would start them all."""
    cores = os.cpu_count() or 1
    if accelerator == "cpu" and devices > PROCESSES_PER_CPU * cores:
        raise UsageError(f"devices {devices}: more CPU processes than this machine's {cores} cores can run "
                         f"(at most {PROCESSES_PER_CPU * cores})")


def launch_rank(devices: int, num_nodes: int = 1) -> int:
    """The global rank this process will have once Lightning starts a run of
    P = ``devices`` x ``num_nodes`` processes, read from the launcher's environment in
    Lightning's own order: SLURM's ``srun`` (SLURM_PROCID of SLURM_NTASKS), ``torchrun``
    (RANK of WORLD_SIZE), else Lightning's subprocess launcher, which starts local ranks
    1.. with LOCAL_RANK and WORLD_SIZE set and takes NODE_RANK from the user on
    multi-node runs (global rank NODE_RANK * devices + LOCAL_RANK).

    Rank variables are trusted only where they describe this run, since only rank 0
    checks, locks and writes the run directory: with P = 1 the process is rank 0
    whatever the environment holds (a shell started by ``torchrun`` passes its
    LOCAL_RANK on); with P > 1 a launcher's world size must equal P and the rank lie in
    [0, P), else UsageError. A multi-node run (``num_nodes`` > 1) needs its launcher's
    environment (SLURM, torchrun, or MASTER_ADDR, MASTER_PORT and NODE_RANK on every
    node): without it the processes would wait forever for nodes that never come, so it
    is refused. 0 for a plain start of a one-node run."""
    world = int(devices) * int(num_nodes)
    if world == 1:
        return 0
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect():
        source, size, rank = "SLURM_NTASKS", _env_int("SLURM_NTASKS"), _env_int("SLURM_PROCID") or 0
    elif TorchElasticEnvironment.detect():
        source, size, rank = "WORLD_SIZE", _env_int("WORLD_SIZE"), _env_int("RANK") or 0
    else:
        if num_nodes > 1:
            missing = [v for v in LAUNCHER_ADDRESS if v not in os.environ]
            if missing:
                raise UsageError(f"num_nodes {num_nodes}: a multi-node run needs its launcher's environment (srun, "
                                 f"torchrun, or {', '.join(LAUNCHER_ADDRESS)} set on every node); "
                                 f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set")
        local, node = _env_int("LOCAL_RANK"), _env_int("NODE_RANK")
        node = _env_int("GROUP_RANK") if node is None else node
        if local is None and not node:
            return 0  # a plain start: this process is rank 0 and launches the others
        size = _env_int("WORLD_SIZE")
        if local is not None and size is None:  # Lightning's launcher sets both in the processes it starts
            raise UsageError(f"LOCAL_RANK={local} in the environment but no WORLD_SIZE: not a process of a "
                             f"launched {world}-process run (unset LOCAL_RANK to start one)")
        local, node = local or 0, node or 0
        if not (0 <= local < devices and 0 <= node < num_nodes):
            raise UsageError(f"LOCAL_RANK={local}, NODE_RANK={node} in the environment do not fit devices {devices} "
                             f"x num_nodes {num_nodes}")
        source, rank = "WORLD_SIZE", node * int(devices) + local
    if size is not None and size != world:
        raise UsageError(f"{source}={size} in the environment, but devices {devices} x num_nodes {num_nodes} = "
                         f"{world} processes (the variables of another launch?)")
    if not 0 <= rank < world:
        raise UsageError(f"the launcher's rank {rank} is outside a {world}-process run")
    return rank


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo and mpi move CPU tensors."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (n_r, ...), where n_r may differ between ranks (same
    trailing shape and dtype); one tensor per rank, on ``t``'s device."""
    rank, world = rank_and_world()
    if world == 1:
        return [t]
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest,) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(out, padded)
    return [o[:s].to(t.device) for o, s in zip(out, sizes)]


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of evaluation chunk ``chunk``: a function of (seed, chunk) only."""
    return (int(seed) * 1_000_003 + 7919 * (int(chunk) + 1)) % (2**63 - 1)


def map_rows(fn: Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]], x: torch.Tensor,
             rows: torch.Tensor | None = None, *, chunk_size: int = EVAL_CHUNK, seed: int = 0
             ) -> dict[str, torch.Tensor]:
    """``fn`` over the rows of ``x`` (N, D), in chunks of ``chunk_size`` rows.

    ``fn(x_chunk, rows_chunk)`` returns a dict of per-row tensors, each (B, ...);
    ``rows`` (N,) are the rows' training indices (None for a set of its own). Chunk
    ``c`` runs with torch's global RNG seeded by ``chunk_seed(seed, c)`` (and the
    caller's RNG state restored afterwards). Under a process group, rank r
    evaluates the chunks c = r, r + P, ... and every rank returns the whole (N, ...)
    results in row order; the numbers are those of a one-process call.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = int(x.shape[0])
    rank, world = rank_and_world()
    n_chunks = math.ceil(n / chunk_size)
    local: dict[str, list[torch.Tensor]] = {}
    for c in range(rank, n_chunks, world):
        sl = slice(c * chunk_size, min(n, (c + 1) * chunk_size))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(chunk_seed(seed, c))
            out = fn(x[sl], None if rows is None else rows[sl])
        for k, v in out.items():
            if v.shape[0] != sl.stop - sl.start:
                raise ValueError(f"map_rows: {k!r} has {v.shape[0]} rows for a chunk of {sl.stop - sl.start}")
            local.setdefault(k, []).append(v.detach())
    if world == 1:
        return {k: torch.cat(v) for k, v in local.items()}
    # rank 0 always holds chunk 0 (when N > 0): it tells ranks without chunks the names and shapes
    meta = [{k: (tuple(v[0].shape[1:]), v[0].dtype) for k, v in local.items()} if rank == 0 else None]
    tdist.broadcast_object_list(meta, src=0)
    result = {}
    for k, (tail, dtype) in meta[0].items():
        mine = torch.cat(local[k]) if k in local else torch.empty((0,) + tail, dtype=dtype)
        gathered = all_gather_rows(mine)
        parts = []
        for c in range(n_chunks):
            start = (c // world) * chunk_size
            parts.append(gathered[c % world][start : start + min(chunk_size, n - c * chunk_size)])
        result[k] = torch.cat(parts)
    return result


# ----------------------------------------------------------------------------- parameters


def sync_sparse_grads(params: list[torch.Tensor]) -> None:
    """Replace each parameter's sparse gradient by the average over ranks (what DDP
    does to a dense one), coalesced, identical on every rank.

    One rank's rows travel as its coalesced (indices, values): all ranks' rows are
    gathered in one packed float64 buffer (indices below 2**53 are exact in it),
    then summed per row and divided by the world size."""
    rank, world = rank_and_world()
    grads = [p.grad.coalesce() for p in params]
    if world == 1:
        for p, g in zip(params, grads):
            p.grad = g
        return
    pieces = []
    for g in grads:
        pieces += [g.indices()[0].double(), g.values().double().flatten()]
    nnz = torch.tensor([g.indices().shape[1] for g in grads], dtype=torch.float64, device=grads[0].device)
    packed = torch.cat([nnz] + pieces)[:, None]  # (L, 1): all_gather_rows pads along dim 0
    widths = [int(math.prod(g.shape[1:])) for g in grads]
    per_param: list[tuple[list, list]] = [([], []) for _ in grads]
    for buf in (b[:, 0] for b in all_gather_rows(packed)):  # one rank's buffer
        off = len(grads)
        for j, cnt in enumerate(buf[: len(grads)].long().tolist()):
            per_param[j][0].append(buf[off : off + cnt].long())
            off += cnt
            per_param[j][1].append(buf[off : off + cnt * widths[j]])
            off += cnt * widths[j]
    for p, g, (ids, vals) in zip(params, grads, per_param):
        values = (torch.cat(vals) / world).to(g.dtype).view((-1,) + tuple(g.shape[1:]))
        p.grad = torch.sparse_coo_tensor(torch.cat(ids)[None], values, g.shape, check_invariants=False).coalesce()


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every rank (in place)."""
    _, world = rank_and_world()
    if world == 1:
        return
    dev = _comm_device()
    with torch.no_grad():
        for p in params:
            buf = p.detach().to(dev)
            tdist.broadcast(buf, src=0)
            p.copy_(buf.to(p.device))


def max_rank_difference(params: list[torch.Tensor]) -> float:
    """max |p_rank - p_rank0| over every entry of ``params`` and every rank (0.0 in
    one process): 0.0 when the ranks hold identical parameters, as DDP promises."""
    _, world = rank_and_world()
    if world == 1:
        return 0.0
    dev = _comm_device()
    worst = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        for p in params:
            mine = p.detach().to(dev)
            ref = mine.clone()
            tdist.broadcast(ref, src=0)
            if mine.numel():
                worst = torch.maximum(worst, (mine - ref).abs().max().double())
    tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)
    return float(worst)


def estimate_rows(fn: Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]], x: torch.Tensor,
                  rows: torch.Tensor | None = None, *, chunk_size: int = EVAL_CHUNK, seed: int = 0) -> dict:
    """:func:`map_rows`, each per-row result summarized as an ``Estimate`` (mean, se, n, values)."""
    from elbolab.inference.evaluate import Estimate

    return {k: Estimate.of(v) for k, v in map_rows(fn, x, rows, chunk_size=chunk_size, seed=seed).items()}
