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

from elbolab.inference.errors import UsageError
from elbolab.models.datasources import DataSplits
from elbolab.inference.objectives import build_objective

VAL_SEED = 20_24  # validation draws use their own fixed seed: common random numbers
MAX_SEED = 2**62  # seeds are offset by ranks and splits; torch takes at most 2**64 - 1
MAX_THREADS = 1024
# The largest particles x rows x data-dimension tensor a step or an evaluation batch
# may make (2**27 float32 values: 512 MiB); larger flag values are refused up front.
MAX_TENSOR_ELEMENTS = 1 << 27


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
        with warnings.catch_warnings(), quiet_lightning():
            warnings.simplefilter("ignore")
            pl.Trainer(accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
                       strategy=config.strategy, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)
    except Exception as e:  # Lightning raises ValueError, MisconfigurationException, RuntimeError ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"--accelerator {config.accelerator} --strategy {config.strategy} --devices "
                         f"{config.devices} --num-nodes {config.num_nodes}: {first}") from None



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
