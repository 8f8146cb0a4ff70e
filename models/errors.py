"""Errors a user can fix. Programs turn them into one line on stderr and exit status 2."""


class UsageError(ValueError):
    """Bad input from the user: an argument, a file, a value. The message is one line."""


class ConfigError(UsageError):
    """A model Config field has an impossible value (the message names the field)."""


class DataError(UsageError):
    """A data file or array that cannot be used as asked (names the file and the problem)."""
