"""Progress of long steps, one policy for the engine, both command lines and training.

Long-running calls take a `progress` callback `(fraction, message)`: Slicer drives its progress bar with it,
and the command lines pass a `ProgressBar`, which draws a tqdm bar (rate and time left) on a terminal and
writes a plain line every few seconds to logs and CI, or nothing with `-q`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

ProgressCallback = Callable[[float, str], None]


def report(progress: ProgressCallback | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def scaled(progress: ProgressCallback | None, start: float, stop: float, prefix: str = "") -> ProgressCallback | None:
    """The callback of one part of a longer job: its 0..1 becomes start..stop of the whole."""
    if progress is None:
        return None
    return lambda fraction, message: report(progress, start + (stop - start) * fraction, prefix + message)


class ProgressBar:
    """A ProgressCallback for command lines.

    `total` counts the job's items (cases, steps, seeds) so that the bar shows a rate; without it the bar
    shows percent. On a terminal: tqdm; elsewhere: one plain line every `every_s` seconds and one at the end,
    and with `line_per_item` also one as each item finishes (a batch's per-case status in a log or console).
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", quiet: bool = False,
                 stream=None, every_s: float = 10.0, line_per_item: bool = False):  # fmt: skip
        self.desc, self.total, self.unit, self.quiet = desc, total, unit, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.line_per_item = line_per_item and bool(total)
        self.items_shown = 0
        self.started = time.monotonic()
        self.last_line = self.started
        self.finished = False
        self.baseline = None  # the fraction already done when the first report came (a resumed run)
        self.bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            percent_format = "{l_bar}{bar}| [{elapsed}<{remaining}]{postfix}"
            self.bar = tqdm(
                total=total or 100,
                desc=desc,
                unit=unit if total else "%",
                file=self.stream,
                dynamic_ncols=True,
                bar_format=None if total else percent_format,
            )

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.quiet or self.finished:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self.baseline is None:
            self.baseline = fraction if fraction < 1.0 else 0.0
            if self.bar is not None:  # the rate counts only what this run does
                self.bar.initial = self.bar.n = self._count(self.baseline)
        if self.bar is not None:
            self.bar.update(self._count(fraction) - self.bar.n)
            self.bar.set_postfix_str(message, refresh=True)
        else:
            now = time.monotonic()
            finished_items = int(fraction * self.total + 1e-9) if self.line_per_item else 0
            if fraction >= 1.0 or now - self.last_line >= self.every_s or finished_items > self.items_shown:
                self.last_line, self.items_shown = now, max(self.items_shown, finished_items)
                print(self._line(fraction, message, now - self.started), file=self.stream, flush=True)
        if fraction >= 1.0:
            self.close()

    def _count(self, fraction: float):
        """Items done (whole items when counting them), or percent."""
        return round(fraction * self.total) if self.total else 100 * fraction

    def _line(self, fraction: float, message: str, elapsed: float) -> str:
        done = f"{self._count(fraction)}/{self.total} {self.unit}" if self.total else f"{self._count(fraction):.0f}%"
        line = f"{self.desc}: {done}, {elapsed:.0f} s"
        if self.baseline < fraction < 1:
            line += f", about {elapsed * (1 - fraction) / (fraction - self.baseline):.0f} s left"
        return f"{line}  {message}".rstrip()

    def note(self, message: str) -> None:
        """A line of its own (a stop, a warning), also after the bar has closed."""
        if not self.quiet:
            print(f"{self.desc}: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None and not self.finished:
            self.bar.close()
        self.finished = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
