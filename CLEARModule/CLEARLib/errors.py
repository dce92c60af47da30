"""CLEAR's exception family and the one exit-code policy of its command lines.

- CLEARInputError: input CLEAR cannot use as given; the message names the file and the problem (exit 2).
- CLEARRunError: a run that cannot go on although its input is fine (no GPU, no rendezvous, a diverged
  loss); said plainly, not blamed on the input (exit 1).
- CLEARCancelled, Ctrl-C: the user stopped it (exit 130).
- CLEARPreempted: a scheduler's signal (SIGTERM, SIGUSR1) stopped a training run after it saved its state
  (exit 128 + the signal's number, as a process killed by it would report, e.g. 143 for SIGTERM).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from os import PathLike


class CLEARInputError(ValueError):
    """Input that CLEAR cannot use as given (unreadable, inconsistent or unsupported)."""

    def __init__(self, problem: str, path: str | PathLike | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CLEARRunError(RuntimeError):
    """A run that cannot go on for a reason other than its input (device, cluster, numerics)."""


class CLEARCancelled(Exception):
    """Raised inside a long-running call when the user's cancel request is seen."""


class CLEARPreempted(Exception):
    """A run stopped by a scheduler's signal once its state was saved; rerunning it resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def check_cancel(cancel) -> None:
    """Raise CLEARCancelled when the user asked to stop: `cancel` is None, a callable returning True to stop,
    or an object with is_set() (threading.Event)."""
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise CLEARCancelled("cancelled by the user")


EXIT_INPUT, EXIT_RUN, EXIT_CANCELLED = 2, 1, 130


def run_command(prog: str, command, args) -> int:
    """Run one CLI command under the exit-code policy above; messages go to stderr as `prog: ...`."""
    try:
        return command(args)
    except CLEARInputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # a path the user gave that the system cannot open: bad input, and the message names it
        print(f"{prog}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_INPUT
    except CLEARRunError as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return EXIT_RUN
    except CLEARPreempted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except (CLEARCancelled, KeyboardInterrupt):
        print(f"{prog}: stopped by the user", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:
        # The reader of the output went away (`clear-ct info CT | head`): no traceback. Python's advice:
        # point stdout at devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_RUN
