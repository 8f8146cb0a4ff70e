"""Benchmarks: what Pyro's convenience costs, measured against hand-written PyTorch.

Every ratio is measured within one run with the sides alternated (A B C A B C ...)
after one warm-up round, and is the median over --reps repetitions of the ratio
of adjacent measurements (the medians of each side are recorded too). The thread
count and the machine's load average go into results.json: other work sharing the
cores slows both sides, which alternation spreads evenly but does not remove.

Sections (--sections, comma-separated; default all):

* train: seconds per epoch of a VAE under elbolab's driver, against the same VAE
  hand-written in PyTorch (the yardstick, kept here; its loss is checked equal to
  elbolab's for the same draws before anything is timed), Pyro's plain SVI.step
  loop, and elbolab's objective without Lightning (the loss built by Pyro at every
  step, and replayed from its recorded graph as the driver does). Models: the CS236 VAE
  (784-300-300-10 ELU, analytic KL) and a 784-400-20 ReLU VAE on MNIST, and the
  digits VAE (64-300-300-10 ELU, the Monte Carlo ELBO fit.py uses by default).
* threads: the CS236 VAE's step, hand-written and under the driver, with 1 and 2
  threads (the ratios use --threads; more threads only where both sides gain).
* profile: where a step of the CS236 VAE goes (one MNIST epoch): CPU milliseconds a
  step in each phase (rows, loss, backward, Adam) of the tuned hand-written loop and of
  elbolab's objective without Lightning (built by Pyro, and replayed), and the driver's
  whole step; the driver's own
  share (checks, Lightning's loop, bookkeeping) is what it takes beyond the objective's.
* iwae: milliseconds per IWAE and IWAE-DReG step at K = 1, 5, 50 (CS236 VAE).
* eval: the K = 5000 importance-sampled log-likelihood of MNIST test images:
  samples per second and the floating-point rate against this machine's own
  matrix-multiply rate on the same shapes (the same products, nothing else), for the
  traced (eager) path and the compiled one (decoder and likelihood), with the time
  compiling takes and both extrapolated to the whole test set.
* ppca: seconds until PPCA (digits, k = 10) is within 0.01 nats per datapoint of
  the closed-form maximum likelihood, for SVI and for EM.
* growth: time against N, K, latent size and hidden size, with log-log slopes.
* cs236: the CS236 protocol end to end (scripts/reproduce_cs236.py, 20,000 steps).
* baseline (with --baseline REF): before and after, the code of git revision REF
  against this one, each run in a process of its own, alternated: a CS236 epoch
  and IWAE K = 50 steps under the driver, and an importance-sampled evaluation.

Hand-written sides come twice: as users write them (torch.optim.Adam's default, on
a CPU the per-tensor loop; torch.bernoulli for dynamic binarization) and "tuned",
with what elbolab's driver does that is not Pyro's (fused Adam, the rows gathered by
index_select and drawn as u < x in place, gradients cleared without the optimizer's
wrapper, denormal floats flushed to zero).

--clock cpu times the sides by the main thread's CPU seconds instead of the wall clock:
on a machine whose cores other jobs share, a side's wall time includes the time slices
it waited for, which differ from one repetition to the next.

Writes --out DIR/results.json and DIR/table.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from torch import nn

from elbolab import models
from elbolab.inference.errors import UsageError
from elbolab.inference import evaluate
from elbolab.inference.evaluate import chunk_sizes, importance_estimates, tune_malloc
from elbolab.inference.files import atomic_write, save_json
from elbolab.models.datasources import DataSplits, load_dataset
from elbolab.inference.objectives import build_objective
from elbolab.inference.traces import batch
from elbolab.inference.lightning_module import adam, binary_rows, flushed_denormals
from elbolab.inference.replay import ReplayedLoss
from elbolab.models.common import checked_rows
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
from elbolab.models.vae import MIN_SCALE
from elbolab.inference.runs import RunDir
from elbolab.scripts import _cli

PROG = "elbolab benchmark"
# What the sides' timers read (--clock): wall seconds, or the main thread's CPU seconds
# (with --threads 1 it does all the work; on a machine whose cores other jobs share, CPU
# time leaves out the time slices the process waits for). The threads section, the
# compiling of the compiled evaluation, the CS236 protocol and the baseline's fresh
# processes always read the wall clock.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = [time.perf_counter]


def now() -> float:
    """The benchmark's clock (--clock), in seconds."""
    return _clock[0]()


@contextlib.contextmanager
def wall_clock():
    """The wall clock for the duration, whatever --clock says."""
    before = _clock[0]
    _clock[0] = time.perf_counter
    try:
        yield
    finally:
        _clock[0] = before
SECTIONS = ("train", "profile", "threads", "iwae", "eval", "ppca", "growth", "cs236", "baseline")
DEFAULT_SECTIONS = SECTIONS[:-1]  # the baseline needs --baseline REF
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # (a symlinked checkout: its real place)
DEFAULT_MNIST = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "mnist"))
LOG_2PI = math.log(2 * math.pi)
CS236 = {"latent_dim": 10, "hidden": [300, 300], "activation": "elu"}

EXAMPLES = """examples:
  elbolab benchmark --out benchmarks --threads 1
  elbolab benchmark --sections train,iwae --reps 7 --out runs/bench
  elbolab benchmark --sections train,profile,eval --clock cpu --out runs/bench   # a busy machine
  elbolab benchmark --quick --out runs/bench-quick     # tiny sizes: checks the machinery
"""


def build_parser():
    p = _cli.parser(PROG, __doc__, EXAMPLES)
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--baseline", metavar="REF", default=None,
                   help="git revision whose code the baseline section runs against this one's")
    p.add_argument("--reps", type=_cli.positive_int, default=5, help="alternating repetitions (medians)")
    p.add_argument("--threads", type=_cli.positive_int, default=1, help="torch CPU threads")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="what the timers read: wall seconds, or the main thread's CPU seconds (a shared machine)")
    p.add_argument("--data-dir", metavar="DIR", default=DEFAULT_MNIST, help="MNIST IDX files")
    p.add_argument("--eval-rows", type=_cli.positive_int, default=100,
                   help="MNIST test images timed at K = 5000 (the whole set's time is extrapolated)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and the digits only (checks the machinery)")
    p.add_argument("--retable", action="store_true",
                   help="measure nothing: write --out/table.md again from --out/results.json")
    _cli.add_out_args(p, default="benchmarks")
    return p


# ----------------------------------------------------------------------------- timing


def alternate(sides: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """One warm-up call of each side, then ``reps`` rounds calling the sides in turn.
    Each side returns the seconds it measured itself."""
    for f in sides.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(reps):
        for k, f in sides.items():
            times[k].append(f())
    return times


def summarize(times: dict[str, list[float]], ref: str, scale: float = 1.0, unit: str = "s") -> dict:
    """Medians (times ``scale``, in ``unit``) and each side's median ratio to ``ref``
    over the repetitions (adjacent measurements)."""
    out = {}
    for k, v in times.items():
        ratios = [a / b for a, b in zip(v, times[ref])]
        out[k] = {"median": statistics.median(v) * scale, "unit": unit, "values": [t * scale for t in v],
                  f"ratio_to_{ref}": statistics.median(ratios)}
    return out


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine(threads: int) -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import lightning

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "pyro": pyro.__version__, "lightning": lightning.__version__}


class LoopTimer:
    """A Lightning callback timing the training loop: from the first epoch's start to
    the end of training (not the Trainer's set-up nor the driver's warm-up pass)."""

    def __new__(cls):
        import lightning.pytorch as pl

        class Timer(pl.Callback):
            t0 = t1 = None

            def on_train_epoch_start(self, trainer, module):
                if self.t0 is None:
                    self.t0 = now()

            def on_train_end(self, trainer, module):
                self.t1 = now()

            @property
            def seconds(self) -> float:
                return self.t1 - self.t0

        return Timer()


# ----------------------------------------------------------------------------- the yardstick


class HandVAE(nn.Module):
    """The VAE hand-written in PyTorch: the yardstick. Encoder D -> hidden -> 2k (loc,
    softplus scale), decoder k -> reversed(hidden) -> D logits; the same math as
    models.vae.VAE with its amortized guide (made from copies of such a model's layers,
    so both start from the same weights)."""

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder, self.k = encoder, decoder, latent_dim

    @classmethod
    def like(cls, model) -> "HandVAE":
        return cls(copy.deepcopy(model.encoder.net), copy.deepcopy(model.decoder), model.latent_dim)

    def loss(self, x: torch.Tensor, n_data: int, objective: str = "elbo", K: int = 1) -> torch.Tensor:
        """The negative bound over the whole data set (the batch's sum times N/B), as
        elbolab's objectives: elbo, elbo-analytic, iwae or iwae-dreg, K particles."""
        B, k = x.shape[0], self.k
        h = self.encoder(x)  # (B, 2k)
        loc, scale = h[:, :k], F.softplus(h[:, k:]) + MIN_SCALE  # (B, k) each
        z = loc + torch.randn((K, B, k)) * scale  # (K, B, k)
        logits = self.decoder(z)  # (K, B, D)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        if objective == "elbo-analytic":  # KL(N(loc, scale^2) || N(0, 1)) in closed form
            kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0 - 2.0 * scale.log()).sum(-1)  # (B,)
            return -(n_data / B) * (log_lik.mean(0) - kl).sum()
        q_loc, q_scale = (loc.detach(), scale.detach()) if objective == "iwae-dreg" else (loc, scale)
        log_q = (-0.5 * ((z - q_loc) / q_scale).pow(2) - q_scale.log() - 0.5 * LOG_2PI).sum(-1)  # (K, B)
        log_p = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(-1)  # (K, B)
        log_w = log_lik + log_p - log_q  # (K, B)
        if objective == "elbo":
            return -(n_data / B) * log_w.mean(0).sum()
        if objective == "iwae-dreg" and torch.is_grad_enabled():  # Tucker et al.: w^2-weighted path gradient
            w = torch.softmax(log_w.detach(), 0).unsqueeze(-1)  # (K, B, 1)
            z.register_hook(lambda g: g * w)
        return -(n_data / B) * (torch.logsumexp(log_w, 0) - math.log(K)).sum()

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, K: int, rows: int, particles: int) -> torch.Tensor:
        """log (1/K) sum_k p(x, z_k) / q(z_k | x) per row (z_k ~ q), float64: the
        importance-sampled estimate by hand, in chunks of ``rows`` rows x ``particles``
        particles with a streaming logsumexp, as elbolab's evaluation chunks it."""
        out, k = [], self.k
        for s in range(0, x.shape[0], rows):
            xb = x[s : s + rows]  # (b, D)
            h = self.encoder(xb)
            loc, scale = h[:, :k], F.softplus(h[:, k:]) + MIN_SCALE  # (b, k)
            lse = torch.full((xb.shape[0],), -math.inf, dtype=torch.float64)
            for ks in range(0, K, particles):
                eps = torch.randn((min(particles, K - ks),) + loc.shape)  # (kc, b, k)
                z = loc + eps * scale
                logits = self.decoder(z)  # (kc, b, D)
                log_lik = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
                log_w = log_lik + (-0.5 * z.pow(2)).sum(-1) - (-0.5 * eps.pow(2) - scale.log()).sum(-1)  # (kc, b)
                lse = torch.logaddexp(lse, torch.logsumexp(log_w.double(), 0))
            out.append(lse - math.log(K))  # (the 2 pi terms of log p(z) and log q cancel)
        return torch.cat(out)


def same_math(model, objective: str, K: int, x: torch.Tensor, n_data: int) -> float:
    """Relative difference of elbolab's loss and the yardstick's for the same weights
    and the same draws (one seed); float32 round-off if the math is the same."""
    hand = HandVAE.like(model)
    obj = build_objective(objective, K)
    with torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(123)
        with batch(model, x, torch.arange(x.shape[0])):
            ours = float(obj(model.model, model.guide, x))
        torch.manual_seed(123)
        theirs = float(hand.loss(x, n_data, objective, K))
    return abs(ours - theirs) / abs(theirs)


# ----------------------------------------------------------------------------- loops


def batches(x: torch.Tensor, batch_size: int, dynamic: bool, steps: int | None = None, tuned: bool = False):
    """(rows, indices) per step as a hand-written loop draws them: a random order, and a
    fresh Bernoulli draw of the grey levels for dynamic binarization (torch.bernoulli;
    ``tuned``: as elbolab's loader makes them, the rows gathered by index_select and the
    draw u < x with u uniform, written into u's storage)."""
    n, done = x.shape[0], 0
    while True:
        order = torch.randperm(n)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            xb = torch.index_select(x, 0, idx) if tuned else x[idx]
            if dynamic:
                xb = torch.rand(xb.shape).lt_(xb) if tuned else torch.bernoulli(xb)
            yield xb, idx
            done += 1
            if steps is not None and done >= steps:
                return
        if steps is None:
            return


def time_loop(step: Callable, x: torch.Tensor, batch_size: int, dynamic: bool, epochs: int = 1,
              steps: int | None = None, tuned: bool = False) -> float:
    t0 = now()
    for _ in range(epochs if steps is None else 1):
        for xb, idx in batches(x, batch_size, dynamic, steps, tuned):
            step(xb, idx)
    return now() - t0


def zero_grads(params: list) -> None:
    """What ``optimizer.zero_grad(set_to_none=True)`` does, without its wrapper (as the driver)."""
    for p in params:
        p.grad = None


def hand_side(build, x, n_data, batch_size, dynamic, objective, K=1, tuned=False, epochs=1, steps=None):
    """The yardstick's loop: as users write it, or ``tuned`` with what elbolab's driver
    does that is not Pyro's (fused Adam, the loader's row gather and Bernoulli draw, the
    gradients cleared without the optimizer's wrapper, denormals flushed)."""
    def run() -> float:
        hand = HandVAE.like(build())
        params = list(hand.parameters())
        opt = torch.optim.Adam(params, lr=1e-3, fused=True if tuned else None)

        def step(xb, idx):
            if tuned:
                zero_grads(params)
            else:
                opt.zero_grad(set_to_none=True)
            hand.loss(xb, n_data, objective, K).backward()
            opt.step()

        with flushed_denormals(tuned):
            return time_loop(step, x, batch_size, dynamic, epochs, steps, tuned)

    return run


def objective_side(build, x, batch_size, dynamic, objective, K=1, epochs=1, steps=None, replay=True):
    """elbolab's objective, backward and Adam as the driver runs them, without Lightning:
    the loss replayed from its recorded graph (``replay.ReplayedLoss``), or with
    ``replay`` False built by Pyro at every step."""
    def run() -> float:
        model = build()
        obj = build_objective(objective, K)
        params = list(model.parameters())
        opt = adam(params, lr=1e-3)
        loss = step_loss(obj, model, replay)

        def step(xb, idx):
            zero_grads(params)
            loss(xb, idx).backward()
            opt.step()

        with pyro.validation_enabled(False), checked_rows(binary_rows(x, dynamic)), flushed_denormals():
            return time_loop(step, x, batch_size, dynamic, epochs, steps, tuned=True)

    return run


def step_loss(obj, model, replay: bool) -> Callable:
    """``loss(x, rows)`` as the driver's steps compute it: replayed, or (``replay`` False)
    built by Pyro (the replayer's own eager loss)."""
    loss = ReplayedLoss(obj, model)
    return loss if replay else loss.eager


def svi_side(build, x, batch_size, dynamic, objective, epochs=1):
    """Pyro's plain SVI.step loop as its tutorials write it (param store, pyro.optim.Adam,
    Pyro's default validation)."""
    def run() -> float:
        model = build()
        pyro.clear_param_store()

        def model_fn(xb):
            pyro.module("vae", model)
            model.model(xb)

        def guide_fn(xb):
            pyro.module("vae", model)
            model.guide(xb)

        elbo = pyro.infer.TraceMeanField_ELBO() if objective == "elbo-analytic" else pyro.infer.Trace_ELBO()
        svi = pyro.infer.SVI(model_fn, guide_fn, pyro.optim.Adam({"lr": 1e-3}), elbo)

        def step(xb, idx):
            with batch(model, xb, idx):  # the mini-batch scaled to the data set
                svi.step(xb)

        return time_loop(step, x, batch_size, dynamic, epochs)

    return run


def driver_side(build, data, batch_size, objective, K=1, epochs=1, steps=None, threads=1, extra=None):
    def run() -> float:
        model = build()
        timer = LoopTimer()
        cfg = TrainConfig(objective=objective, n_particles=K, lr=1e-3, batch_size=batch_size,
                          epochs=None if steps else epochs, steps=steps, threads=threads, progress=False)
        t0 = now()
        fit(model, data, cfg, callbacks=[timer])
        if extra is not None:
            extra.append(now() - t0 - timer.seconds)
        return timer.seconds

    return run


# ----------------------------------------------------------------------------- data


class Data:
    """The data sets, loaded once: MNIST (dynamic binarization, no validation rows) and
    the digits (binarized at 0.5, the split's validation rows dropped so no side
    validates)."""

    def __init__(self, data_dir: str):
        self.data_dir, self._cache = data_dir, {}

    def get(self, name: str) -> DataSplits:
        if name not in self._cache:
            if name == "mnist":
                if not os.path.isdir(self.data_dir):
                    raise UsageError(f"--data-dir {self.data_dir}: no such directory (MNIST is needed; "
                                     "--quick uses the digits only)")
                d = load_dataset("mnist", data_dir=self.data_dir, binarize="dynamic", val_fraction=0.0)
            else:
                d = load_dataset("digits", binarize="threshold")
                d = replace(d, val=d.val[:0])
            self._cache[name] = d
        return self._cache[name]


def builder(config: dict, data: DataSplits, seed: int = 0) -> Callable:
    def build():
        torch.manual_seed(seed)
        return models.build_model("vae", config, data.data_dim, data.n_train)

    return build


# ----------------------------------------------------------------------------- sections


def train_section(args, data: Data) -> dict:
    cases = {
        "cs236": ("mnist", CS236, "elbo-analytic", 1),
        "mnist-400": ("mnist", {"latent_dim": 20, "hidden": [400], "activation": "relu"}, "elbo-analytic", 1),
        "digits": ("digits", {}, "elbo", 20),
    }
    if args.quick:
        cases = {"digits": ("digits", {}, "elbo", 2)}
    out = {}
    for name, (dname, config, objective, epochs) in cases.items():
        d = data.get(dname)
        build, x, n, dyn = builder(config, d), d.train, d.n_train, d.binarize == "dynamic"
        check = same_math(build(), objective, 1, (torch.bernoulli(x[:100]) if dyn else x[:100]), n)
        if check > 1e-5:
            raise RuntimeError(f"the yardstick's loss differs from elbolab's by {check:.2e} (relative) on {name}")
        fixed: list[float] = []
        times = alternate({
            "hand": hand_side(build, x, n, 100, dyn, objective, epochs=epochs),
            "hand-tuned": hand_side(build, x, n, 100, dyn, objective, tuned=True, epochs=epochs),
            "pyro-svi": svi_side(build, x, 100, dyn, objective, epochs=epochs),
            "objective-eager": objective_side(build, x, 100, dyn, objective, epochs=epochs, replay=False),
            "objective": objective_side(build, x, 100, dyn, objective, epochs=epochs),
            "driver": driver_side(build, d, 100, objective, epochs=epochs, threads=args.threads, extra=fixed),
        }, args.reps)
        res = summarize({k: [t / epochs for t in v] for k, v in times.items()}, "hand", unit="s/epoch")
        for side in res:
            res[side]["ratio_to_hand-tuned"] = statistics.median(
                [a / b for a, b in zip(times[side], times["hand-tuned"])])
        out[name] = {"data": dname, "model": config, "objective": objective, "batch_size": 100,
                     "steps_per_epoch": math.ceil(n / 100), "epochs_per_measurement": epochs,
                     "yardstick_loss_rel_diff": check, "driver_fixed_seconds_per_fit": statistics.median(fixed),
                     "sides": res}
        print(f"[train] {name}: " + ", ".join(f"{k} {v['median']:.3f} s/epoch ({v['ratio_to_hand']:.2f}x)"
                                            for k, v in res.items()), file=sys.stderr)
    return out


def profile_section(args, data: Data) -> dict:
    """CPU milliseconds a step (the main thread's, which does all the work at one thread)
    in each phase, for the tuned hand-written loop and elbolab's objective without
    Lightning, and the driver's whole step: one epoch each, alternated."""
    dname, config, epochs = ("digits", {}, 1) if args.quick else ("mnist", CS236, 1)
    d = data.get(dname)
    build, x, n, dyn = builder(config, d), d.train, d.n_train, d.binarize == "dynamic"
    objective, steps = "elbo-analytic", epochs * math.ceil(n / 100)
    clock = time.thread_time

    def phased(hand: bool, replay: bool = True) -> Callable[[], dict]:
        def run() -> dict:
            model = build()
            net = HandVAE.like(model)
            obj = build_objective(objective, 1)
            params = list(net.parameters() if hand else model.parameters())
            opt = adam(params, lr=1e-3)
            step_fn = step_loss(obj, model, replay)
            acc = dict.fromkeys(("rows", "loss", "backward", "adam"), 0.0)
            with pyro.validation_enabled(False), checked_rows(binary_rows(x, dyn)), flushed_denormals():
                for _ in range(epochs):
                    rows = batches(x, 100, dyn, tuned=True)
                    while True:
                        t0 = clock()
                        try:
                            xb, idx = next(rows)
                        except StopIteration:
                            break
                        t1 = clock()
                        zero_grads(params)
                        if hand:
                            loss = net.loss(xb, n, objective)
                        else:
                            loss = step_fn(xb, idx)
                        t2 = clock()
                        loss.backward()
                        t3 = clock()
                        opt.step()
                        t4 = clock()
                        for k, a, b in (("rows", t0, t1), ("loss", t1, t2), ("backward", t2, t3), ("adam", t3, t4)):
                            acc[k] += b - a
            return {k: v * 1e3 / steps for k, v in acc.items()}
        return run

    def driver() -> dict:
        model = build()
        import lightning.pytorch as pl

        class CPU(pl.Callback):
            t0 = t1 = None

            def on_train_epoch_start(self, trainer, module):
                self.t0 = self.t0 or clock()

            def on_train_end(self, trainer, module):
                self.t1 = clock()

        timer = CPU()
        fit(model, d, TrainConfig(objective=objective, epochs=epochs, threads=args.threads, progress=False),
            callbacks=[timer])
        return {"step": (timer.t1 - timer.t0) * 1e3 / steps}

    sides = {"hand-tuned": phased(True), "objective-eager": phased(False, replay=False), "objective": phased(False),
             "driver": driver}
    for f in sides.values():  # warm-up
        f()
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(min(args.reps, 3)):
        for k, f in sides.items():
            runs[k].append(f())
    out = {"model": config, "data": dname, "objective": objective, "steps": steps, "unit": "CPU ms/step",
           "sides": {k: {p: statistics.median(r[p] for r in v) for p in v[0]} for k, v in runs.items()}}
    for k in ("hand-tuned", "objective-eager", "objective"):
        out["sides"][k]["step"] = sum(out["sides"][k].values())
    s = out["sides"]
    out["driver_own"] = s["driver"]["step"] - s["objective"]["step"]
    out["pyro_own"] = s["objective"]["step"] - s["hand-tuned"]["step"]  # what the replayed step adds
    out["pyro_own_eager"] = s["objective-eager"]["step"] - s["hand-tuned"]["step"]  # and Pyro's eager step
    print("[profile] " + "; ".join(f"{k}: " + ", ".join(f"{p} {v:.3f}" for p, v in ph.items())
                                   for k, ph in s.items()) + " (CPU ms/step)", file=sys.stderr)
    return out


def threads_section(args, data: Data) -> dict:
    d = data.get("digits" if args.quick else "mnist")
    config = {} if args.quick else CS236
    build, x, n, dyn = builder(config, d), d.train, d.n_train, d.binarize == "dynamic"
    steps = 20 if args.quick else 50  # (2 threads on a shared, busy machine can be 100 times slower)
    sides = {}
    for t in (1, 2):
        hand = hand_side(build, x, n, 100, dyn, "elbo-analytic", steps=steps)

        def with_threads(f, t=t):
            def run():
                before = torch.get_num_threads()
                torch.set_num_threads(t)
                try:
                    return f()
                finally:
                    torch.set_num_threads(before)
            return run

        sides[f"hand, {t} thread(s)"] = with_threads(hand)
        sides[f"driver, {t} thread(s)"] = with_threads(driver_side(build, d, 100, "elbo-analytic", steps=steps,
                                                                   threads=t))
    with wall_clock():  # (the CPU time of one thread of two would leave out the other's)
        times = alternate(sides, min(args.reps, 3))
    res = summarize(times, "hand, 1 thread(s)", scale=1e3 / steps, unit="ms/step")
    print("[threads] " + ", ".join(f"{k} {v['median']:.2f} ms/step" for k, v in res.items()), file=sys.stderr)
    return {"model": config, "steps": steps, "load_average": loadavg(), "sides": res}


def iwae_section(args, data: Data) -> dict:
    d = data.get("digits" if args.quick else "mnist")
    config = {"latent_dim": 4, "hidden": [32]} if args.quick else CS236
    build, x, n, dyn = builder(config, d), d.train, d.n_train, d.binarize == "dynamic"
    plan = {1: 200, 5: 100, 50: 20} if not args.quick else {1: 10, 5: 5}
    out = {}
    for objective in ("iwae", "iwae-dreg"):
        for K, steps in plan.items():
            xb = torch.bernoulli(x[:100]) if dyn else x[:100]
            check = same_math(build(), objective, K, xb, n)
            if check > 1e-5:
                raise RuntimeError(f"the yardstick's {objective} loss differs from elbolab's by {check:.2e}")
            times = alternate({
                "hand": hand_side(build, x, n, 100, dyn, objective, K, steps=steps),
                "hand-tuned": hand_side(build, x, n, 100, dyn, objective, K, tuned=True, steps=steps),
                "driver": driver_side(build, d, 100, objective, K, steps=steps, threads=args.threads),
            }, args.reps)
            res = summarize(times, "hand", scale=1e3 / steps, unit="ms/step")
            for side in res:
                res[side]["ratio_to_hand-tuned"] = statistics.median(
                    [a / b for a, b in zip(times[side], times["hand-tuned"])])
            out[f"{objective} K={K}"] = {"objective": objective, "K": K, "steps": steps, "model": config,
                                          "yardstick_loss_rel_diff": check, "sides": res}
            print(f"[iwae] {objective} K={K}: " + ", ".join(
                f"{k} {v['median']:.2f} ms/step ({v['ratio_to_hand']:.2f}x)" for k, v in res.items()),
                file=sys.stderr)
    return out


def linear_layers(model) -> tuple[list[nn.Linear], list[nn.Linear]]:
    enc = [m for m in model.encoder.net if isinstance(m, nn.Linear)]
    dec = [m for m in model.decoder if isinstance(m, nn.Linear)]
    return enc, dec


def eval_section(args, data: Data) -> dict:
    """The K = 5000 importance-sampled log-likelihood against the same matrix products alone."""
    d = data.get("digits" if args.quick else "mnist")
    config = {"latent_dim": 4, "hidden": [32]} if args.quick else CS236
    K = 50 if args.quick else 5000
    model = builder(config, d)()  # trained one epoch: weights and log-weight spreads of a real model
    fit(model, d, TrainConfig(objective="elbo-analytic", epochs=1, threads=args.threads, progress=False))
    x = d.test[: args.eval_rows]
    n, D = x.shape
    b, kc = chunk_sizes(n, K, D)
    enc, dec = linear_layers(model)
    # the products of one evaluation: per row chunk and particle chunk, the encoder on the
    # chunk's rows and the decoder on its particles x rows
    calls = []
    for start in range(0, n, b):
        rows = min(b, n - start)
        for kstart in range(0, K, kc):
            parts = min(kc, K - kstart)
            calls += [(rows, lin) for lin in enc] + [(parts * rows, lin) for lin in dec]
    flops = sum(2.0 * r * lin.in_features * lin.out_features for r, lin in calls)
    inputs = {(r, lin.in_features): torch.randn(r, lin.in_features) for r, lin in calls}

    def products() -> float:
        with torch.no_grad():
            t0 = now()
            for r, lin in calls:  # the products alone (no bias: nn.Linear's addmm also copies it in)
                torch.mm(inputs[(r, lin.in_features)], lin.weight.T)
            return now() - t0

    results = {}

    def estimate(compiled: bool) -> Callable[[], float]:
        def run() -> float:
            with pyro.validation_enabled(False):
                t0 = now()
                results[compiled] = importance_estimates(model, x, K, seed=0, compiled=compiled)
                return now() - t0
        return run

    hand = HandVAE.like(model)

    def by_hand() -> float:
        torch.manual_seed(0)
        t0 = now()
        hand.log_likelihood(x, K, b, kc)
        return now() - t0

    with pyro.validation_enabled(False):  # the yardstick's estimate equals elbolab's on the same draws
        ours = importance_estimates(model, x[:4], min(K, 200), seed=0)["log_likelihood"].values
        torch.manual_seed(0)
        theirs = hand.log_likelihood(x[:4], min(K, 200), *chunk_sizes(4, min(K, 200), D))
    check = float(((ours - theirs).abs() / theirs.abs()).max())
    if check > 1e-5:
        raise RuntimeError(f"the hand-written importance estimate differs from elbolab's by {check:.2e}")
    # the compiled path: its first call compiles (once per chunk shape, kept for the model); --quick
    # checks the machinery with torch.compile's "eager" backend (no code generated: seconds less)
    backend = evaluate.COMPILE_BACKEND
    evaluate.COMPILE_BACKEND = "eager" if args.quick else backend
    try:
        with wall_clock():  # (the compiler's own processes included)
            first = estimate(True)()
        times = alternate({"importance_estimates": estimate(False), "compiled": estimate(True), "hand": by_hand,
                           "matmul_only": products}, args.reps)
    finally:
        evaluate.COMPILE_BACKEND = backend
    res = summarize(times, "matmul_only")
    for side in res:
        res[side]["ratio_to_hand"] = statistics.median([a / h for a, h in zip(times[side], times["hand"])])
    t, t_mm, t_c = res["importance_estimates"]["median"], res["matmul_only"]["median"], res["compiled"]["median"]
    share = statistics.median([m / e for m, e in zip(times["matmul_only"], times["importance_estimates"])])
    share_c = statistics.median([m / e for m, e in zip(times["matmul_only"], times["compiled"])])
    compile_seconds = max(0.0, first - t_c)
    n_test = d.test.shape[0]
    whole, whole_c = t * n_test / n, t_c * n_test / n + compile_seconds
    diff = float((results[True]["log_likelihood"].values - results[False]["log_likelihood"].values).abs().max())
    out = {"model": config, "trained_epochs": 1, "K": K, "rows_timed": n, "rows_per_chunk": b,
           "particles_per_chunk": kc, "yardstick_rel_diff": check, "flops": flops,
           "samples_per_second": n * K / t, "gflops_achieved": flops / t / 1e9,
           "gflops_matmul": flops / t_mm / 1e9, "share_of_matmul_rate": share,
           "hand_share_of_matmul_rate": statistics.median(
               [m / h for m, h in zip(times["matmul_only"], times["hand"])]),
           "compiled": {"samples_per_second": n * K / t_c, "gflops_achieved": flops / t_c / 1e9,
                        "share_of_matmul_rate": share_c, "time_ratio_to_eager": statistics.median(
                            [c / e for c, e in zip(times["compiled"], times["importance_estimates"])]),
                        "compile_seconds": compile_seconds, "max_abs_diff_to_eager_nats": diff,
                        "whole_test_set_seconds_extrapolated": whole_c},
           "whole_test_set_rows": n_test, "whole_test_set_seconds_extrapolated": whole,
           "sides": res}
    print(f"[eval] K={K}: {out['samples_per_second']:.0f} samples/s, {out['gflops_achieved']:.1f} GFLOP/s against "
          f"{out['gflops_matmul']:.1f} for the products alone ({share:.0%}); compiled {n * K / t_c:.0f} samples/s "
          f"({share_c:.0%}), {compile_seconds:.1f} s compiling; whole test set ~{whole:.0f} s eager, "
          f"~{whole_c:.0f} s compiled", file=sys.stderr)
    return out


def ppca_section(args, data: Data) -> dict:
    """Seconds until PPCA is within 0.01 nats per datapoint of the closed-form optimum."""
    import lightning.pytorch as pl

    from elbolab.models import ppca

    d = load_dataset("digits")
    d = replace(d, val=d.val[:0])
    k, tol, steps, check_every = 10, (0.1 if args.quick else 0.01), 1500, 10
    W, loc, noise_scale = ppca.mle(d.train, k)
    best = float(ppca.log_marginal(d.train, W, loc, noise_scale).mean())

    class Within(pl.Callback):
        """Checks the exact log-likelihood every few steps (its own time left out) and
        stops training once within ``tol`` of the optimum."""

        def __init__(self):
            self.t0, self.spent, self.at = None, 0.0, None

        def on_train_epoch_start(self, trainer, module):
            if self.t0 is None:
                self.t0 = now()

        def on_train_batch_end(self, trainer, module, *a):
            if trainer.global_step % check_every:
                return
            c0 = now()
            with torch.no_grad():
                gap = best - float(module.model.exact_log_likelihood(d.train).mean())
            if gap < tol:
                self.at = (trainer.global_step, c0 - self.t0 - self.spent, gap)
                trainer.should_stop = True
            self.spent += now() - c0

    steps_to = {}

    def svi() -> float:
        torch.manual_seed(0)
        m = models.build_model("ppca", {"latent_dim": k, "guide": "amortized-full"}, d.data_dim, d.n_train)
        cb = Within()
        cfg = TrainConfig(steps=steps, batch_size=d.n_train, lr=0.03, lr_final=1e-4, threads=args.threads,
                          progress=False)
        fit(m, d, cfg, callbacks=[cb])
        if cb.at is None:
            raise RuntimeError(f"PPCA by SVI did not come within {tol} nats in {steps} steps")
        steps_to["svi"] = cb.at[0]
        return cb.at[1]

    _, _, _, _, history = ppca.em(d.train, k, steps=2000, tol=1e-12)
    em_steps = next(i + 1 for i, h in enumerate(history) if best - h < tol)
    steps_to["em"] = em_steps

    def em() -> float:
        t0 = now()
        ppca.em(d.train, k, steps=em_steps, tol=0.0)
        return now() - t0

    res = summarize(alternate({"svi": svi, "em": em}, args.reps), "em")
    out = {"data": "digits", "latent_dim": k, "tolerance_nats": tol, "optimum_log_likelihood": best,
           "svi_recipe": "amortized-full guide, full batch (1257 rows), Adam 0.03 decaying to 1e-4 over "
                         f"{steps} steps; exact log-likelihood checked every {check_every} steps (not timed)",
           "em_recipe": "Tipping & Bishop EM in float64 from a random W (its per-step log-likelihood included)",
           "steps_to_tolerance": steps_to, "sides": res}
    print(f"[ppca] within {tol} nats: SVI {res['svi']['median']:.2f} s ({steps_to['svi']} steps), "
          f"EM {res['em']['median']:.3f} s ({em_steps} steps)", file=sys.stderr)
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def growth_section(args, data: Data) -> dict:
    """Time against N, K, latent size and hidden size, with least-squares log-log slopes."""
    d = data.get("digits" if args.quick else "mnist")
    base = {"latent_dim": 4, "hidden": [32]} if args.quick else CS236
    x, dyn = d.train, d.binarize == "dynamic"
    steps = 5 if args.quick else 40
    series = {}

    def step_ms(config, objective="elbo-analytic", K=1) -> Callable[[], float]:
        run = objective_side(builder(config, d), x, 100, dyn, objective, K, steps=steps)
        return lambda: run() * 1e3 / steps

    def sweep(name, values, make, unit, model_flops=None):
        sides = {str(v): make(v) for v in values}
        times = alternate(sides, max(3, args.reps - 2))
        med = [statistics.median(times[str(v)]) for v in values]
        entry = {"values": list(values), "median": med, "unit": unit, "slope": _slope(values, med),
                 "slope_upper_half": _slope(values[len(values) // 2:], med[len(values) // 2:])}
        if model_flops is not None:
            fl = [model_flops(v) for v in values]
            entry["flops_slope"] = _slope(values, fl)
        series[name] = entry
        print(f"[growth] {name}: slope {entry['slope']:.2f} (upper half {entry['slope_upper_half']:.2f})",
              file=sys.stderr)

    def vae_flops(D, k, hidden, K):  # multiply-adds x 2 of one step's forward pass, per row
        enc = [D, *hidden, 2 * k]
        dec = [k, *reversed(hidden), D]
        return 2 * (sum(a * b for a, b in zip(enc, enc[1:])) + K * sum(a * b for a, b in zip(dec, dec[1:])))

    D, k, hid = d.data_dim, base["latent_dim"], list(base["hidden"])
    Ks = [1, 2, 5, 10, 20] if args.quick else [1, 2, 5, 10, 20, 50]
    sweep("train step vs K (iwae)", Ks, lambda K: step_ms(base, "iwae", K), "ms/step",
          lambda K: vae_flops(D, k, hid, K))
    lats = [2, 5, 10, 20] if args.quick else [2, 5, 10, 20, 50, 100]
    sweep("train step vs latent_dim", lats, lambda v: step_ms({**base, "latent_dim": v}), "ms/step",
          lambda v: vae_flops(D, v, hid, 1))
    hs = [16, 32, 64] if args.quick else [50, 100, 200, 400, 800]
    sweep("train step vs hidden size (two layers)", hs, lambda h: step_ms({**base, "hidden": [h, h]}), "ms/step",
          lambda h: vae_flops(D, k, [h, h], 1))
    model = builder(base, d)()
    Ke = 20 if args.quick else 200
    rows = [10, 20, 40] if args.quick else [50, 100, 200, 400]

    def eval_s(rows_, K_):
        def run():
            with pyro.validation_enabled(False):
                t0 = now()
                importance_estimates(model, d.test[:rows_], K_, seed=0)
                return now() - t0
        return run

    sweep(f"evaluation vs N (K = {Ke})", rows, lambda r: eval_s(r, Ke), "s")
    Kv = [10, 20, 40] if args.quick else [100, 200, 400, 800, 1600]
    sweep("evaluation vs K (100 rows)" if not args.quick else "evaluation vs K (10 rows)", Kv,
          lambda K_: eval_s(10 if args.quick else 100, K_), "s")
    # a per-datapoint guide: a table of N rows; dense Adam moves every row every step (O(N) a
    # step, O(N^2) an epoch), the sparse-rows SparseAdam only the batch's
    Ns = [1000, 4000, 16000] if args.quick else [10_000, 40_000, 160_000, 640_000]
    g = torch.Generator().manual_seed(0)

    def table_step(N, sparse):
        xs = torch.randn(N, 64, generator=g)
        tab = DataSplits("synthetic", xs, xs[:0], xs[:0])

        def run():
            torch.manual_seed(0)
            m = models.build_model("ppca", {"latent_dim": 20, "guide": "per-datapoint"}, 64, N)
            timer = LoopTimer()
            fit(m, tab, TrainConfig(steps=steps, batch_size=100, lr=0.01, threads=args.threads, progress=False,
                                    sparse_rows=sparse), callbacks=[timer])
            return timer.seconds * 1e3 / steps
        return run

    sweep("per-datapoint guide step vs N (dense Adam)", Ns, lambda N: table_step(N, False), "ms/step")
    sweep("per-datapoint guide step vs N (--sparse-rows)", Ns, lambda N: table_step(N, True), "ms/step")
    return {"model": base, "steps_per_measurement": steps, "series": series}


def cs236_section(args, data: Data) -> dict:
    """The CS236 protocol end to end: scripts/reproduce_cs236.py in a fresh process."""
    steps, n_samples = (50, 10) if args.quick else (20_000, 1000)
    if not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory (the CS236 section needs MNIST)")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vae",) if args.quick else ("vae", "gmvae"):
            run_out = os.path.join(tmp, name)
            cmd = [sys.executable, "-m", "elbolab.scripts.reproduce_cs236", "--data-dir", args.data_dir, "--out", run_out,
                   "--threads", str(args.threads), "--models", name, "--steps", str(steps),
                   "--n-samples", str(n_samples), "--no-progress"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"reproduce_cs236 failed: {proc.stderr.strip()[-500:]}")
            import json

            with open(os.path.join(run_out, "metrics.json")) as f:
                m = json.load(f)["runs"][name]
            out[name] = {"steps": steps, "n_samples": n_samples, "training_seconds": m["seconds"],
                         "wall_seconds": wall, "command": "elbolab reproduce-cs236 " + " ".join(cmd[3:])}
            print(f"[cs236] {name}: {steps} steps trained in {m['seconds']:.0f} s; the whole run {wall:.0f} s",
                  file=sys.stderr)
    return out


# One timed workload in a fresh process on the code at sys.argv[1] (its own checkout):
# prints the seconds of the training loop (or of the evaluation) as JSON.
WORKER = r"""
import json, sys, time
src, spec = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, src)
import torch, pyro, lightning.pytorch as pl
from elbolab import models
from elbolab.inference.evaluate import importance_estimates, tune_malloc
from elbolab.models.datasources import load_dataset
from elbolab.inference.train import fit
from elbolab.inference.train_config import TrainConfig
torch.set_num_threads(spec["threads"])
tune_malloc()
d = load_dataset("mnist", data_dir=spec["data_dir"], binarize="dynamic", val_fraction=0.0)
torch.manual_seed(0)
m = models.build_model("vae", spec["model"], d.data_dim, d.n_train)
class Timer(pl.Callback):
    t0 = None
    def on_train_epoch_start(self, trainer, module):
        self.t0 = self.t0 or time.perf_counter()
    def on_train_end(self, trainer, module):
        self.t1 = time.perf_counter()
if spec["kind"] == "eval":
    with pyro.validation_enabled(False):
        t0 = time.perf_counter()
        importance_estimates(m, d.test[: spec["rows"]], spec["K"], seed=0)
        seconds = time.perf_counter() - t0
else:
    timer = Timer()
    fit(m, d, TrainConfig(objective=spec["objective"], n_particles=spec["K"], steps=spec["steps"], epochs=None,
                          threads=spec["threads"], progress=False), callbacks=[timer])
    seconds = timer.t1 - timer.t0
print(json.dumps({"seconds": seconds}))
"""


def baseline_section(args, data: Data) -> dict:
    """Before and after: the driver and the evaluation of git revision --baseline against
    this checkout's, each workload in a fresh process per repetition, alternated."""
    import json

    if args.baseline is None:
        raise UsageError("--sections baseline needs --baseline REF (a git revision to compare against)")
    if not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory (the baseline section needs MNIST)")
    steps, rows = (20, 10) if args.quick else (600, 100)
    workloads = {
        "CS236 VAE, elbo-analytic (s per 600 steps)": {"kind": "train", "objective": "elbo-analytic", "K": 1,
                                                        "steps": steps},
        "CS236 VAE, iwae K = 50 (s per 20 steps)": {"kind": "train", "objective": "iwae", "K": 50,
                                                     "steps": 2 if args.quick else 20},
        f"evaluation, K = 1000, {rows} test rows (s)": {"kind": "eval", "K": 100 if args.quick else 1000,
                                                        "rows": rows},
    }
    out = {"baseline": args.baseline, "workloads": {}}
    with tempfile.TemporaryDirectory() as old:
        try:
            archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        except (subprocess.CalledProcessError, OSError) as e:
            raise UsageError(f"--baseline {args.baseline}: cannot check it out ({e})") from None
        out["baseline_commit"] = subprocess.run(["git", "rev-parse", args.baseline], cwd=ROOT, capture_output=True,
                                                text=True).stdout.strip()

        def side(src, spec):
            def run() -> float:
                full = {**spec, "model": CS236, "threads": args.threads, "data_dir": args.data_dir}
                proc = subprocess.run([sys.executable, "-c", WORKER, src, json.dumps(full)], cwd=src,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"baseline worker failed: {proc.stderr.strip()[-500:]}")
                return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
            return run

        for name, spec in workloads.items():
            res = summarize(alternate({"before": side(old, spec), "after": side(ROOT, spec)}, args.reps), "before")
            out["workloads"][name] = res
            print(f"[baseline] {name}: before {res['before']['median']:.2f}, after {res['after']['median']:.2f} "
                  f"({res['after']['ratio_to_before']:.2f}x)", file=sys.stderr)
    return out


RUNNERS = {"train": train_section, "profile": profile_section, "threads": threads_section, "iwae": iwae_section,
           "eval": eval_section, "ppca": ppca_section,
           "growth": growth_section, "cs236": cs236_section, "baseline": baseline_section}


# ----------------------------------------------------------------------------- the table


def table(results: dict) -> list[str]:
    lines = []
    earlier = results.get("earlier")
    if earlier:  # sections kept from a fuller run than the one that wrote the others
        lines += [f"Sections {', '.join(earlier['sections'])}: from an earlier run, `{earlier['command']}` "
                  f"({earlier['clock']} clock, medians of {earlier['reps']} repetitions, load average "
                  f"{earlier['load_average_before']} before), not re-measured with the code of the other "
                  "sections.", ""]
    tr = results.get("train")
    if tr:
        lines += ["| training, s/epoch (ratio to hand-written) | hand-written, default Adam | hand-written, tuned "
                  "| Pyro SVI.step | elbolab objective built by Pyro, no Lightning | elbolab objective replayed, "
                  "no Lightning | elbolab driver | driver / hand tuned | target |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in tr.items():
            s = r["sides"]
            cell = lambda k: f"{s[k]['median']:.3f} ({s[k]['ratio_to_hand']:.2f}x)"  # noqa: E731
            target = "1.25x" if r["data"] == "digits" else "1.15x"
            lines.append(f"| {name} ({r['objective']}) | {cell('hand')} | {cell('hand-tuned')} | {cell('pyro-svi')} "
                         f"| {cell('objective-eager')} | {cell('objective')} | {cell('driver')} "
                         f"| {s['driver']['ratio_to_hand-tuned']:.2f}x "
                         f"| {target} |")
        lines.append("")
    pr = results.get("profile")
    if pr:
        s = pr["sides"]
        lines += [f"| step profile ({pr['data']}, {pr['objective']}), {pr['unit']} | rows | loss | backward | Adam "
                  "| whole step |", "|---|---|---|---|---|---|"]
        for who in ("hand-tuned", "objective-eager", "objective"):
            p = s[who]
            lines.append(f"| {who} | {p['rows']:.3f} | {p['loss']:.3f} | {p['backward']:.3f} | {p['adam']:.3f} "
                         f"| {p['step']:.3f} |")
        lines += [f"| driver | | | | | {s['driver']['step']:.3f} |",
                  f"| Pyro's share built every step (objective-eager - hand), replayed (objective - hand), "
                  f"the driver's own (driver - objective) | | | | | "
                  f"{pr['pyro_own_eager']:.3f}, {pr['pyro_own']:.3f}, {pr['driver_own']:.3f} |", ""]
    th = results.get("threads")
    if th:
        s = th["sides"]
        lines += ["| threads (CS236 VAE, ms/step) | 1 thread | 2 threads |", "|---|---|---|"]
        for who in ("hand", "driver"):
            one, two = s[who + ", 1 thread(s)"]["median"], s[who + ", 2 thread(s)"]["median"]
            lines.append(f"| {who} | {one:.2f} | {two:.2f} |")
        lines.append("")
    iw = results.get("iwae")
    if iw:
        lines += ["| IWAE training, ms/step | hand-written, default Adam | hand-written, tuned | elbolab driver "
                  "| driver / hand | driver / hand tuned | target |", "|---|---|---|---|---|---|---|"]
        for name, r in iw.items():
            s = r["sides"]
            lines.append(f"| {name} | {s['hand']['median']:.2f} | {s['hand-tuned']['median']:.2f} | "
                         f"{s['driver']['median']:.2f} | {s['driver']['ratio_to_hand']:.2f}x | "
                         f"{s['driver']['ratio_to_hand-tuned']:.2f}x | 1.2x |")
        lines.append("")
    ev = results.get("eval")
    if ev:
        lines += ["| evaluation | value |", "|---|---|",
                  f"| K = {ev['K']} importance samples, {ev['rows_timed']} test rows timed | "
                  f"{ev['samples_per_second']:,.0f} samples/s |",
                  f"| floating-point rate (matrix products) | {ev['gflops_achieved']:.1f} GFLOP/s |",
                  f"| the same products alone | {ev['gflops_matmul']:.1f} GFLOP/s |",
                  f"| share (target 60%) | {ev['share_of_matmul_rate']:.0%} |",
                  f"| hand-written estimate (same chunks): time ratio elbolab / hand | "
                  f"{ev['sides']['importance_estimates']['ratio_to_hand']:.2f} "
                  f"(hand: {ev['hand_share_of_matmul_rate']:.0%} of the products' rate) |",
                  f"| whole test set ({ev['whole_test_set_rows']:,} rows), extrapolated | "
                  f"{ev['whole_test_set_seconds_extrapolated']:.0f} s |"]
        cp = ev.get("compiled")
        if cp:
            lines += [f"| compiled decoder and likelihood: samples/s, share | {cp['samples_per_second']:,.0f}, "
                      f"{cp['share_of_matmul_rate']:.0%} (time {cp['time_ratio_to_eager']:.2f}x eager's) |",
                      f"| compiling (two chunk shapes), largest difference to eager | "
                      f"{cp['compile_seconds']:.1f} s, {cp['max_abs_diff_to_eager_nats']:.1e} nats |",
                      f"| whole test set compiled, extrapolated (compiling included) | "
                      f"{cp['whole_test_set_seconds_extrapolated']:.0f} s |"]
        lines.append("")
    pp = results.get("ppca")
    if pp:
        s = pp["sides"]
        lines += ["| PPCA to within 0.01 nats of the optimum | seconds | steps |", "|---|---|---|",
                  f"| SVI | {s['svi']['median']:.2f} | {pp['steps_to_tolerance']['svi']} |",
                  f"| EM | {s['em']['median']:.3f} | {pp['steps_to_tolerance']['em']} |", ""]
    gr = results.get("growth")
    if gr:
        lines += ["| growth | values | median times | log-log slope (upper half) | FLOP slope |",
                  "|---|---|---|---|---|"]
        for name, e in gr["series"].items():
            times = ", ".join(f"{t:.3g}" for t in e["median"])
            fl = f"{e['flops_slope']:.2f}" if "flops_slope" in e else "—"
            lines.append(f"| {name} | {', '.join(map(str, e['values']))} | {times} {e['unit']} | "
                         f"{e['slope']:.2f} ({e['slope_upper_half']:.2f}) | {fl} |")
        lines.append("")
    bl = results.get("baseline")
    if bl:
        lines += [f"| before / after (baseline {bl['baseline']}) | before | after | after / before |",
                  "|---|---|---|---|"]
        for name, r in bl["workloads"].items():
            lines.append(f"| {name} | {r['before']['median']:.2f} | {r['after']['median']:.2f} | "
                         f"{r['after']['ratio_to_before']:.2f}x |")
        lines.append("")
    cs = results.get("cs236")
    if cs:
        lines += ["| CS236 protocol | steps | training | whole run (with evaluation) |", "|---|---|---|---|"]
        for name, r in cs.items():
            lines.append(f"| {name} | {r['steps']:,} | {r['training_seconds']:.0f} s | {r['wall_seconds']:.0f} s |")
        lines.append("")
    return lines


def document(results: dict) -> list[str]:
    m = results["machine"]
    return [f"# Benchmarks: `{results['command']}`", "",
            f"{m['cpu']}, {m['threads']} thread(s), load average {results['load_average_before']} before and "
            f"{results['load_average_after']} after; medians of {results['reps']} alternating repetitions; "
            + ("the main thread's CPU seconds" if results.get("clock") == "cpu" else "wall-clock seconds")
            + " (the threads section, compiling and the CS236 protocol: wall clock).", "",
            *table(results),
            *[f"\nSection {name} failed: {error}" for name, error in results.get("errors", {}).items()]]


@_cli.guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad or not sections:
        raise UsageError(f"--sections must be a subset of {','.join(SECTIONS)}, got {args.sections!r}")
    if args.quick and "cs236" in sections and args.sections == ",".join(DEFAULT_SECTIONS):
        sections.remove("cs236")  # needs MNIST; ask for it explicitly
    if args.retable:
        import json

        try:
            with open(os.path.join(args.out, "results.json")) as f:
                results = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"--retable: cannot read {args.out}/results.json ({e})") from None
        with atomic_write(os.path.join(args.out, "table.md")) as f:
            f.write("\n".join(document(results)) + "\n")
        print(f"-> {args.out}/table.md")
        return 0
    if "baseline" in sections and args.baseline is None:
        raise UsageError("--sections baseline needs --baseline REF (a git revision to compare against)")
    needs_mnist = [s for s in sections if s in ("cs236", "baseline") or (s != "ppca" and not args.quick)]
    if needs_mnist and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir}: no such directory (MNIST is needed by {', '.join(needs_mnist)})")
    run_dir = RunDir(args.out, overwrite=args.overwrite, refusal=_cli.REFUSAL)
    run_dir.check()
    torch.set_num_threads(args.threads)
    tune_malloc()
    data = Data(args.data_dir)
    cmd = "elbolab benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"command": cmd.strip(), "machine": machine(args.threads), "reps": args.reps, "clock": args.clock,
                     "load_average_before": loadavg()}
    t0 = time.perf_counter()
    _clock[0] = CLOCKS[args.clock]
    errors = {}
    try:
        for name in sections:
            try:
                results[name] = RUNNERS[name](args, data)
            except (UsageError, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001 (a section's fault must not lose the sections measured)
                errors[name] = f"{type(e).__name__}: {e}"
                print(f"[{name}] failed, the other sections go on: {_cli.one_line(errors[name])[:300]}",
                      file=sys.stderr)
    finally:
        _clock[0] = time.perf_counter
    if errors:
        results["errors"] = errors
    results["load_average_after"] = loadavg()
    results["seconds"] = time.perf_counter() - t0
    with run_dir:
        save_json(results, os.path.join(args.out, "results.json"))
        with atomic_write(os.path.join(args.out, "table.md")) as f:
            f.write("\n".join(document(results)) + "\n")
    print("\n".join(table(results)))
    print(f"-> {args.out}/results.json, {args.out}/table.md")
    if errors:
        print(f"{PROG}: error: section(s) {', '.join(errors)} failed (in results.json under errors); the others "
              "were written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
