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
from elbolab.inference.batches import batch_loader
from elbolab.models.datasources import DataSplits
from elbolab.inference.objectives import Objective
from elbolab.inference.train_config import TrainConfig, warmup_batch

VAL_SEED = 20_24  # validation draws use their own fixed seed: common random numbers
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
    """Holds the model (and its guide); one manual-optimization step per batch of the
    training rows of ``data``, the objective built from ``config``."""

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
        self.row_params: list[torch.nn.Parameter] = []  # tables with row-sparse gradients (see setup)
        self.history_synced = 0  # history rows already averaged over ranks
        self.validate = is_validation_enabled()  # the caller's Pyro validation (on by default)
        self.steps_run = 0  # steps of this session
        self.named_params: list[tuple[str, torch.nn.Parameter]] = []

    # -- data --------------------------------------------------------------
    def train_dataloader(self):
        return batch_loader(self.data.train, self.train_config.batch_size, seed=self.train_config.seed, shuffle=True,
                            dynamic=self.data.binarize == "dynamic", rank=self.global_rank,
                            world_size=self.trainer.world_size)

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

    def on_train_start(self):
        distributed.broadcast_parameters(self.row_params)  # DDP broadcasts the others
        match_state_layouts(self.optimizers())

    def configure_optimizers(self):
        rows = {id(p) for p in self.row_params}
        dense = [p for p in self.model.parameters() if id(p) not in rows]
        opts = [adam(dense if self.train_config.sparse_rows else list(self.model.parameters()), lr=self.train_config.lr)]
        if self.train_config.sparse_rows and self.row_params:
            opts.append(torch.optim.SparseAdam(self.row_params, lr=self.train_config.lr))
        if self.train_config.lr_final is None:
            return opts
        total = self.train_config.steps or self.train_config.epochs * len(self.train_dataloader())
        ratio = self.train_config.lr_final / self.train_config.lr
        scheds = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: ratio ** min(1.0, t / max(1, total))), "interval": "step"} for opt in opts]
        return opts, scheds

    # -- the step ----------------------------------------------------------
    def training_step(self, rows_batch, batch_idx):
        x, idx = rows_batch
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        # Pyro's checks (site shapes and supports, model and guide matching) on the first
        # step: they look at the structure, which later steps repeat (VALIDATE_EVERY_STEP)
        with pyro.validation_enabled(self.validate and (VALIDATE_EVERY_STEP or self.steps_run == 0)):
            loss = self.objective.loss(self.model, x, idx)
        self.steps_run += 1
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
        opts[0].step()  # Lightning counts the steps of its optimizers: one per batch
        for opt in opts[1:]:  # SparseAdam over the tables (--sparse-rows)
            opt.optimizer.step()
        scheds = self.lr_schedulers()
        for sched in scheds if isinstance(scheds, list) else [scheds] if scheds is not None else []:
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
