"""Every error k2jax raises for bad input: one base class, so callers (and the CLIs) catch `K2Error` alone.

Each message names the thing at fault (config field, tensor, file and line, flag, mesh axis).
"""


class K2Error(ValueError):
    """Input k2jax cannot use; the message names the field, tensor, file or argument at fault."""


class ConfigError(K2Error):
    """A configuration value that k2jax cannot run with; the message names the field."""


class ShardingError(K2Error):
    """A mesh or layout that cannot hold the model; the message names the axis or field at fault."""


class CheckpointError(K2Error):
    """A checkpoint folder or file that cannot be read as the model; the message names the file or tensor."""


class TokenizerError(K2Error):
    """A tokenizer file or vocabulary that cannot be used; the message names the file, line or field."""


class ChatFormatError(K2Error):
    """A message the chat format cannot render; the message names the turn and field."""


class DataError(K2Error):
    """A data source that cannot feed training; the message names the file (and line) at fault."""


class DecodeError(K2Error):
    """A request that cannot be decoded (prompt too long, bad ids, ...); the message names the argument."""


class TopologyError(K2Error):
    """An unknown or malformed topology name; the message lists the known ones."""


class StorageError(K2Error):
    """A path or bucket that cannot be read or written; the message names the flag, bucket or object."""


class TrainingError(K2Error):
    """A run that cannot go on (its loss or gradients stopped being finite); the message names the step."""
