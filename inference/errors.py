"""Errors: the ones a user can fix (``UsageError`` and its kinds: one line, exit status 2
from a program), a fit's run-time fault (``NonFiniteError``) and an interrupted fit
(``Interrupted``)."""

from elbolab.models.errors import ConfigError, DataError, UsageError


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; the parameters were not updated."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(KeyboardInterrupt):
    """A fit stopped by Ctrl-C (SIGINT). A KeyboardInterrupt that also says what was kept:
    ``run_dir`` (the run directory, None for a fit that writes none), ``checkpoint``
    (the last checkpoint on disk, None if none was written yet) and its ``step``."""

    def __init__(self, run_dir: str | None = None, checkpoint: str | None = None, step: int | None = None):
        self.run_dir, self.checkpoint, self.step = run_dir, checkpoint, step
        if checkpoint is not None:
            what = f"the last checkpoint is {checkpoint}" + (f" (step {step})" if step is not None else "")
        elif run_dir is not None:
            what = f"no checkpoint was written yet in {run_dir}"
        else:
            what = "nothing was saved"
        super().__init__(what)


__all__ = ["ConfigError", "DataError", "Interrupted", "NonFiniteError", "UsageError"]
