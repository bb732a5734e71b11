"""Errors that the CLI reports as one clear line (and a non-zero exit), not a traceback."""


class ConfigError(ValueError):
    """A config key or value is unknown, of the wrong type or out of range."""


class DataError(ValueError):
    """A data file or folder is missing, unreadable or malformed."""
