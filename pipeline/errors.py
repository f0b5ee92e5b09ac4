"""Errors that kdpipe raises for problems in what a user gave it.

Everything a user provides (a config, a path, an array of the wrong shape) is checked at the
boundary and refused with a ``KdpipeError`` that names the field, what was expected and what
was seen. The CLI turns these into a one-paragraph message and exit code 2; any other exception
is a bug in kdpipe and keeps its traceback.
"""


class KdpipeError(ValueError):
    """A problem with user input: a config field, a path, a model, a cache or a checkpoint."""


class ConfigError(KdpipeError):
    """A config field is unknown, has the wrong type, or is out of range."""


class DataError(KdpipeError):
    """An input dataset or prepared token dataset is missing, empty or malformed."""


class ModelLoadError(KdpipeError):
    """A model directory is missing files, has unexpected or mis-shaped tensors, or an
    unsupported architecture."""


class CacheError(KdpipeError):
    """A teacher-output cache is missing, corrupt, or does not match the run that opens it."""


class CheckpointError(KdpipeError):
    """A checkpoint is corrupt or belongs to another model or config."""


class TeacherOutputError(KdpipeError):
    """A teacher's outputs are not finite (NaN or inf): broken weights, or a dtype too narrow
    for its activations."""
