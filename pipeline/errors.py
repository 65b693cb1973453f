"""The one exception users see as a one-line message (exit code 2 on the command line)."""


class ConfigError(Exception):
    """A config, input or model problem reported to the user as one line, before any output exists."""
