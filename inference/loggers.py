"""Lightning loggers for a fit (``TrainConfig.logger``): ``csv`` (Lightning's CSVLogger)
or ``tensorboard`` (its TensorBoardLogger; needs the ``tensorboard`` package, the extra
``elbolab[tensorboard]``), written where Lightning users look for them: RUN_DIR /
``lightning_logs`` / ``version_N`` (a resumed fit gets the next version). ``history.csv``
is written either way; ``none`` is the default.

What is logged, every ``every`` optimizer steps (``inference.train.fit``: 50, or a
hundredth of a shorter fit): ``train_bound``, the training bound per datapoint of that step (higher is better:
``history.csv``'s column), and ``epoch``; after each validation ``val_elbo`` and
``val_elbo_se`` (nats per datapoint, the standard error over the validation rows); the
TrainConfig as hyperparameters.
"""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl

from elbolab.inference.errors import UsageError

LOGGERS = ("none", "csv", "tensorboard")
LOG_DIR = "lightning_logs"
INSTALL = "pip install 'elbolab[tensorboard]' (or pip install tensorboard)"


def available(name: str) -> bool:
    """Whether the logger ``name`` can be made here (tensorboard: its package is installed)."""
    if name == "tensorboard":
        return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    return name in LOGGERS


def check_logger(name: str, what: str = "logger") -> None:
    """Refuse an unknown logger, or tensorboard without its package (before any work);
    the error calls the setting ``what`` (a program: its flag)."""
    if name not in LOGGERS:
        raise UsageError(f"{what} must be one of {', '.join(LOGGERS)}, got {name!r}")
    if not available(name):
        raise UsageError(f"{what} {name} needs the tensorboard package, which is not installed: {INSTALL}")


def make_logger(name: str, out_dir: str | None):
    """Lightning's logger ``name`` writing into ``out_dir``/lightning_logs, or None (``none``,
    or no directory to write in)."""
    check_logger(name)
    if name == "none" or out_dir is None:
        return None
    from lightning.pytorch import loggers

    if name == "csv":
        return loggers.CSVLogger(save_dir=out_dir, name=LOG_DIR)
    return loggers.TensorBoardLogger(save_dir=out_dir, name=LOG_DIR, default_hp_metric=False)


class LogMetrics(pl.Callback):
    """Sends the fit's numbers (see the module docstring) to the Trainer's loggers: the
    module keeps its own history (``history.csv``) and reports nothing to Lightning's
    logging itself.

    After each Lightning batch it sends the history rows of the steps that batch took
    whose number is a multiple of ``every``: one step, or a run of several when the
    driver carries runs of steps per batch (``lightning_module.steps_per_batch``, which
    this callback does not prevent). The same rows reach the loggers either way."""

    def __init__(self, every: int = 50):
        self.every = max(1, int(every))
        self.validations_sent = 0
        self.rows_seen = 0  # history rows already looked at

    def on_train_start(self, trainer, module):
        # a resumed fit's earlier rows and validations were sent before
        self.validations_sent, self.rows_seen = len(module.validations), len(module.history)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        rows, self.rows_seen = module.history[self.rows_seen:], len(module.history)
        for row in rows:
            if row["step"] % self.every == 0:
                for logger in trainer.loggers:
                    logger.log_metrics({"train_bound": -row["loss"], "epoch": row["epoch"]}, step=row["step"])

    def on_validation_end(self, trainer, module):
        for v in module.validations[self.validations_sent:]:
            for logger in trainer.loggers:
                logger.log_metrics({"val_elbo": v["val_elbo"], "val_elbo_se": v["val_elbo_se"]}, step=v["step"])
        self.validations_sent = len(module.validations)
