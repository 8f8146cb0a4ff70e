"""Errors: the ones a user can fix (``UsageError`` and its kinds: one line, exit status 2
from a program) and a fit's run-time fault (``NonFiniteError``)."""

from elbolab.models.errors import ConfigError, DataError, UsageError


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; the parameters were not updated."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


__all__ = ["ConfigError", "DataError", "NonFiniteError", "UsageError"]
