"""The one training driver: PyTorch Lightning's Trainer over an objective.

``fit(model, data, config, out_dir)`` trains ``model.model`` / ``model.guide`` by
stochastic optimization of a named objective, mini-batches carrying their row
indices into the model's subsampled ``data`` plate. Lightning supplies the loop,
checkpoints, early stopping and multi-process training; this module supplies:

* the step (manual optimization, so that a non-finite loss or gradient is caught
  after the backward pass and *before* the optimizer touches the parameters);
* deterministic batches (``loaders.EpochBatches``: order a function of seed and
  epoch) and torch/Python RNG states in the checkpoint, so a resumed run ends
  bitwise where an uninterrupted one does;
* checkpoints written atomically (temporary file, fsync, rename) and read back
  with ``torch.load(weights_only=True)``: a checkpoint file cannot run code;
* a light progress bar (tqdm, refreshed every few steps) and a per-step history.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer.util import is_validation_enabled

from inference import distributed
from inference.errors import NonFiniteError, UsageError
from inference.files import atomic_write
from inference.loaders import DataSplits, batch_loader
from inference.objectives import Objective, build_objective

CHECKPOINT = "checkpoint.ckpt"
HISTORY = "history.csv"
VAL_SEED = 20_24  # validation draws use their own fixed seed: common random numbers
MAX_SEED = 2**62  # seeds are offset by ranks and splits; torch takes at most 2**64 - 1
MAX_THREADS = 1024
# The largest particles x rows x data-dimension tensor a step or an evaluation batch
# may make (2**27 float32 values: 512 MiB); larger flag values are refused up front.
MAX_TENSOR_ELEMENTS = 1 << 27
# Two measured choices of the step (README, "Performance"; tests/test_perf.py checks
# that each leaves the numbers as they were): Adam as one fused kernel over all
# parameters, and Pyro's validation on the warm-up pass and the first step of a
# session only (while it is on for the caller), not on every step.
FUSED_ADAM = True
VALIDATE_EVERY_STEP = False
# And a third: float32 denormals (below 1.2e-38) flushed to zero while training. The
# importance weights of an IWAE step spread over more than 87 nats put denormal
# numbers into the backward pass (w_k dlog w_k / dlogits for weights w_k < 1.2e-38),
# and a CPU computes on denormals 10 to 100 times slower: a K = 50 step of the CS236
# VAE took 430 ms with them, 115 ms without (one thread). Terms of that size change
# no float32 sum they are added to.
FLUSH_DENORMALS = True


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own Config says what to train)."""

    objective: str = "elbo"
    n_particles: int = 1
    alpha: float | None = None  # Renyi alpha (objective "renyi" only)
    lr: float = 1e-3
    lr_final: float | None = None  # exponential decay of the rate to this value over the run
    batch_size: int = 100
    epochs: int | None = 10
    steps: int | None = None  # wins over epochs when given
    clip_norm: float | None = None
    val_every: int | None = None  # validation ELBO every this many steps (None: each epoch)
    patience: int | None = None  # early stopping: validations without improvement
    val_particles: int = 1
    seed: int = 0
    checkpoint_every: int | None = None  # epochs between checkpoints (None: about every 100 steps)
    threads: int | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "cpu"
    sparse_rows: bool = False  # per-datapoint tables by SparseAdam: only the batch's rows (and moments) move

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.lr_final is not None and not self.lr_final > 0:
            raise UsageError(f"--lr-final must be positive, got {self.lr_final}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.steps is None and (self.epochs is None or self.epochs < 1):
            raise UsageError(f"--epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise UsageError(f"--clip-norm must be positive, got {self.clip_norm}")
        if self.val_every is not None and self.val_every < 1:
            raise UsageError(f"--val-every must be >= 1, got {self.val_every}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"--patience must be >= 1, got {self.patience}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"--threads must be in 1..{MAX_THREADS}, got {self.threads}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < MAX_SEED):
            raise UsageError(f"--seed must be an integer in [0, 2**62), got {self.seed}")
        if self.devices < 1 or self.num_nodes < 1:
            raise UsageError("--devices and --num-nodes must be >= 1")
        if any(w in self.strategy for w in ("spawn", "fork", "notebook")):
            raise UsageError(f"--strategy {self.strategy}: the fit would live in spawned processes and its result "
                             "not come back; use --strategy ddp (the launcher runs the whole program per process)")
        build_objective(self.objective, self.n_particles, self.alpha)  # validates the three

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"TrainConfig has no field(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class FitResult:
    """What a fit returns: the trained model, its history and timings."""

    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)  # one row per step
    validations: list[dict] = field(default_factory=list)  # step, val_elbo, its standard error
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    checkpoint: str | None = None
    world_size: int = 1  # processes that trained (DDP)
    rank_param_diff: float = 0.0  # max |parameter - rank 0's| over ranks after training (0.0: in sync)

    @property
    def final_loss(self) -> float:
        """Mean per-datapoint loss (negative bound) over the last 10% of steps."""
        if not self.history:
            return float("nan")
        tail = self.history[-max(1, len(self.history) // 10):]
        return float(np.mean([r["loss"] for r in tail]))


# ----------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through ``atomic_write``: the old checkpoint or the new one, never a partial file."""
    with atomic_write(path, binary=True) as f:
        torch.save(obj, f)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no code runs); errors are UsageErrors."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: refused to load the checkpoint ({first[:200]})") from None


CHECKPOINT_KEYS = ("state_dict", "global_step", "epoch", "loops", "optimizer_states", "elbolab")


def check_checkpoint(path: str, model: torch.nn.Module) -> dict:
    """Load ``path`` (weights only) and check it is a checkpoint of this driver for
    ``model``: its keys, and parameter names and shapes. Returns it; UsageError if not."""
    ck = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise UsageError(f"{path}: not a checkpoint of this program (no {', '.join(missing)})")
    want = {"model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in ck["state_dict"].items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise UsageError(f"{path}: its parameters do not match the model ({', '.join(diff[:3])}"
                         f"{', ...' if len(diff) > 3 else ''})")
    return ck


def _checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            atomic_torch_save(checkpoint, str(path))

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return load_checkpoint(str(path))

    return AtomicCheckpointIO()


# ----------------------------------------------------------------------------- Lightning


def adam(params, lr: float) -> torch.optim.Adam:
    """torch's Adam, fused (one kernel for every parameter) where torch has that kernel
    for these parameters (dense floating-point tensors on CPU or CUDA): 1.64 against
    0.63 ms a step for the 661k parameters of the CS236 VAE on one thread. The same
    update up to float round-off."""
    params = list(params)
    fused = FUSED_ADAM and bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True if fused else None)


def _history_to_tensor(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([[r["step"], r["epoch"], r["loss"], r["seconds"]] for r in rows],
                        dtype=torch.float64).reshape(-1, 4)


def _history_from_tensor(t: torch.Tensor) -> list[dict]:
    return [{"step": int(s), "epoch": int(e), "loss": float(l), "seconds": float(sec)}
            for s, e, l, sec in t.tolist()]


def _make_module(model, data: DataSplits, config: TrainConfig, objective: Objective):
    import lightning.pytorch as pl

    class SVIModule(pl.LightningModule):
        """Holds the model (and its guide); one manual-optimization step per batch."""

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.model = model
            self.objective = objective
            self.n_data = data.n_train
            self.history: list[dict] = []
            self.validations: list[dict] = []
            self.t0 = time.perf_counter()
            self.seconds_before = 0.0  # training seconds of earlier (resumed) sessions
            self.row_params: list[torch.nn.Parameter] = []  # tables with row-sparse gradients (see setup)
            self.history_synced = 0  # history rows already averaged over ranks
            self.validate = is_validation_enabled()  # the caller's Pyro validation (on by default)
            self.steps_run = 0  # steps of this session
            self.named_params: list[tuple[str, torch.nn.Parameter]] = []

        # -- data --------------------------------------------------------------
        def train_dataloader(self):
            return batch_loader(data.train, config.batch_size, seed=config.seed, shuffle=True,
                                dynamic=data.binarize == "dynamic", rank=self.global_rank,
                                world_size=self.trainer.world_size)

        def val_dataloader(self):
            # one item per rank: validation_step evaluates the whole set with distributed.map_rows
            return torch.utils.data.DataLoader([0], batch_size=None)

        def setup(self, stage=None):
            # one seed per process (Lightning's launcher may have reset the thread count)
            if config.threads is not None:
                torch.set_num_threads(config.threads)
            torch.manual_seed(config.seed + self.global_rank)
            random.seed(config.seed + self.global_rank)
            # a warm-up pass creates any lazily built parameters; its gradient shows which
            # parameters are tables with row-sparse gradients: those stay out of DDP's dense
            # all-reduce (training_step exchanges their rows instead)
            x0 = warmup_batch(data, config)
            self.objective(self.model.model, self.model.guide, x0, torch.arange(x0.shape[0])).backward()
            names = [n for n, p in self.named_parameters() if p.grad is not None and p.grad.is_sparse]
            self.row_params = [p for n, p in self.named_parameters() if n in names]
            self._ddp_params_and_buffers_to_ignore = names
            self.named_params = list(self.model.named_parameters())  # (after any lazy ones were made)
            self.zero_grad(set_to_none=True)

        def on_train_start(self):
            distributed.broadcast_parameters(self.row_params)  # DDP broadcasts the others

        def configure_optimizers(self):
            rows = {id(p) for p in self.row_params}
            dense = [p for p in self.model.parameters() if id(p) not in rows]
            opts = [adam(dense if config.sparse_rows else list(self.model.parameters()), lr=config.lr)]
            if config.sparse_rows and self.row_params:
                opts.append(torch.optim.SparseAdam(self.row_params, lr=config.lr))
            if config.lr_final is None:
                return opts
            total = config.steps or config.epochs * len(self.train_dataloader())
            ratio = config.lr_final / config.lr
            scheds = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(
                opt, lambda t: ratio ** min(1.0, t / max(1, total))), "interval": "step"} for opt in opts]
            return opts, scheds

        # -- the step ----------------------------------------------------------
        def training_step(self, batch, batch_idx):
            x, idx = batch
            opts = self.optimizers()
            opts = opts if isinstance(opts, list) else [opts]
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            # Pyro's checks (site shapes and supports, model and guide matching) on the first
            # step: they look at the structure, which later steps repeat (VALIDATE_EVERY_STEP)
            with pyro.validation_enabled(self.validate and (VALIDATE_EVERY_STEP or self.steps_run == 0)):
                loss = self.objective(self.model.model, self.model.guide, x, idx)
            self.steps_run += 1
            self.manual_backward(loss)  # DDP averages the dense gradients over ranks here
            if self.row_params:  # (a collective: before any rank can stop on a bad value)
                distributed.sync_sparse_grads(self.row_params)  # the rows, averaged over ranks
                if not config.sparse_rows:  # dense Adam: the same step as for a dense table
                    for p in self.row_params:
                        p.grad = p.grad.to_dense()
            step = self.global_step + 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteError(f"step {step}: the loss is {loss_value}; parameters not updated", step)
            named = [(n, p.grad) for n, p in self.named_params if p.grad is not None]
            values = [g._values() if g.is_sparse else g for _, g in named]  # coalesced: no repeated row
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(values)))) if values else 0.0
            if not math.isfinite(norm):
                bad = next(n for (n, _), v in zip(named, values) if not torch.isfinite(v).all())
                raise NonFiniteError(f"step {step}: the gradient of {bad} is not finite; parameters not updated",
                                     step)
            if config.clip_norm is not None and norm > config.clip_norm:
                coef = config.clip_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
                for v in values:
                    v.mul_(coef)
            opts[0].step()  # Lightning counts the steps of its optimizers: one per batch
            for opt in opts[1:]:  # SparseAdam over the tables (--sparse-rows)
                opt.optimizer.step()
            scheds = self.lr_schedulers()
            for sched in scheds if isinstance(scheds, list) else [scheds] if scheds is not None else []:
                sched.step()
            self.history.append({"step": step, "epoch": self.current_epoch, "loss": loss_value / self.n_data,
                                 "seconds": self.seconds_before + time.perf_counter() - self.t0})

        # -- validation: the ELBO per datapoint, K particles, seeds of its own ------
        def validation_step(self, batch, batch_idx):
            # the rows dealt to the ranks and gathered back (the training RNG is left untouched):
            # the same numbers for any number of processes
            from inference.evaluate import Estimate, elbo_terms

            elbo = distributed.map_rows(
                lambda xb, rb: {"elbo": elbo_terms(self.model, xb, rb, config.val_particles)["elbo"]},
                data.val, chunk_size=max(config.batch_size, 500), seed=VAL_SEED)["elbo"]  # (n_val,)
            est = Estimate.of(elbo)
            self.validations.append({"step": self.global_step, "val_elbo": est.mean, "val_elbo_se": est.se})
            self.log("val_elbo", est.mean, prog_bar=False, logger=False, sync_dist=False, batch_size=est.n)

        def sync_history(self):
            """Average the new history rows' losses over ranks (each rank's loss is its own
            shard of the global batch, scaled to N): the loss of the whole global batch."""
            new = self.history[self.history_synced:]
            if self.trainer.world_size > 1 and new:
                losses = torch.tensor([r["loss"] for r in new], dtype=torch.float64)
                mean = torch.stack(distributed.all_gather_rows(losses)).mean(0)
                for r, v in zip(new, mean.tolist()):
                    r["loss"] = v
            self.history_synced = len(self.history)

        # -- checkpoint extras: RNG states, history, elapsed time ---------------
        def on_save_checkpoint(self, checkpoint):  # called on every rank (rank 0 writes)
            self.sync_history()
            state = torch.get_rng_state()  # (L,) uint8
            checkpoint["elbolab"] = {
                "torch_rng": state,
                # every rank's torch RNG state (rank 0 writes the file): a resumed DDP run
                # draws on each rank what the uninterrupted run would have drawn
                "torch_rng_ranks": torch.cat(distributed.all_gather_rows(state[None])),  # (world, L)
                "python_rng": random.getstate(),
                "history": _history_to_tensor(self.history),
                "validations": torch.tensor([[v["step"], v["val_elbo"], v["val_elbo_se"]] for v in self.validations],
                                            dtype=torch.float64).reshape(-1, 3),
                "seconds": self.seconds_before + time.perf_counter() - self.t0,
            }

        def on_load_checkpoint(self, checkpoint):
            extra = checkpoint["elbolab"]
            ranks = extra.get("torch_rng_ranks")
            _, world = distributed.rank_and_world()
            if ranks is not None and ranks.shape[0] == world:
                torch.set_rng_state(ranks[self.global_rank].clone())
            else:  # a checkpoint of another world size: rank 0's stream, the others re-seeded apart
                torch.set_rng_state(extra["torch_rng"])
                if self.global_rank:
                    torch.manual_seed(distributed.chunk_seed(config.seed + self.global_rank, checkpoint["global_step"]))
            random.setstate(extra["python_rng"])
            self.history = _history_from_tensor(extra["history"])
            self.history_synced = len(self.history)
            self.validations = [{"step": int(a), "val_elbo": b, "val_elbo_se": c}
                                for a, b, c in extra["validations"].tolist()]
            self.seconds_before = float(extra["seconds"])
            self.t0 = time.perf_counter()

    return SVIModule()


class _Progress:
    """A tqdm bar over the steps with the running loss, refreshed every few steps."""

    def __new__(cls, total: int, enabled: bool | None):
        import lightning.pytorch as pl
        from tqdm.auto import tqdm

        class Progress(pl.Callback):
            def __init__(self):
                self.bar = None
                self.every = max(1, total // 200)

            def on_train_start(self, trainer, module):
                if trainer.global_rank == 0:
                    self.bar = tqdm(total=total, initial=trainer.global_step, desc="fit", unit="step",
                                    disable=None if enabled is None else not enabled, dynamic_ncols=True,
                                    mininterval=0.5, leave=None)  # left on screen unless below another bar

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if self.bar is not None and trainer.global_step % self.every == 0:
                    self.bar.n = trainer.global_step
                    tail = module.history[-self.every:]
                    post = {"loss": f"{np.mean([r['loss'] for r in tail]):.3f}"}
                    if module.validations:
                        post["val_elbo"] = f"{module.validations[-1]['val_elbo']:.3f}"
                    self.bar.set_postfix(post, refresh=False)
                    self.bar.refresh()

            def teardown(self, trainer, module, stage):
                if self.bar is not None:
                    self.bar.n = trainer.global_step
                    self.bar.close()
                    self.bar = None

        return Progress()


def write_history(rows: list[dict], validations: list[dict], path: str) -> None:
    """history.csv: one row per step (loss in nats per datapoint), val columns where measured."""
    val_at = {v["step"]: v for v in validations}
    with atomic_write(path) as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "seconds", "val_elbo", "val_elbo_se"])
        for r in rows:
            v = val_at.get(r["step"])
            w.writerow([r["step"], r["epoch"], f"{r['loss']:.6f}", f"{r['seconds']:.4f}",
                        "" if v is None else f"{v['val_elbo']:.6f}",
                        "" if v is None else f"{v['val_elbo_se']:.6f}"])


def check_config_for_data(config: TrainConfig, data: DataSplits) -> None:
    """The checks that need both the training config and the data (before any work)."""
    if config.batch_size > data.n_train:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {data.n_train} training rows")
    size = config.n_particles * config.batch_size * data.data_dim
    if size > MAX_TENSOR_ELEMENTS:
        raise UsageError(f"--n-particles {config.n_particles} x --batch-size {config.batch_size} x "
                         f"{data.data_dim} data dimensions = {size:.3g} values in one tensor, more than the "
                         f"{MAX_TENSOR_ELEMENTS:.3g} allowed; lower --n-particles or --batch-size")
    if config.val_particles * data.data_dim > MAX_TENSOR_ELEMENTS:
        raise UsageError(f"val_particles {config.val_particles} x {data.data_dim} data dimensions is more "
                         f"than the {MAX_TENSOR_ELEMENTS:.3g} values allowed in one tensor")
    check_trainer_flags(config)


def rows_per_batch(n_particles: int, data_dim: int, most: int = 1000) -> int:
    """Rows per evaluation batch so that particles x rows x data_dim stays in bounds."""
    return max(1, min(most, MAX_TENSOR_ELEMENTS // max(1, n_particles * data_dim)))


def check_trainer_flags(config: TrainConfig) -> None:
    """Refuse an accelerator / strategy / devices combination Lightning cannot use,
    before any work (a Trainer is built and thrown away; nothing runs)."""
    import lightning.pytorch as pl

    try:
        with warnings.catch_warnings(), _quiet_lightning():
            warnings.simplefilter("ignore")
            pl.Trainer(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                       strategy=config.strategy, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
    except Exception as e:  # Lightning raises ValueError, MisconfigurationException, RuntimeError ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"--accelerator {config.accelerator} --strategy {config.strategy} --devices "
                         f"{config.devices} --num-nodes {config.num_nodes}: {first}") from None


def warmup_batch(data: DataSplits, config: TrainConfig) -> torch.Tensor:
    """The first training rows as a model sees them (one seeded binary draw of the
    grey levels under dynamic binarization: a Bernoulli model needs 0/1 data)."""
    x0 = data.train[: min(config.batch_size, data.n_train)]
    if data.binarize == "dynamic":
        x0 = torch.bernoulli(x0, generator=torch.Generator().manual_seed(config.seed))
    return x0


def check_objective_for_model(model, data: DataSplits, config: TrainConfig) -> None:
    """Evaluate the objective once on the first rows (no gradient, the random-number
    stream left as it was), so that a model the objective cannot take (e.g. an
    importance-weighted bound on a model with global latents) is refused before
    anything is written."""
    objective = build_objective(config.objective, config.n_particles, config.alpha,
                                getattr(model, "max_plate_nesting", 1))
    x0 = warmup_batch(data, config)
    with torch.no_grad(), torch.random.fork_rng():
        objective(model.model, model.guide, x0, torch.arange(x0.shape[0]))


def denormals_flushed() -> bool:
    """Whether this thread flushes float32 denormals to zero (torch has no getter)."""
    return float(torch.tensor([1e-39], dtype=torch.float32) * 2.0) == 0.0


@contextlib.contextmanager
def flushed_denormals(on: bool = True):
    """Flush denormal floats to zero on the CPU (``torch.set_flush_denormal``) for the
    duration, then restore the previous mode. The mode belongs to a thread: torch's
    worker threads created earlier keep theirs (one thread, the default here, is covered)."""
    before = denormals_flushed()
    if on:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's info lines (accelerator banners, tips) off for the duration of a fit."""
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fit(model, data: DataSplits, config: TrainConfig, out_dir: str | None = None,
        resume: bool = False, callbacks: list | None = None) -> FitResult:
    """Train ``model`` on ``data.train`` with the Lightning Trainer.

    ``out_dir``: where the checkpoint (``checkpoint.ckpt``) and ``history.csv`` go;
    None trains without writing anything. ``resume``: continue from the checkpoint
    in ``out_dir``. Raises NonFiniteError (before the update) on a NaN/inf loss or
    gradient; the last checkpoint on disk stays the last good one.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    objective = build_objective(config.objective, config.n_particles, config.alpha,
                                getattr(model, "max_plate_nesting", 1))
    check_config_for_data(config, data)
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if resume and (ckpt_path is None or not os.path.isfile(ckpt_path)):
        raise UsageError(f"--resume: no checkpoint in {out_dir}")
    done_steps = 0
    if resume:
        done_steps = int(check_checkpoint(ckpt_path, model).get("global_step") or 0)

    # tables that can look up rows sparsely (nn.Embedding's ``sparse`` flag) do so while training:
    # their gradients then name the rows a step touched (see SVIModule.setup)
    sparse_flags = [(m, m.sparse) for m in model.modules() if isinstance(getattr(m, "sparse", None), bool)]
    module = _make_module(model, data, config, objective)
    steps_per_epoch = math.ceil(math.ceil(data.n_train / (config.devices * config.num_nodes)) / config.batch_size)
    total = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    # a resumed run already past the budget asked for now is finished (Lightning would refuse
    # a checkpoint whose epoch exceeds max_epochs): its epochs count as the budget
    max_epochs = max(config.epochs, math.ceil(done_steps / steps_per_epoch)) if config.steps is None else -1
    validate = len(data.val) > 0 and getattr(model, "amortized", True)
    cbs = ([_Progress(total, config.progress)] if config.progress is not False else []) + list(callbacks or [])
    if ckpt_path:
        every = config.checkpoint_every or max(1, 100 // steps_per_epoch)
        cbs.append(ModelCheckpoint(dirpath=out_dir, filename=CHECKPOINT[: -len(".ckpt")], save_top_k=1,
                                   every_n_epochs=every, save_on_train_epoch_end=True,
                                   enable_version_counter=False))
    if validate and config.patience is not None:
        cbs.append(EarlyStopping(monitor="val_elbo", mode="max", patience=config.patience,
                                 check_on_train_epoch_end=False))
    if not validate:
        val_kwargs: dict[str, Any] = {"limit_val_batches": 0}
    elif config.val_every is not None:  # every val_every optimizer steps, across epoch boundaries
        val_kwargs = {"val_check_interval": config.val_every, "check_val_every_n_epoch": None}
    else:  # at each epoch's end
        val_kwargs = {}
    with warnings.catch_warnings(), _quiet_lightning():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        warnings.filterwarnings("ignore", ".*LightningModule.*has parameters that were not used.*")
        warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")  # val_elbo is global
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            max_steps=config.steps if config.steps is not None else -1,
            accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
            strategy=config.strategy, callbacks=cbs, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=bool(ckpt_path), num_sanity_val_steps=0,
            use_distributed_sampler=False, plugins=[_checkpoint_io()], default_root_dir=out_dir or os.getcwd(),
            deterministic=False, **val_kwargs,
        )
        t0 = time.perf_counter()
        for m, _ in sparse_flags:
            m.sparse = True
        try:
            with flushed_denormals(FLUSH_DENORMALS):
                trainer.fit(module, ckpt_path=ckpt_path if resume else None, weights_only=True)
        finally:
            for m, flag in sparse_flags:
                m.sparse = flag
        seconds = time.perf_counter() - t0
    if ckpt_path:
        trainer.save_checkpoint(ckpt_path, weights_only=False)  # the final state (every rank calls; rank 0 writes)
    module.sync_history()
    _, world = distributed.rank_and_world()
    rank_diff = distributed.max_rank_difference(list(model.parameters()))
    if ckpt_path and trainer.global_rank == 0:
        write_history(module.history, module.validations, os.path.join(out_dir, HISTORY))
    return FitResult(
        model=model, history=module.history, validations=module.validations, steps=trainer.global_step,
        epochs=trainer.current_epoch, seconds=module.history[-1]["seconds"] if module.history else seconds,
        stopped_early=bool(trainer.should_stop and trainer.global_step < total), checkpoint=ckpt_path,
        world_size=world, rank_param_diff=rank_diff,
    )
