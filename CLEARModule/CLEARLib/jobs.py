"""Background work for a GUI that polls: a Qt-free job the Slicer widget drives from its timer.

Slicer's main thread holds the GIL between timer ticks (PythonQt), so a worker thread runs only while
the main thread waits. `poll(wait_s)` therefore waits on the job's completion event for most of each tick,
which hands the GIL to the worker; the GUI still gets control after every tick.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import CLEARCancelled


@dataclass
class BackgroundJob:
    """`work(progress, cancel)` on a worker thread.

    `progress(fraction, message)` updates `fraction` and `message`; `cancel` is a threading.Event that the
    engine checks between batches (CLEARCancelled ends the job). After `poll` returns True, `result` or
    `error` holds the outcome and `cancelled` says whether the user stopped it.
    """

    work: Callable[[Callable[[float, str], None], threading.Event], Any]
    fraction: float = 0.0
    message: str = "starting"
    result: Any = None
    error: BaseException | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> BackgroundJob:
        self._thread = threading.Thread(target=self._run, name="CLEAR job", daemon=True)
        self._thread.start()
        return self

    def _progress(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message

    def _run(self) -> None:
        try:
            self.result = self.work(self._progress, self.cancel_event)
        except BaseException as exc:  # handed to the GUI thread, which reports it
            self.error = exc
        finally:
            self._done.set()

    def poll(self, wait_s: float = 0.0) -> bool:
        """Wait up to `wait_s` for the job (the worker runs meanwhile); True once it has finished."""
        if self._done.wait(wait_s):
            if self._thread is not None:
                self._thread.join()
            return True
        return False

    def cancel(self) -> None:
        """Ask the job to stop at its next batch."""
        self.cancel_event.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, CLEARCancelled)


class LogCollector(logging.Handler):
    """Log records of CLEARLib (device, backend, timings, warnings) kept as lines for a log panel. Records come
    from any thread (the worker's included); the GUI thread takes them with `drain()` when it polls, since a
    Qt widget may only be touched from its own thread."""

    def __init__(self, logger: str = "CLEARLib", level: int = logging.INFO, max_lines: int = 5000):
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._logger = logging.getLogger(logger)
        self._previous_level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(self.format(record))

    def note(self, message: str) -> None:
        """A line of the GUI's own (what a run did), in the same panel."""
        self.emit(logging.LogRecord(self._logger.name, logging.INFO, "", 0, message, None, None))

    def drain(self) -> list[str]:
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        return lines

    def attach(self) -> LogCollector:
        self._logger.addHandler(self)
        if self._logger.getEffectiveLevel() > self.level:
            self._logger.setLevel(self.level)
        return self

    def detach(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._previous_level)
