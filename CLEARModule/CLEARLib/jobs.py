"""Background work for a GUI that polls: a Qt-free job the Slicer widget drives from its timer.

Slicer's main thread holds the GIL between timer ticks (PythonQt), so a worker thread runs only while
the main thread waits. `poll(wait_s)` therefore waits on the job's completion event for most of each tick,
which hands the GIL to the worker; the GUI still gets control after every tick.
"""

from __future__ import annotations

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
