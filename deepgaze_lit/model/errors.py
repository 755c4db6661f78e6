"""The error type of network options that cannot work."""


class ModelConfigError(ValueError):
    """A network option (or an input the chosen options cannot handle); the message names the option and the fix.
    The command line prints it as one line."""
