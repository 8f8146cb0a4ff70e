"""Benchmark data-parallel training: 1 against 2 processes here, and a throughput
model of 8 to 64 GPUs on paper.

Measured (CPU, gloo, this machine):

* the all-reduce time of gradients of given sizes between 2 local processes;
* the time per optimizer step of PPCA fits (synthetic Gaussian data) with 1
  process and a global batch of G rows against 2 DDP processes of G/2 rows each
  (the same global batch, so the same steps per epoch): runs alternate between
  the two settings and the medians are reported, with the machine's load average
  (other work shares the cores).

Modelled: step time on p GPUs = compute per step + ring all-reduce time
2 (p - 1) / p * bytes / bandwidth + 2 (p - 1) * latency, for the gradient bytes of
each workload, with the bandwidths and latency given as options; efficiency =
compute / step time (weak scaling: each GPU keeps its per-GPU batch).

Writes --out DIR/metrics.json and DIR/bench.md (the tables).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from elbolab.inference.runs import RunDir
from elbolab.scripts import _cli

PROG = "elbolab bench-distributed"
TABLE_ROWS = 1_000_000  # the per-datapoint table of the issue: N = 1e6 rows ...
TABLE_WIDTH = 20  # ... of latent_dim 20 (loc and scale: 2 x 20 floats a row)

EXAMPLES = """examples:
  elbolab bench-distributed --out runs/bench-ddp
  elbolab bench-distributed --out runs/bench-ddp --reps 1 --skip-fits   # all-reduce and model only
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("--reps", type=_cli.positive_int, default=3, help="alternating repetitions of each fit pair")
    p.add_argument("--steps", type=_cli.positive_int, default=60, help="optimizer steps per timed fit")
    p.add_argument("--skip-fits", action="store_true", help="only the all-reduce timings and the model")
    p.add_argument("--bandwidth-node", type=_cli.positive_float, default=100.0,
                   help="GB/s an all-reduce gets inside one 8-GPU node (NVLink)")
    p.add_argument("--bandwidth-net", type=_cli.positive_float, default=10.0,
                   help="GB/s an all-reduce gets across nodes (the slowest link of the ring)")
    p.add_argument("--latency-us", type=_cli.positive_float, default=10.0, help="microseconds per ring hop")
    p.add_argument("--compute-ms", type=_cli.positive_float, default=5.0,
                   help="compute per step on one GPU (Pyro's fixed per-step cost dominates small models)")
    p.add_argument("--worker", metavar="FILE", default=None, help=argparse_suppress())
    p.add_argument("--guide", default="amortized-full", help=argparse_suppress())
    p.add_argument("--n-rows", type=int, default=100_000, help=argparse_suppress())
    p.add_argument("--batch-size", type=int, default=100, help=argparse_suppress())
    p.add_argument("--devices", type=int, default=1, help=argparse_suppress())
    p.add_argument("--sparse-rows", action="store_true", help=argparse_suppress())
    _cli.add_out_args(p, default="runs/bench-ddp")
    return p


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


# ----------------------------------------------------------------------------- all-reduce


def _allreduce_worker(rank: int, world: int, sizes_mb: list[float], reps: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    for mb in sizes_mb:
        t = torch.ones(max(1, int(mb * 1e6 / 4)))
        tdist.all_reduce(t)  # warm-up
        times = []
        for _ in range(reps):
            tdist.barrier()
            t0 = time.perf_counter()
            tdist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        result[str(mb)] = 1e3 * statistics.median(times)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    tdist.destroy_process_group()


def measure_allreduce(sizes_mb: list[float], reps: int, tmp: str) -> dict[str, float]:
    """Median milliseconds of one gloo all-reduce of each size (MB) between 2 local processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tmp, "allreduce.json")
    mp.spawn(_allreduce_worker, args=(2, sizes_mb, reps, port, out), nprocs=2, join=True)
    with open(out) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- timed fits


def worker(args) -> None:
    """One fit (re-run by Lightning in each extra process); rank 0 writes its timings."""
    import torch

    from elbolab import models
    from elbolab.inference import distributed
    from elbolab.models.datasources import DataSplits
    from elbolab.inference.train import fit
    from elbolab.inference.train_config import TrainConfig

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    d, k = 64, TABLE_WIDTH
    x = torch.randn(args.n_rows, 5, generator=g) @ torch.randn(5, d, generator=g) + 0.3 * torch.randn(
        args.n_rows, d, generator=g)
    data = DataSplits("synthetic", x, x[:0], x[:0])
    torch.manual_seed(args.seed)
    model = models.build_model("ppca", {"latent_dim": k, "guide": args.guide}, d, args.n_rows)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=0.01, seed=args.seed, threads=1,
                      progress=False, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                      sparse_rows=args.sparse_rows)
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        """Wall and CPU seconds of this process (all its threads) at each step's end."""

        def __init__(self):
            self.wall, self.cpu = [], []

        def on_train_batch_end(self, *args):
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())

    clock = Clock()
    res = fit(model, data, cfg, callbacks=[clock])
    rank, _ = distributed.rank_and_world()
    skip = max(1, len(clock.wall) // 5)  # the first steps include warm-up

    def per_step(t):
        return 1e3 * statistics.median([b - a for a, b in zip(t[skip:], t[skip + 1:])])

    if rank != 0:  # the other rank's CPU time per step, for rank 0 to report
        with open(args.worker + f".rank{rank}", "w") as f:
            json.dump({"cpu_ms": per_step(clock.cpu)}, f)
        return
    table = {id(p) for m in model.modules() if isinstance(getattr(m, "sparse", None), bool) for p in m.parameters()}
    with open(args.worker, "w") as f:
        json.dump({"step_ms": per_step(clock.wall), "cpu_ms": per_step(clock.cpu), "world_size": res.world_size,
                   "dense_grad_bytes": 4 * sum(p.numel() for p in model.parameters() if id(p) not in table),
                   "table_bytes": 4 * sum(p.numel() for p in model.parameters() if id(p) in table)}, f)


CASES = [  # name, guide, rows, global batch, sparse rows
    ("PPCA, amortized-full guide", "amortized-full", 100_000, 200, False),
    ("PPCA, amortized-full guide", "amortized-full", 100_000, 2000, False),
    ("PPCA, per-datapoint table, dense Adam", "per-datapoint", TABLE_ROWS, 200, False),
    ("PPCA, per-datapoint table, --sparse-rows", "per-datapoint", TABLE_ROWS, 200, True),
]


def timed_fit(case, devices: int, steps: int, seed: int, tmp: str) -> dict:
    _, guide, rows, batch, sparse = case
    out = os.path.join(tmp, f"fit-{guide}-{devices}.json")
    cmd = [sys.executable, "-m", "elbolab.scripts.bench_distributed", "--worker", out, "--guide", guide, "--n-rows",
           str(rows), "--batch-size", str(batch // devices), "--devices", str(devices), "--steps", str(steps),
           "--seed", str(seed)] + (["--sparse-rows"] if sparse else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0:
        raise RuntimeError(f"timed fit failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    with open(out) as f:
        result = json.load(f)
    others = [out + f".rank{r}" for r in range(1, devices)]
    cpu = [result["cpu_ms"]]
    for path in others:  # written before rank 1 left the last collective: present once rank 0 is done
        for _ in range(100):
            if os.path.exists(path):
                break
            time.sleep(0.1)
        with open(path) as f:
            cpu.append(json.load(f)["cpu_ms"])
        os.unlink(path)
    result["cpu_ms"] = max(cpu)  # the busier rank
    return result


# ----------------------------------------------------------------------------- the model


def ring_allreduce_ms(nbytes: float, p: int, gb_per_s: float, latency_us: float) -> float:
    """Ring all-reduce: 2 (p - 1) / p * bytes over the bandwidth, plus 2 (p - 1) hops of latency."""
    if p == 1:
        return 0.0
    return 1e3 * (2 * (p - 1) / p * nbytes / (gb_per_s * 1e9)) + 2 * (p - 1) * latency_us * 1e-3


def ring_allgather_ms(nbytes_per_rank: float, p: int, gb_per_s: float, latency_us: float) -> float:
    """Ring all-gather: (p - 1) pieces of one rank's bytes, (p - 1) hops."""
    if p == 1:
        return 0.0
    return 1e3 * ((p - 1) * nbytes_per_rank / (gb_per_s * 1e9)) + (p - 1) * latency_us * 1e-3


def model_workloads(batch_per_gpu: int = 100) -> list[tuple[str, float, float]]:
    """(name, all-reduced bytes per step, all-gathered bytes per rank and step) for the
    workloads of the table: parameter counts of the actual model classes at d = 784."""
    import torch

    from elbolab import models

    def grad_bytes(guide: str, n: int) -> tuple[int, int]:
        torch.manual_seed(0)
        m = models.build_model("ppca", {"latent_dim": TABLE_WIDTH, "guide": guide}, 784, n)
        table = {id(p) for mod in m.modules() if isinstance(getattr(mod, "sparse", None), bool)
                 for p in mod.parameters()}
        return (4 * sum(p.numel() for p in m.parameters() if id(p) not in table),
                4 * sum(p.numel() for p in m.parameters() if id(p) in table))

    ppca, _ = grad_bytes("amortized-full", 10)
    dense, table = grad_bytes("per-datapoint", 10)
    table = table // 10 * TABLE_ROWS  # the two (N, 20) float32 tables at N = 1e6
    vae = 4 * (784 * 400 + 400 + 400 * 2 * 20 + 2 * 20 + 20 * 400 + 400 + 400 * 784 + 784)
    rows = batch_per_gpu * (2 * TABLE_WIDTH + 1) * 8  # one rank's sparse rows: index + loc + scale, float64
    return [
        ("PPCA d=784 k=20, amortized-full guide", ppca, 0.0),
        ("VAE 784-400-20 (MLP encoder and decoder, one hidden layer)", vae, 0.0),
        ("PPCA + per-datapoint table N=1e6, dense all-reduce", dense + table, 0.0),
        ("PPCA + per-datapoint table N=1e6, rows all-gathered", dense, rows),
    ]


def throughput_table(args) -> tuple[list[dict], list[str]]:
    rows, lines = [], []
    ps = (8, 16, 32, 64)
    lines += ["| workload | all-reduce MB/step | " + " | ".join(f"p={p}: ms, eff." for p in ps) + " |",
              "|---|---|" + "---|" * len(ps)]
    for name, ar_bytes, ag_bytes in model_workloads():
        cells = []
        for p in ps:
            bw = args.bandwidth_node if p <= 8 else args.bandwidth_net
            comm = ring_allreduce_ms(ar_bytes, p, bw, args.latency_us) + (
                ring_allgather_ms(ag_bytes, p, bw, args.latency_us) + ring_allgather_ms(8, p, bw, args.latency_us)
                if ag_bytes else 0.0)
            step = args.compute_ms + comm
            eff = args.compute_ms / step
            rows.append({"workload": name, "p": p, "comm_ms": comm, "step_ms": step, "efficiency": eff})
            cells.append(f"{comm:.2f} + {args.compute_ms:g}, {100 * eff:.0f}%")
        lines.append(f"| {name} | {ar_bytes / 1e6:.3g} | " + " | ".join(cells) + " |")
    return rows, lines


# ----------------------------------------------------------------------------- main


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from elbolab.inference.files import atomic_write, save_json

    with RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL) as run_dir:
        tmp = run_dir.path
        metrics: dict = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count(), "threads_per_process": 1}
        sizes = [0.126, 2.6, 16.0, 160.0]
        metrics["allreduce_ms"] = measure_allreduce(sizes, reps=max(5, 2 * args.reps), tmp=tmp)
        lines = ["# Data-parallel benchmark", "",
                 f"{os.cpu_count()} CPUs, 1 thread per process, gloo; load average at start "
                 f"{metrics['load_average_start'][0]:.2f}.", "",
                 "## gloo all-reduce between 2 local processes (median)", "",
                 "| MB | ms |", "|---|---|"] + [f"| {mb} | {ms:.2f} |" for mb, ms in metrics["allreduce_ms"].items()]
        if not args.skip_fits:
            fits = []
            for case in CASES:
                times: dict[int, list[float]] = {1: [], 2: []}
                cpus: dict[int, list[float]] = {1: [], 2: []}
                for rep in range(args.reps):
                    for devices in ((1, 2) if rep % 2 == 0 else (2, 1)):  # alternate the order
                        steps = args.steps if not (case[1] == "per-datapoint" and not case[4]) else max(
                            10, args.steps // 4)
                        r = timed_fit(case, devices, steps, args.seed, tmp)
                        times[devices].append(r["step_ms"])
                        cpus[devices].append(r["cpu_ms"])
                t1, t2 = statistics.median(times[1]), statistics.median(times[2])
                c1, c2 = statistics.median(cpus[1]), statistics.median(cpus[2])
                fits.append({"case": case[0], "rows": case[2], "global_batch": case[3], "ms_1": times[1],
                             "ms_2": times[2], "median_ms_1": t1, "median_ms_2": t2, "speedup": t1 / t2,
                             "cpu_ms_1": cpus[1], "cpu_ms_2": cpus[2], "median_cpu_ms_1": c1,
                             "median_cpu_ms_2": c2, "cpu_speedup": c1 / c2})
                print(f"{case[0]}, global batch {case[3]}: {t1:.1f} ms/step (1 process) vs {t2:.1f} (2) -> "
                      f"x{t1 / t2:.2f}; CPU ms/step {c1:.1f} vs {c2:.1f} per rank -> x{c1 / c2:.2f}", flush=True)
            metrics["fits"] = fits
            metrics["load_average_end"] = os.getloadavg()
            lines += ["", "## Time per optimizer step, same global batch (median of alternating runs)", "",
                      "| workload | N | global batch | 1 process: wall ms (CPU ms) | 2 processes: wall ms "
                      "(CPU ms, busier rank) | speed-up wall (CPU) |", "|---|---|---|---|---|---|"]
            lines += [f"| {f['case']} | {f['rows']:,} | {f['global_batch']} | {f['median_ms_1']:.1f} "
                      f"({f['median_cpu_ms_1']:.1f}) | {f['median_ms_2']:.1f} ({f['median_cpu_ms_2']:.1f}) | "
                      f"{f['speedup']:.2f} ({f['cpu_speedup']:.2f}) |" for f in fits]
            lines += ["", f"Load average at the end: {metrics['load_average_end'][0]:.2f}."]
        rows, table = throughput_table(args)
        metrics["model"] = {"rows": rows, "bandwidth_node_gb_s": args.bandwidth_node,
                            "bandwidth_net_gb_s": args.bandwidth_net, "latency_us": args.latency_us,
                            "compute_ms": args.compute_ms}
        lines += ["", "## Throughput model: all-reduce ms + compute ms per step, efficiency", ""] + table
        save_json(metrics, run_dir.file("metrics.json"))
        with atomic_write(run_dir.file("bench.md")) as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
