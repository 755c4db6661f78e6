"""The error type of network options that cannot work."""


class ModelConfigError(ValueError):
    """A network option (or an input the chosen options cannot handle); the message names the option and the fix.
    The command line prints it as one line."""


class WeightsFileError(ValueError):
    """A checkpoint, weights or template file given by the user that cannot be read as what it should be; the
    message names the file and what was expected. The command line prints it as one line."""
