"""Progress of long work: bars in a terminal, an occasional line in a log.

When standard error is a terminal, each piece of work (finding files, scoring a shard, a training
epoch) shows a rich progress bar; anywhere else (a Prefect worker, a pipe, CI) a bar is a log line
at most every ``PLAIN_INTERVAL`` seconds, so a night's log is not flooded. ``LUNG_FACTORY_PROGRESS``
= ``bars``, ``plain`` or ``off`` overrides the choice.

The bars share Prefect's console when Prefect has set one up: its log lines then print above the
bars instead of through them. A process that works for another (the model process of
``tasks.common.model_process``) sends its bar events to its parent (:func:`forward_to`), which
draws them (:func:`replay`).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

MODES = ("bars", "plain", "off")
PLAIN_INTERVAL = 60.0  # seconds between two plain lines of one bar
FORWARD_INTERVAL = 0.2  # seconds between two advance events a forwarding process sends

_lock = threading.RLock()
_display: Any = None  # the rich Progress drawing the open bars
_open = 0
_sink: Callable[[tuple], None] | None = None  # where a forwarding process sends its events
_ids = itertools.count()
_replayed: dict[str, Any] = {}  # the parent's bars for a child's events, by the child's bar id
_warned = False


def mode() -> str:
    """``bars`` in a terminal, ``plain`` elsewhere, unless ``LUNG_FACTORY_PROGRESS`` says otherwise."""
    global _warned
    chosen = os.environ.get("LUNG_FACTORY_PROGRESS", "").strip().lower()
    if chosen in MODES:
        return chosen
    if chosen and not _warned:
        _warned = True
        log.warning("LUNG_FACTORY_PROGRESS=%r is not one of %s; choosing by the terminal", chosen, ", ".join(MODES))
    stream = sys.stderr
    return "bars" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "plain"


def forward_to(sink: Callable[[tuple], None] | None) -> None:
    """Send this process's bar events to ``sink`` (a queue's ``put``) instead of drawing them."""
    global _sink
    _sink = sink


class Bar:
    """One piece of work's progress: ``advance(n)``, ``set_total(n)``, ``finish()``."""

    def __init__(self, description: str, total: int | None, unit: str, plain: bool):
        self.description, self.total, self.unit, self.plain = description, total, unit, plain
        self.completed, self.finished = 0, False
        self.started = self._last_line = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self.plain and time.monotonic() - self._last_line >= PLAIN_INTERVAL:
            self._last_line = time.monotonic()
            log.info("%s", self.line())

    def set_total(self, total: int | None) -> None:
        self.total = total

    def finish(self) -> None:
        """The work is over (a bar from :func:`start`; :func:`bar` finishes its own)."""
        _close_bar(self)

    def line(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        share = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        return (f"{self.description}: {self.completed}{of} {self.unit}{share} after "
                f"{time.monotonic() - self.started:.0f} s")

    def _end(self) -> None:
        pass


class _DrawnBar(Bar):
    def __init__(self, description: str, total: int | None, unit: str, transient: bool):
        super().__init__(description, total, unit, plain=False)
        self.transient = transient
        self.task = _display.add_task(description, total=total, unit=unit)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        _display.advance(self.task, n)

    def set_total(self, total: int | None) -> None:
        self.total = total
        _display.update(self.task, total=total)

    def _end(self) -> None:
        if self.transient:
            _display.remove_task(self.task)
        elif self.total is None:  # an open-ended count ends as a full bar of what it counted
            _display.update(self.task, total=self.completed, completed=self.completed)


class _ForwardedBar(Bar):
    def __init__(self, description: str, total: int | None, unit: str, transient: bool, plain: bool):
        super().__init__(description, total, unit, plain=False)
        self.id = f"{os.getpid()}-{next(_ids)}"
        self.pending, self._sent = 0, time.monotonic()
        _send(("open", self.id, description, total, unit, transient, plain))

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self.pending += n
        if time.monotonic() - self._sent >= FORWARD_INTERVAL:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            _send(("advance", self.id, self.pending))
            self.pending, self._sent = 0, time.monotonic()

    def set_total(self, total: int | None) -> None:
        self.total = total
        _send(("total", self.id, total))

    def _end(self) -> None:
        self._flush()
        _send(("close", self.id))


def _send(event: tuple) -> None:
    try:
        if _sink is not None:
            _sink(("progress", *event))
    except Exception:  # noqa: BLE001 - a lost progress event must never fail the work it reports on
        pass


def _console():
    """Prefect's console when one of its handlers is installed (its log lines then print above the
    bars), else a console on standard error."""
    from rich.console import Console

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            console = getattr(handler, "console", None)
            if type(handler).__name__ == "PrefectConsoleHandler" and console is not None:
                return console
    return Console(stderr=True)


def start(description: str, total: int | None = None, *, unit: str = "items", transient: bool = False,
          plain: bool = True) -> Bar:
    """A bar for work that does not fit a ``with`` block (callbacks); call its ``finish()``."""
    global _display, _open
    if _sink is not None:
        return _ForwardedBar(description, total, unit, transient, plain)
    chosen = mode()
    if chosen != "bars":
        return Bar(description, total, unit, plain=plain and chosen == "plain")
    from rich import progress as rp

    with _lock:
        if _display is None:
            try:
                _display = _start_display(rp)
            except Exception as exc:  # noqa: BLE001 - no bars is no reason to fail the work
                log.warning("progress bars not drawn (%s: %s); plain lines instead", type(exc).__name__, exc)
                return Bar(description, total, unit, plain=plain)
        _open += 1
        return _DrawnBar(description, total, unit, transient)


def _start_display(rp):
    from rich.default_styles import DEFAULT_STYLES
    from rich.theme import Theme

    console = _console()
    # Prefect's console has a theme of its own without the bars' styles: lend it rich's, for them only.
    console.push_theme(Theme({k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))}))
    display = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                          rp.TextColumn("{task.fields[unit]}"), rp.TimeElapsedColumn(), rp.TimeRemainingColumn(),
                          console=console, transient=False)
    try:
        display.start()
    except BaseException:
        console.pop_theme()
        raise
    return display


def _close_bar(bar: Bar) -> None:
    global _display, _open
    with _lock:
        if bar.finished:
            return
        bar.finished = True
        try:
            bar._end()
        except Exception as exc:  # noqa: BLE001 - a drawing fault must not keep the display alive
            log.debug("progress bar not ended cleanly: %s", exc)
        finally:
            if isinstance(bar, _DrawnBar):
                _open -= 1
                if _open == 0 and _display is not None:
                    try:
                        _display.stop()
                    finally:
                        _display.console.pop_theme()
                        _display = None


@contextmanager
def bar(description: str, total: int | None = None, *, unit: str = "items", transient: bool = False,
        plain: bool = True) -> Iterator[Bar]:
    """A progress bar for the work inside the block. ``total`` None: a count without an end.
    ``transient``: the bar disappears when done (a shard, an epoch). ``plain`` False: no log lines
    outside a terminal (for work that logs its own steps, like training epochs)."""
    opened = start(description, total, unit=unit, transient=transient, plain=plain)
    try:
        yield opened
    finally:
        _close_bar(opened)


def replay(event: tuple) -> bool:
    """Draw an event a forwarding process sent (see :func:`forward_to`); False when ``event`` is
    not a progress event. A fault drawing it is logged, never raised: the work goes on."""
    if not (isinstance(event, tuple) and event and event[0] == "progress"):
        return False
    try:
        _replay(*event[1:])
    except Exception as exc:  # noqa: BLE001
        log.debug("progress event %r not drawn: %s", event, exc)
    return True


def _replay(kind: str, bar_id: str, *rest: Any) -> None:
    if kind == "open":
        description, total, unit, transient, plain = rest
        _replayed[bar_id] = start(description, total, unit=unit, transient=transient, plain=plain)
    elif bar_id in _replayed:
        if kind == "advance":
            _replayed[bar_id].advance(rest[0])
        elif kind == "total":
            _replayed[bar_id].set_total(rest[0])
        elif kind == "close":
            _replayed.pop(bar_id).finish()


def close_replayed() -> None:
    """Close the bars of a forwarding process that ended without closing them (it was killed)."""
    for bar_id in list(_replayed):
        _replayed.pop(bar_id).finish()
