"""The one training driver: PyTorch Lightning's Trainer over an objective.

``fit(model, data, config, out_dir)`` trains ``model.model`` / ``model.guide`` by
stochastic optimization of a named objective, mini-batches carrying their row
indices into the model's subsampled ``data`` plate. Lightning supplies the loop,
checkpoints, early stopping and multi-process training; this module supplies:

* the step (manual optimization, so that a non-finite loss or gradient is caught
  after the backward pass and *before* the optimizer touches the parameters);
* deterministic batches (``batches.EpochBatches``: order a function of seed and
  epoch) and torch/Python RNG states in the checkpoint, so a resumed run ends
  bitwise where an uninterrupted one does;
* checkpoints written atomically and read back with ``torch.load(weights_only=True)``
  (``inference.checkpoints``), the step in ``inference.lightning_module``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elbolab.inference import distributed
from elbolab.inference.checkpoints import (CHECKPOINT, HISTORY, check_checkpoint, checkpoint_io, for_lightning,
                                          write_history)
from elbolab.inference.errors import UsageError
from elbolab.inference.loggers import LogMetrics, make_logger
from elbolab.models.datasources import DataSplits
from elbolab.inference.objectives import build_objective
from elbolab.inference.traces import infers_new_rows
from elbolab.inference.train_config import TrainConfig, check_config_for_data, quiet_lightning, warmup_batch


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


def interrupt_watch():
    """A Lightning callback that notes a Ctrl-C (KeyboardInterrupt) reaching the Trainer.

    Lightning's handler of an interrupted ``Trainer.fit`` ignores SIGINT from then on and
    calls ``sys.exit(1)``: the interrupt would end the program with status 1 and no
    word. ``fit`` raises KeyboardInterrupt instead when this callback saw one, and
    ``restoring_sigint`` puts back the SIGINT handler that was in place before.

    While the Trainer runs, a first SIGINT only sets ``requested``; the training step
    raises KeyboardInterrupt at its start (``SVIModule.train_on``). Python's own handler
    raises wherever the main thread is, and a KeyboardInterrupt raised inside an object's
    finalizer (Lightning's profiler has one) is printed as "Exception ignored" and
    dropped: the fit went on. A second SIGINT raises at once."""
    import lightning.pytorch as pl

    class InterruptWatch(pl.Callback):
        seen = False
        requested = False

        def on_exception(self, trainer, module, exception):
            if isinstance(exception, KeyboardInterrupt):
                self.seen = True

        def _on_sigint(self, signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        @contextlib.contextmanager
        def restoring_sigint(self):
            try:
                before = signal.getsignal(signal.SIGINT)
                signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main thread: signals are not ours to handle
                before = None
            try:
                yield
                if self.requested:  # after the last step: still an interrupt
                    raise KeyboardInterrupt
            finally:
                if before is not None and signal.getsignal(signal.SIGINT) is not before:
                    with contextlib.suppress(ValueError, TypeError):
                        signal.signal(signal.SIGINT, before)

    return InterruptWatch()


def check_objective_for_model(model, data: DataSplits, config: TrainConfig) -> None:
    """Evaluate the objective once on the first rows (no gradient, the random-number
    stream left as it was), so that a model the objective cannot take (e.g. an
    importance-weighted bound on a model with global latents) is refused before
    anything is written."""
    objective = build_objective(config.objective, config.n_particles, config.alpha, model.max_plate_nesting,
                                model.data_plate)
    x0 = warmup_batch(data, config)
    with torch.no_grad(), torch.random.fork_rng():
        objective.loss(model, x0, torch.arange(x0.shape[0]))


def fit(model, data: DataSplits, config: TrainConfig, out_dir: str | None = None,
        resume: bool = False, callbacks: list | None = None, checkpoint: dict | None = None) -> FitResult:
    """Train ``model`` on ``data.train`` with the Lightning Trainer.

    ``out_dir``: where the checkpoint (``checkpoint.ckpt``) and ``history.csv`` go;
    None trains without writing anything. ``resume``: continue from the checkpoint
    in ``out_dir`` (``checkpoint``: that checkpoint as ``check_checkpoint`` returned it,
    if the caller has checked it already; every part is checked before Lightning
    restores it). Raises NonFiniteError (before the update) on a NaN/inf loss or
    gradient; the last checkpoint on disk stays the last good one; KeyboardInterrupt on
    Ctrl-C (Lightning's own handler would exit with status 1).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from elbolab.inference.lightning_module import FLUSH_DENORMALS, Progress, SVIModule, flushed_denormals

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    objective = build_objective(config.objective, config.n_particles, config.alpha, model.max_plate_nesting,
                                model.data_plate, for_training=True)
    check_config_for_data(config, data)
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if resume and (ckpt_path is None or not os.path.isfile(ckpt_path)):
        raise UsageError(f"{out_dir}: no checkpoint to resume from")
    done_steps, done_epochs, preloaded = 0, 0, None
    if resume:  # every part checked before Lightning restores it
        ck = checkpoint if checkpoint is not None else check_checkpoint(ckpt_path, model, config)
        done_steps, done_epochs, preloaded = ck["global_step"], ck["epoch"], {ckpt_path: for_lightning(ck)}

    # tables that can look up rows sparsely (nn.Embedding's ``sparse`` flag) do so while training:
    # their gradients then name the rows a step touched (see SVIModule.setup)
    sparse_flags = [(m, m.sparse) for m in model.modules() if isinstance(getattr(m, "sparse", None), bool)]
    model.train()  # (an evaluation after an earlier fit leaves the modules in eval mode)
    module = SVIModule(model, data, config, objective)
    steps_per_epoch = math.ceil(math.ceil(data.n_train / (config.devices * config.num_nodes)) / config.batch_size)
    total = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    # a resumed run already past the budget asked for now is finished (Lightning would refuse
    # a checkpoint whose epoch exceeds max_epochs): its epochs count as the budget
    max_epochs = (max(config.epochs, math.ceil(done_steps / steps_per_epoch), done_epochs) if config.steps is None
                  else -1)
    validate = len(data.val) > 0 and infers_new_rows(model, data.train)
    cbs = ([Progress(total, config.progress)] if config.progress is not False else []) + list(callbacks or [])
    if ckpt_path:
        every = config.checkpoint_every or max(1, 100 // steps_per_epoch)
        cbs.append(ModelCheckpoint(dirpath=out_dir, filename=CHECKPOINT[: -len(".ckpt")], save_top_k=1,
                                   every_n_epochs=every, save_on_train_epoch_end=True,
                                   enable_version_counter=False))
    logger = make_logger(config.logger, out_dir)  # Lightning's, beside history.csv (inference.loggers)
    if logger is not None:
        cbs.append(LogMetrics(every=max(1, min(50, total // 100))))
        logger.log_hyperparams(config.to_dict())
    if validate and config.patience is not None:
        cbs.append(EarlyStopping(monitor="val_elbo", mode="max", patience=config.patience,
                                 check_on_train_epoch_end=False))
    interrupt = interrupt_watch()
    cbs.append(interrupt)
    module.interrupt = interrupt
    if not validate:
        val_kwargs: dict[str, Any] = {"limit_val_batches": 0}
    elif config.val_every is not None:  # every val_every optimizer steps, across epoch boundaries
        val_kwargs = {"val_check_interval": config.val_every, "check_val_every_n_epoch": None}
    else:  # at each epoch's end
        val_kwargs = {}
    with warnings.catch_warnings(), quiet_lightning():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")  # LogMetrics has its own
        warnings.filterwarnings("ignore", ".*LightningModule.*has parameters that were not used.*")
        warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")  # val_elbo is global
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            max_steps=config.steps if config.steps is not None else -1,
            accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
            strategy=config.strategy, callbacks=cbs, logger=logger or False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=bool(ckpt_path), num_sanity_val_steps=0,
            use_distributed_sampler=False, plugins=[checkpoint_io(preloaded)], default_root_dir=out_dir or os.getcwd(),
            deterministic=False, **val_kwargs,
        )
        t0 = time.perf_counter()
        for m, _ in sparse_flags:
            m.sparse = True
        try:
            with flushed_denormals(FLUSH_DENORMALS), interrupt.restoring_sigint():
                trainer.fit(module, ckpt_path=ckpt_path if resume else None, weights_only=True)
        except SystemExit:
            if interrupt.seen:  # Lightning turns Ctrl-C into sys.exit(1): it is an interrupt again
                raise KeyboardInterrupt from None
            raise
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
