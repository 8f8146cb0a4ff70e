"""Errors a user can fix. Scripts turn them into one line on stderr and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: a flag, a file, a value. The message is one line."""


class DataError(UsageError):
    """A data file or array that cannot be used as asked (names the file and the problem)."""


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; the parameters were not updated."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
