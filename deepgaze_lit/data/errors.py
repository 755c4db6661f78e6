"""DataError: the user-error type of the data layer (the CLI prints its message as one line)."""


class DataError(ValueError):
    """Bad input data or data settings; the message names the file, folder or setting and what was expected."""
