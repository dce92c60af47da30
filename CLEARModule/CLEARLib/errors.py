"""The one exception family for bad input: a ValueError whose message names the file and the problem."""

from __future__ import annotations

from os import PathLike


class CLEARInputError(ValueError):
    """Input that CLEAR cannot use as given (unreadable, inconsistent or unsupported)."""

    def __init__(self, problem: str, path: str | PathLike | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CLEARCancelled(Exception):
    """Raised inside a long-running call when the user's cancel request is seen."""
