"""Errors a user can act on. Each message names the file, key or stage at fault.

Everything the library raises on purpose derives from :class:`BnnError`, so callers (the pipeline
stages, fuzz tests) can tell an expected mistake from a bug.
"""


class BnnError(Exception):
    """Base class of every expected, user-fixable error in bitwise-nn."""


class DataError(BnnError):
    """A data file or folder is missing, malformed or inconsistent."""


class ModelFileError(BnnError):
    """An exported model file is truncated, tampered with, or of another format version."""


class ConfigError(BnnError):
    """A configuration value is of the wrong type or out of range."""


class TrainingDivergedError(BnnError):
    """The loss became NaN or infinite during training."""
