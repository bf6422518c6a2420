"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A mistake in the user's input (config, CLI argument, file). Shown without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config value that is unknown, of the wrong type or out of range."""


class TrainingDiverged(UserError):
    """A loss or gradient became NaN or infinite: the run stops before applying it, naming the
    iteration and the quantity (usually a learning rate too high for the dtype, or bad data)."""

    exit_code = 3
