"""One exception type for every user-facing failure: the CLI prints its message and exits non-zero."""


class AnonriskError(Exception):
    """A problem with the user's input or environment, explained in the message (no traceback needed)."""

    exit_code = 2  # what the CLI exits with (bad input); a preempted training has its own


class ConfigError(AnonriskError):
    """A config key, value or file is wrong; the message names the key."""


class DataError(AnonriskError):
    """A dataset file or record is missing or unreadable; the message names the file or record."""


class Unavailable(AnonriskError):
    """An optional component cannot run here (weights not given, package not installed): the report skips
    its column and states this message instead of aborting."""
