"""The one way errors reach a user: a message, a hint, and an exit code."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; scripts can rely on them."""

    OK = 0
    ERROR = 1  # an unexpected failure (a bug): please report it
    USAGE = 2  # bad arguments, unknown names, bad input files
    NOT_FOUND = 3  # a model, weights file, cache or image that is not there
    INVALID_DATA = 4  # corrupt or mismatched files (weights, cache shards)
    UNSUPPORTED = 5  # a model or option clipterm refuses rather than approximate
    BUSY = 6  # another process holds the lock
    INTERRUPTED = 130  # Ctrl-C


class ClipTermError(Exception):
    """An error a user can act on. `message` is one line; `hint` says what to do next."""

    def __init__(self, message: str, hint: str | None = None, code: ExitCode = ExitCode.USAGE):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
