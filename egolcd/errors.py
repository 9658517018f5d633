"""The user-error vocabulary (bottom floor: imports nothing from egolcd).

A user error is the user's input, not egolcd's bug: a malformed narrative or config, a missing or damaged
file, a missing optional package, a training run stopped on purpose. The faces (``egolcd`` command,
studio) report it as one line, :func:`error_line`; the command exits with status 2.
"""

from __future__ import annotations

__all__ = ["USER_ERRORS", "MissingDependencyError", "TrainingAborted", "error_line"]


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. ``max_bad_steps`` non-finite losses in a row); checkpoints
    already written are untouched."""


class MissingDependencyError(ImportError):
    """An optional package of a source is not installed (one-line message with the install command)."""


# Errors that are the user's input, not egolcd's bugs: reported as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    KeyError,
    TrainingAborted,
    MissingDependencyError,
)


def error_line(exc: BaseException) -> str:
    """The one line a user error is reported as (``egolcd: error: ...``; the studio shows the same)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"egolcd: error: {message}"
