"""Errors the model layer raises for bad configs and checkpoints; each message is one line naming the culprit."""


class SpecdecError(Exception):
    """Base of every error specdec reports to its user as a one-line message (no traceback)."""


class ConfigError(SpecdecError):
    """A config file or field is missing, unreadable or inconsistent."""


class CheckpointError(SpecdecError):
    """A checkpoint directory, shard or tensor is missing, unreadable or has the wrong shape/dtype."""
