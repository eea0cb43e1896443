"""The sweep layer's exceptions: what the CLI reports as one line, and what stops a sweep."""
from __future__ import annotations


class ConfigError(ValueError):
    """A preset or an override is invalid; the message names the key and the problem."""


class SweepError(ConfigError):
    """The sweep cannot start or continue (nothing to resume, resources the cluster lacks); the
    message says why. A ``ConfigError``: it is bad input, reported before any work."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a sweep: its open runs are closed KILLED; ``--resume`` continues."""
