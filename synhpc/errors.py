"""User-facing errors: one line, naming the file, key or row at fault."""


class SynhpcError(Exception):
    """An error caused by input the user controls. The CLI prints it as one line and exits 2."""


class ConfigError(SynhpcError):
    """A configuration file or override is wrong."""


class DataError(SynhpcError):
    """A table, volume, shard or checkpoint is wrong or missing."""
