"""Progress: bars in a terminal, occasional lines in a log, events forwarded from a model process."""

from __future__ import annotations

import io
import logging
import multiprocessing
import queue

import pytest
from rich.console import Console

from lung_models import progress


@pytest.fixture
def drawn(monkeypatch):
    """Bars mode, drawn on a terminal-like console whose output the test reads."""
    out = io.StringIO()
    monkeypatch.setenv("LUNG_FACTORY_PROGRESS", "bars")
    monkeypatch.setattr(progress, "_console", lambda: Console(file=out, force_terminal=True, width=120))
    yield out
    assert progress._open == 0 and progress._display is None  # every bar closed, the display stopped


def test_the_mode_follows_the_terminal_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("LUNG_FACTORY_PROGRESS", raising=False)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    assert progress.mode() == "bars"
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe, a worker's log file
    assert progress.mode() == "plain"
    monkeypatch.setenv("LUNG_FACTORY_PROGRESS", "off")
    assert progress.mode() == "off"
    monkeypatch.setenv("LUNG_FACTORY_PROGRESS", "sparkles")  # a typo: warned, then chosen by the terminal
    assert progress.mode() == "plain"


def test_plain_mode_logs_a_line_at_most_every_interval(monkeypatch, caplog):
    monkeypatch.setenv("LUNG_FACTORY_PROGRESS", "plain")
    caplog.set_level(logging.INFO, logger="lung_models.progress")
    with progress.bar("scoring shard a", 10, unit="scores") as bar:
        for _ in range(10):
            bar.advance()
    assert not caplog.records  # well under a minute: no line
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    with progress.bar("scoring shard b", 4, unit="scores") as bar:
        for _ in range(4):
            bar.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[1].startswith("scoring shard b: 2/4 scores (50%)")
    caplog.clear()
    with progress.bar("epoch 1", 4, plain=False) as bar:  # work that logs its own lines
        bar.advance(4)
    assert not caplog.records


def test_bars_are_drawn_on_a_terminal_and_transient_ones_go(drawn):
    with progress.bar("finding files in incoming", unit="files") as files:
        files.advance(7)
    with progress.bar("scoring shard x", 5, unit="scores", transient=True) as shard:
        shard.advance(5)
    text = drawn.getvalue()
    assert "finding files in incoming" in text and "7/7" in text and "files" in text
    assert "━" in text  # a drawn bar, not a log line


def test_a_bar_finished_twice_counts_once(drawn):
    bar = progress.start("epochs", 3, unit="epochs")
    bar.advance(3)
    bar.finish()
    bar.finish()


def test_bars_share_prefects_console_so_log_lines_print_above_them(monkeypatch):
    from prefect.logging.handlers import PrefectConsoleHandler

    handler = PrefectConsoleHandler(stream=io.StringIO())
    logging.getLogger("prefect").addHandler(handler)
    try:
        installed = [h.console for name in (None, "prefect") for h in logging.getLogger(name).handlers
                     if isinstance(h, PrefectConsoleHandler)]
        assert progress._console() is installed[0]  # the root's when Prefect configured it, else ours
    finally:
        logging.getLogger("prefect").removeHandler(handler)


def _child_work(events, die: bool) -> None:
    import os

    progress.forward_to(events.put)
    bar = progress.start("mosmed epoch 1", 6, unit="batches")
    for _ in range(6):
        bar.advance()
    if die:
        events.put("epoch line")
        events.close()
        events.join_thread()  # what it sent is in the pipe
        os._exit(1)  # then it dies before finishing its bar
    bar.finish()
    events.put("epoch line")


@pytest.mark.parametrize("die", [False, True])
def test_a_model_process_bars_are_drawn_by_its_parent(drawn, die):
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    child = context.Process(target=_child_work, args=(events, die))
    child.start()
    child.join(60)
    lines = []
    while True:
        try:
            event = events.get(timeout=2)
        except queue.Empty:
            break
        if not progress.replay(event):
            lines.append(event)
    progress.close_replayed()  # what in_model_process does when the process ended
    assert lines == ["epoch line"]
    assert "mosmed epoch 1" in drawn.getvalue()
    # Advances are sent at most every FORWARD_INTERVAL and when a bar finishes: a process that died
    # lost its last ones, and its bar is closed all the same (the fixture checks).
    assert ("6/6" in drawn.getvalue()) == (not die)
