"""The exceptions a user can cause: the CLI prints their one-sentence message, no traceback."""

from __future__ import annotations

__all__ = ["MetalabError", "ConfigError", "TrainingDiverged", "RunDirUnwritable", "MetalabWarning", "require"]


class MetalabError(Exception):
    """Base of the errors whose message tells the user what was wrong and what to do."""


class ConfigError(MetalabError, ValueError):
    """A bad config value, combination, path or file."""


class TrainingDiverged(MetalabError, RuntimeError):
    """The loss or meta-gradient became NaN/inf; the last good checkpoint was kept."""


class RunDirUnwritable(MetalabError, OSError):
    """The run directory could not be written mid-run (a full disk, say); the last checkpoint stands."""


class MetalabWarning(UserWarning):
    """Training goes on, but a setting is probably wrong: the message names the keys to change.
    The command line prints it as one line, "warning: <message>"."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)
