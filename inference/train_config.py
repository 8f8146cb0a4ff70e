"""How to train: the training configuration, its limits, and the checks that need the
data too (all before any work starts)."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from elbolab.inference.errors import ConfigError, UsageError
from elbolab.models.datasources import DataSplits
from elbolab.inference.loggers import LOGGERS, check_logger
from elbolab.inference.objectives import OBJECTIVES, build_objective
from elbolab.models.common import config_from_dict, param

VAL_SEED = 20_24  # validation draws use their own fixed seed: common random numbers
MAX_SEED = 2**62  # seeds are offset by ranks and splits; torch takes at most 2**64 - 1
MAX_THREADS = 1024
# The largest particles x rows x data-dimension tensor a step or an evaluation batch
# may make (2**27 float32 values: 512 MiB); larger flag values are refused up front.
MAX_TENSOR_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own Config says what to train)."""

    objective: str = param("elbo", "the bound to maximize", choices=OBJECTIVES)
    n_particles: int = param(1, "samples K per datapoint (vectorized) in the objective")
    alpha: float | None = param(None, "Renyi alpha (objective renyi only; default 0.5)")
    lr: float = param(1e-3, "Adam learning rate")
    lr_final: float | None = param(None, "decay the rate exponentially to this value over the run")
    batch_size: int = param(100, "rows per mini-batch")
    epochs: int | None = param(10, "passes over the training rows, in all (with --resume too: not more)")
    steps: int | None = param(None, "optimizer steps in all (wins over epochs)")
    clip_norm: float | None = param(None, "clip the gradient norm to this value")
    val_every: int | None = param(None, "validation ELBO every this many steps (default: every epoch)")
    patience: int | None = param(None, "stop after this many validations without improvement")
    val_particles: int = param(1, "samples per row of the validation ELBO")
    seed: int = param(0, "random seed: initialization, mini-batch order, draws")
    checkpoint_every: int | None = param(None, "epochs between checkpoints (default: about every 100 steps, "
                                               "and at the end)")
    threads: int | None = param(None, "torch CPU threads (default: torch's)")
    progress: bool | None = param(None, "progress bar (default: when stderr is a terminal)")
    devices: int = param(1, "processes (or GPUs) per node")
    num_nodes: int = param(1, "machines")
    strategy: str = param("auto", "Lightning strategy, e.g. ddp")
    accelerator: str = param("cpu", "cpu, gpu, auto")
    logger: str = param("none", "Lightning logger writing into the run directory's lightning_logs/version_N: csv "
                                "(metrics.csv) or tensorboard (event files; needs pip install 'elbolab[tensorboard]'); "
                                "history.csv is written either way", choices=LOGGERS)
    sparse_rows: bool = param(False, "update per-datapoint tables by SparseAdam: a step moves only its batch's rows "
                                     "(and their Adam moments), O(batch) instead of O(N) work")

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"lr must be a positive number, got {self.lr}")
        if self.lr_final is not None and not self.lr_final > 0:
            raise UsageError(f"lr_final must be positive, got {self.lr_final}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is None and (self.epochs is None or self.epochs < 1):
            raise UsageError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.steps}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise UsageError(f"clip_norm must be positive, got {self.clip_norm}")
        if self.val_every is not None and self.val_every < 1:
            raise UsageError(f"val_every must be >= 1, got {self.val_every}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"patience must be >= 1, got {self.patience}")
        if self.val_particles < 1:
            raise UsageError(f"val_particles must be >= 1, got {self.val_particles}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise UsageError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"threads must be in 1..{MAX_THREADS}, got {self.threads}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < MAX_SEED):
            raise UsageError(f"seed must be an integer in [0, 2**62), got {self.seed}")
        if self.devices < 1 or self.num_nodes < 1:
            raise UsageError("devices and num_nodes must be >= 1")
        if any(w in self.strategy for w in ("spawn", "fork", "notebook")):
            raise UsageError(f"strategy {self.strategy}: the fit would live in spawned processes and its result "
                             "not come back; use strategy ddp (the launcher runs the whole program per process)")
        build_objective(self.objective, self.n_particles, self.alpha)  # validates the three
        check_logger(self.logger)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From a dict (parsed JSON): unknown fields and values of the wrong type are refused."""
        try:
            return config_from_dict(cls, d)
        except ConfigError as e:
            raise UsageError(str(e)) from None


def check_config_for_data(config: TrainConfig, data: DataSplits) -> None:
    """The checks that need both the training config and the data (before any work)."""
    batch = min(config.batch_size, data.n_train)  # a batch larger than the training set is the whole set
    size = config.n_particles * batch * data.data_dim
    if size > MAX_TENSOR_ELEMENTS:
        raise UsageError(f"n_particles {config.n_particles} x batch_size {batch} x "
                         f"{data.data_dim} data dimensions = {size:.3g} values in one tensor, more than the "
                         f"{MAX_TENSOR_ELEMENTS:.3g} allowed; lower n_particles or batch_size")
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
        with warnings.catch_warnings(), quiet_lightning():
            warnings.simplefilter("ignore")
            pl.Trainer(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                       strategy=config.strategy, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
    except Exception as e:  # Lightning raises ValueError, MisconfigurationException, RuntimeError ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"accelerator {config.accelerator}, strategy {config.strategy}, devices "
                         f"{config.devices}, num_nodes {config.num_nodes}: {first}") from None



@contextlib.contextmanager
def quiet_lightning():
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


def warmup_batch(data: DataSplits, config: TrainConfig) -> torch.Tensor:
    """The first training rows as a model sees them (one seeded binary draw of the
    grey levels under dynamic binarization: a Bernoulli model needs 0/1 data)."""
    x0 = data.train[: min(config.batch_size, data.n_train)]
    if data.binarize == "dynamic":
        x0 = torch.bernoulli(x0, generator=torch.Generator().manual_seed(config.seed))
    return x0
