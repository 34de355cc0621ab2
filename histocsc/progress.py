"""Progress of long work, shared by every command: a rich bar on a terminal; without one
(SLURM, CI, nohup) a plain line at least every `HISTOCSC_PROGRESS_S` seconds (30) with the stage,
the count, the rate and the ETA, and one when the stage ends, so a batch log is never silent."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

INTERVAL_ENV = "HISTOCSC_PROGRESS_S"
DEFAULT_INTERVAL_S = 30.0
SLOW_UNITS = {"cases": "case", "slides": "slide"}  # shown as seconds per item, never "2,593/s"


def interval_s() -> float:
    """Seconds between two progress lines without a terminal (HISTOCSC_PROGRESS_S, else 30)."""
    try:
        return max(0.01, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def on_terminal() -> bool:
    """Whether progress is drawn as a bar (stderr is a terminal) rather than logged as lines."""
    return sys.stderr.isatty()


def rate_text(speed: float | None, unit: str) -> str:
    """'130 tiles/s', or '12.5 s/case' for slow items (cases, slides) and rates below 1/s."""
    if not speed:
        return f"- {unit}/s"
    singular = SLOW_UNITS.get(unit, unit.removesuffix("s") or unit)
    if unit in SLOW_UNITS or speed < 1:
        return f"{1 / speed:,.1f} s/{singular}"
    return f"{speed:,.0f} {unit}/s"


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 01 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def log_line(text: str, stream: TextIO | None = None) -> None:
    """One time-stamped line on stderr (the batch log)."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=stream or sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def status(description: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    """'infer tiles: 1,200/17,003 (7 %), 130 tiles/s, ETA 2 min 01 s, 9 s elapsed'."""
    speed = done / elapsed if elapsed > 0 and done else None
    if not unit:  # a step without a count
        return f"{description}: working, {duration(elapsed)} elapsed"
    count = f"{done:,}/{total:,} ({100 * done / total:.0f} %)" if total else f"{done:,}"
    eta = f", ETA {duration((total - done) / speed)}" if total and speed else ""
    return (f"{description}: {count} {unit}, {rate_text(speed, unit)}{eta}, "
            f"{duration(elapsed)} elapsed")


class LogLines:
    """Progress as log lines: one every `interval_s()` from a background thread, one at the end."""

    def __init__(self, description: str, total: int | None, unit: str,
                 final: bool = True) -> None:
        self.description, self.total, self.unit, self.final = description, total, unit, final
        self.done = 0
        self.start = time.monotonic()
        self._stream = sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def advance(self, n: int = 1) -> None:
        self.done += n

    def line(self) -> str:
        return status(self.description, self.done, self.total, time.monotonic() - self.start,
                      self.unit)

    def _run(self) -> None:
        while not self._stop.wait(interval_s()):
            log_line(self.line(), self._stream)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.final:
            elapsed = time.monotonic() - self.start
            speed = self.done / elapsed if elapsed else 0.0
            rate = f" ({rate_text(speed, self.unit)})" if self.unit else ""
            count = f" {self.done:,} {self.unit}" if self.unit else ""
            log_line(f"{self.description}: done{count} in {duration(elapsed)}{rate}",
                     self._stream)


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item), with a unit such as 'tiles'."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(rate_text(task.finished_speed or task.speed, self.unit), style="cyan")


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None, unit: str = "tiles", disable: bool | None = None
) -> Iterator[Callable[[int], None]]:
    """Progress of a stage, yielding `advance(n)`: a bar on stderr when it is a terminal, log
    lines otherwise (module docstring); nothing at all with `disable=True`."""
    if disable:
        yield lambda n=1: None
        return
    if not on_terminal():
        lines = LogLines(description, total, unit)
        try:
            yield lines.advance
        finally:
            lines.close()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextlib.contextmanager
def working(description: str) -> Iterator[None]:
    """A long step without a count (export, evaluate): a line at least every interval without a
    terminal, and one at its end; nothing on a terminal, where the command's own lines show."""
    if on_terminal():
        yield
        return
    lines = LogLines(description, None, "")
    try:
        yield
    finally:
        lines.close()
