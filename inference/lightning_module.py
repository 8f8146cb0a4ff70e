"""The Lightning module of a fit: one manual-optimization step per mini-batch, the
validation ELBO, and the RNG states and history that ride along in its checkpoints.

* the step (manual optimization, so that a non-finite loss or gradient is caught
  after the backward pass and *before* the optimizer touches the parameters);
* deterministic batches (``batches.EpochBatches``: order a function of seed and
  epoch) and torch/Python RNG states in the checkpoint, so a resumed run ends
  bitwise where an uninterrupted one does;
* a light progress bar (tqdm, refreshed every few steps) and a per-step history.
"""

from __future__ import annotations

import contextlib
import math
import random
import time

import lightning.pytorch as pl
import numpy as np
from tqdm.auto import tqdm
import pyro
import torch
from pyro.infer.util import is_validation_enabled

from elbolab.inference import distributed
from elbolab.inference.checkpoints import history_from_tensor, history_to_tensor
from elbolab.inference.errors import NonFiniteError
from elbolab.inference.evaluate import Estimate, elbo_terms
from elbolab.inference.batches import BatchRun, BatchRuns, EpochBatches, InMemoryBatches, batch_loader
from elbolab.models.datasources import DataSplits
from elbolab.inference.loggers import LogMetrics
from elbolab.inference.objectives import Objective
from elbolab.inference.replay import ReplayedLoss, static_steps
from elbolab.models.common import checked_rows
from elbolab.inference.traces import batch as rows_of, vectorizes
from elbolab.inference.train_config import TrainConfig, warmup_batch

VAL_SEED = 20_24  # validation draws use their own fixed seed: common random numbers
# Two measured choices of the step (docs/performance.md; tests/test_perf.py checks
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
# And the driver's own share of a step kept small (docs/performance.md): batches sliced
# from the in-memory rows (``batches.InMemoryBatches``; False: the DataLoader of
# ``batches.batch_loader``), and Lightning's backward and optimizer-step wrappers left out
# where they would only call hooks that nobody overrides (``plain_hooks``).
IN_MEMORY_BATCHES = True
LEAN_HOOKS = True
# Optimizer steps per Lightning batch when nothing needs Lightning's per-batch hooks
# (``steps_per_batch``): Lightning's loop costs about 0.15 ms a batch, which a run of
# steps pays once. 1: one step per batch.
STEPS_PER_BATCH = 32
# And Pyro's share of a step: the loss of a model that declares its steps static
# (``models.protocol.StaticSteps``) replayed from a recorded graph of its operations
# once the graph has reproduced the eager loss and gradient (``replay.ReplayedLoss``),
# with one process on one device. False: the loss built by Pyro at every step.
REPLAY_STEPS = True


def adam(params, lr: float) -> torch.optim.Adam:
    """torch's Adam, fused (one kernel for every parameter) where torch has that kernel
    for these parameters (dense floating-point tensors on CPU or CUDA): 1.64 against
    0.63 ms a step for the 661k parameters of the CS236 VAE on one thread. The same
    update up to float round-off."""
    params = list(params)
    fused = FUSED_ADAM and bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True if fused else None)


def match_state_layouts(optimizers) -> None:
    """Give each optimizer state tensor its parameter's memory layout. A checkpoint keeps
    the strides of the run that wrote it, and a resumed model's parameter may be laid out
    otherwise (e.g. W built from an eigendecomposition, column-major, against the
    row-major tensor a fresh module makes before the checkpoint's values are copied in);
    torch's fused Adam walks the parameter and its moments as flat memory, so mismatched
    strides pair the wrong elements: a resumed run then left the uninterrupted one after
    its first step (0.05 apart in W 26 steps later)."""
    for opt in optimizers if isinstance(optimizers, list) else [optimizers]:
        opt = getattr(opt, "optimizer", opt)
        for p, state in opt.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0 \
                        and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class SVIModule(pl.LightningModule):
    """Holds the model (and its guide); one manual-optimization step per mini-batch of the
    training rows of ``data`` (a Lightning batch may carry several: ``steps_per_batch``),
    the objective built from ``config``."""

    def __init__(self, model, data: DataSplits, config: TrainConfig, objective: Objective):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.objective = objective
        self.data, self.train_config = data, config
        self.n_data = self.data.n_train
        self.history: list[dict] = []
        self.validations: list[dict] = []
        self.t0 = time.perf_counter()
        self.seconds_before = 0.0  # training seconds of earlier (resumed) sessions
        self.interrupt = None  # train.fit's interrupt watch: a Ctrl-C noted, raised at a step's start
        self.row_params: list[torch.nn.Parameter] = []  # tables with row-sparse gradients (see setup)
        self.history_synced = 0  # history rows already averaged over ranks
        self.validate = is_validation_enabled()  # the caller's Pyro validation (on by default)
        self.steps_run = 0  # steps of this session
        self.named_params: list[tuple[str, torch.nn.Parameter]] = []
        self.lean_hooks, self.steps_per_batch = False, 1  # (decided with the trainer: train_dataloader)
        self.replay: ReplayedLoss | None = None  # (decided with the trainer: on_train_start)
        self.binary_rows = False  # (setup)

    def __setattr__(self, name, value):
        # Lightning sets this string around every hook it calls, two dozen times a step:
        # stored as a plain attribute without nn.Module.__setattr__'s look-ups for a
        # parameter, module or buffer of that name (there is none)
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- data --------------------------------------------------------------
    def train_dataloader(self):
        self.lean_hooks = LEAN_HOOKS and plain_hooks(self.trainer, self)
        self.steps_per_batch = steps_per_batch(self.trainer, self)
        make = InMemoryBatches if IN_MEMORY_BATCHES else batch_loader
        loader = make(self.data.train, self.train_config.batch_size, seed=self.train_config.seed, shuffle=True,
                      dynamic=self.data.binarize == "dynamic", rank=self.global_rank,
                      world_size=self.trainer.world_size)
        if self.steps_per_batch == 1:
            return loader
        # (a fit that keeps checkpoints takes single batches in the epoch where it stops)
        return BatchRuns(loader, self.steps_per_batch, budget=self.steps_left,
                         single_at_budget=self.trainer.checkpoint_callback is not None)

    def steps_left(self) -> int | None:
        """The optimizer steps this fit may still take (None: no step budget)."""
        return None if self.trainer.max_steps < 0 else self.trainer.max_steps - self.trainer.global_step

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # a training batch already on the device stays as it is (Lightning's default walks
        # the collection and calls .to on each tensor); a run of batches moves each batch
        # when the step takes it
        if isinstance(batch, BatchRun) or (isinstance(batch, tuple) and all(
                torch.is_tensor(t) and t.device == device for t in batch)):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self):
        # one item per rank: validation_step evaluates the whole set with distributed.map_rows.
        # A generator of its own: a DataLoader draws its iterator's base seed from the given
        # generator, else from torch's global one, and a validation would then shift the
        # training draws that follow it (measured: W 0.015 apart after 26 steps of a PPCA
        # fit validated every 20 steps against one validated every epoch)
        return torch.utils.data.DataLoader([0], batch_size=None, generator=torch.Generator().manual_seed(0))

    def setup(self, stage=None):
        # one seed per process (Lightning's launcher may have reset the thread count)
        if self.train_config.threads is not None:
            torch.set_num_threads(self.train_config.threads)
        torch.manual_seed(self.train_config.seed + self.global_rank)
        random.seed(self.train_config.seed + self.global_rank)
        # a warm-up pass creates any lazily built parameters; its gradient shows which
        # parameters are tables with row-sparse gradients: those stay out of DDP's dense
        # all-reduce (training_step exchanges their rows instead)
        x0 = warmup_batch(self.data, self.train_config)
        self.objective.loss(self.model, x0, torch.arange(x0.shape[0])).backward()
        names = [n for n, p in self.named_parameters() if p.grad is not None and p.grad.is_sparse]
        self.row_params = [p for n, p in self.named_parameters() if n in names]
        self._ddp_params_and_buffers_to_ignore = names
        self.named_params = list(self.model.named_parameters())  # (after any lazy ones were made)
        self.zero_grad(set_to_none=True)
        self.objective.vectorize = vectorizes(self.model)  # (what objective.loss finds on every call)
        self.binary_rows = binary_rows(self.data.train, self.data.binarize == "dynamic")

    def on_train_start(self):
        distributed.broadcast_parameters(self.row_params)  # DDP broadcasts the others
        opts, scheds = self.optimizers(), self.lr_schedulers()
        match_state_layouts(opts)
        self.step_optimizers = opts if isinstance(opts, list) else [opts]
        self.step_schedulers = scheds if isinstance(scheds, list) else [scheds] if scheds is not None else []
        self.step_progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        self.replay = ReplayedLoss(self.objective, self.model) if (
            REPLAY_STEPS and single_device(self.trainer) and static_steps(self.model)) else None

    def configure_optimizers(self):
        rows = {id(p) for p in self.row_params}
        dense = [p for p in self.model.parameters() if id(p) not in rows]
        opts = [adam(dense if self.train_config.sparse_rows else list(self.model.parameters()), lr=self.train_config.lr)]
        if self.train_config.sparse_rows and self.row_params:
            opts.append(torch.optim.SparseAdam(self.row_params, lr=self.train_config.lr))
        if self.train_config.lr_final is None:
            return opts
        per_epoch = len(EpochBatches(self.data.n_train, self.train_config.batch_size,
                                     world_size=self.trainer.world_size))
        total = self.train_config.steps or self.train_config.epochs * per_epoch
        ratio = self.train_config.lr_final / self.train_config.lr
        scheds = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: ratio ** min(1.0, t / max(1, total))), "interval": "step"} for opt in opts]
        return opts, scheds

    # -- the step ----------------------------------------------------------
    def training_step(self, rows_batch, batch_idx):
        # Pyro's validation off for the steps (train_on turns it on for the first one); the
        # batches' rows are the training set's, checked once (binary_rows)
        if self.replay is not None:  # (recordings of replaced parameters or buffers are dropped)
            self.replay.refresh()
        with pyro.validation_enabled(False), checked_rows(self.binary_rows):
            if not isinstance(rows_batch, BatchRun):
                self.train_on(*rows_batch)
                return
            for x, idx in rows_batch:  # a run of batches: one step each (steps_per_batch)
                if x.device != self.device:
                    x, idx = x.to(self.device), idx.to(self.device)
                self.train_on(x, idx)

    def train_on(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """One step on the rows x (B, D) at positions idx (B,) of the training set: the
        loss, its gradient, the checks (a non-finite loss or gradient stops the fit before
        any parameter moves), the update, the history row."""
        if self.interrupt is not None and self.interrupt.requested:
            raise KeyboardInterrupt
        for _, p in self.named_params:  # what zero_grad(set_to_none=True) does, without its wrapper
            p.grad = None
        # Pyro's checks (site shapes and supports, model and guide matching) on the first
        # step: they look at the structure, which later steps repeat (VALIDATE_EVERY_STEP)
        if self.steps_run == 0 or VALIDATE_EVERY_STEP:
            with pyro.validation_enabled(self.validate):
                loss = self.objective.loss(self.model, x, idx)
        elif self.replay is not None:  # the recorded graph, once it has passed its check
            loss = self.replay(x, idx)
        else:  # objective.loss, without finding out again whether the model vectorizes (setup did)
            with rows_of(self.model, x, idx):
                loss = self.objective(self.model.model, self.model.guide, x)
        self.steps_run += 1
        if self.lean_hooks:
            loss.backward()
        else:
            self.manual_backward(loss)  # DDP averages the dense gradients over ranks here
        if self.row_params:  # (a collective: before any rank can stop on a bad value)
            distributed.sync_sparse_grads(self.row_params)  # the rows, averaged over ranks
            if not self.train_config.sparse_rows:  # dense Adam: the same step as for a dense table
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
        if self.train_config.clip_norm is not None and norm > self.train_config.clip_norm:
            coef = self.train_config.clip_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            for v in values:
                v.mul_(coef)
        opts = self.step_optimizers
        if self.lean_hooks:  # counted in Lightning's progress as its optimizer wrapper counts a step
            self.step_progress.increment_ready()
            opts[0].optimizer.step()
            self.step_progress.increment_completed()
        else:
            opts[0].step()
        for opt in opts[1:]:  # SparseAdam over the tables (--sparse-rows)
            opt.optimizer.step()
        for sched in self.step_schedulers:
            sched.step()
        self.history.append({"step": step, "epoch": self.current_epoch, "loss": loss_value / self.n_data,
                             "seconds": self.seconds_before + time.perf_counter() - self.t0})

    # -- validation: the ELBO per datapoint, K particles, seeds of its own ------
    def validation_step(self, item, batch_idx):
        # the rows dealt to the ranks and gathered back (the training RNG is left untouched):
        # the same numbers for any number of processes
        elbo = distributed.map_rows(
            lambda xb, rb: {"elbo": elbo_terms(self.model, xb, rb, self.train_config.val_particles)["elbo"]},
            self.data.val, chunk_size=max(self.train_config.batch_size, 500), seed=VAL_SEED)["elbo"]  # (n_val,)
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
            "history": history_to_tensor(self.history),
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
                torch.manual_seed(distributed.chunk_seed(self.train_config.seed + self.global_rank, checkpoint["global_step"]))
        random.setstate(extra["python_rng"])
        self.history = history_from_tensor(extra["history"])
        self.history_synced = len(self.history)
        self.validations = [{"step": int(a), "val_elbo": b, "val_elbo_se": c}
                            for a, b, c in extra["validations"].tolist()]
        self.seconds_before = float(extra["seconds"])
        self.t0 = time.perf_counter()




def steps_per_batch(trainer: pl.Trainer, module: "SVIModule") -> int:
    """How many optimizer steps a Lightning batch carries: ``STEPS_PER_BATCH`` when
    nothing needs to see single steps, 1 otherwise. Lightning's per-batch work is then
    done once per run of steps (``batches.BatchRuns``): the same batches in the same
    order, the same draws, the same numbers. Runs need the in-memory loader and
    ``plain_hooks`` (so not DDP, whose gradient synchronization pairs one forward pass
    with one backward pass); validation only at epoch ends (``val_every`` counts
    Lightning's batches); no callback with a per-batch hook (``on_train_batch_start``
    or ``..._end``) other than the progress bar (which follows the step count), the
    loggers' ``LogMetrics`` (which sends each step's row of a run) and an epoch-wise
    ModelCheckpoint; and a fit that starts at an epoch's start (a run
    resumed from a checkpoint taken mid-epoch goes on as single batches did)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.model_helpers import is_overridden

    def per_step(cb) -> bool:
        if isinstance(cb, (Progress, LogMetrics)):  # (both follow runs of steps)
            return False
        if type(cb) is ModelCheckpoint:
            return cb._every_n_train_steps >= 1 or cb._train_time_interval is not None
        return any(is_overridden(h, cb, pl.Callback) for h in hooks)

    hooks = ("on_train_batch_start", "on_train_batch_end")
    per_epoch = len(EpochBatches(module.data.n_train, module.train_config.batch_size))
    if (STEPS_PER_BATCH <= 1 or not IN_MEMORY_BATCHES or not module.lean_hooks or trainer.global_step % per_epoch
            or module.train_config.val_every is not None or any(per_step(cb) for cb in trainer.callbacks)
            or any(is_overridden(h, module, pl.LightningModule) for h in hooks)):
        return 1
    return STEPS_PER_BATCH


def binary_rows(x: torch.Tensor, dynamic: bool, chunk: int = 8192) -> bool:
    """Whether every training batch drawn from the rows x holds only 0s and 1s: drawn by
    dynamic binarization, or rows that are all 0 or 1 (checked a chunk at a time)."""
    if dynamic:
        return True
    return all(bool(((x[s:s + chunk] == 0) | (x[s:s + chunk] == 1)).all()) for s in range(0, x.shape[0], chunk))


def single_device(trainer: pl.Trainer) -> bool:
    """One process on one device (Lightning's single-device strategy)."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    return type(trainer.strategy) is SingleDeviceStrategy


def plain_hooks(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether Lightning's ``manual_backward`` and ``LightningOptimizer.step`` would only
    call ``loss.backward()`` and ``optimizer.step()`` around hooks that nobody overrides:
    one process (the single-device strategy), the default 32-bit precision, and no
    callback (nor the module) with an ``on_before_backward``, ``on_after_backward`` or
    ``on_before_optimizer_step``. Then the step calls the two itself (about 0.1 ms a step
    less) and counts the optimizer step in Lightning's progress as its wrapper does."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not single_device(trainer) or type(trainer.precision_plugin) is not Precision:
        return False
    hooks = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "backward")
    return not any(is_overridden(h, cb, pl.Callback) for cb in trainer.callbacks for h in hooks[:3]) and not any(
        is_overridden(h, module, pl.LightningModule) for h in hooks)


class Progress(pl.Callback):
    """A tqdm bar over the steps with the running loss, refreshed every few steps."""

    def __init__(self, total: int, enabled: bool | None):
        self.bar = None
        self.total, self.enabled = total, enabled
        self.every = max(1, total // 200)

    def on_train_start(self, trainer, module):
        if trainer.global_rank == 0:
            self.bar = tqdm(total=self.total, initial=trainer.global_step, desc="fit", unit="step",
                            disable=None if self.enabled is None else not self.enabled, dynamic_ncols=True,
                            mininterval=0.5, leave=None)  # left on screen unless below another bar

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # (a Lightning batch may carry several steps: see steps_per_batch)
        if self.bar is not None and trainer.global_step >= self.bar.n + self.every:
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
