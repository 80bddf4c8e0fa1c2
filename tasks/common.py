from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import queue as queue_module
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

# In a model process (see model_process): where its progress lines go, for the flow to log them.
_PROGRESS: Any = None
# In the flow: the process that runs the current model's TensorFlow work, and its progress queue.
_WORKER: tuple[ProcessPoolExecutor, Any, str] | None = None


# How long a task may run before Prefect fails it (a hung download, file system or model process
# must not hold a run, and the nightly deployment's queue behind it, forever). Generous on purpose:
# the documented recipes train for hours on a CPU.
TIMEOUTS = {"fetch": 6 * 3600, "preprocess": 6 * 3600, "train": 48 * 3600, "evaluate": 2 * 3600,
            "export": 4 * 3600, "cross_validate": 7 * 24 * 3600, "find": 2 * 3600, "pin": 600,
            "shard": 2 * 3600, "publish": 8 * 3600}

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ECONNABORTED}


def is_transient(exc: BaseException | None) -> bool:
    """Whether an error (or what caused it) is a network or I/O fault that may pass: worth a retry.
    A bad argument, a checksum mismatch, a missing file or a bug is not, and fails at once."""
    import psycopg
    import requests
    from prefect.task_engine import TaskRunTimeoutError

    from lung_models.data.sources.download import TransientDownloadError
    from lung_models.scoring.lock import ScoringLockTimeout

    transient = (TimeoutError, ConnectionError, requests.ConnectionError, requests.Timeout,
                 requests.exceptions.ChunkedEncodingError, psycopg.OperationalError,
                 TransientDownloadError)  # the downloader's own: HTTP 5xx or 429, a dropped resume
    # A task that ran out of its own time, or waited its whole lock timeout for another run, would only
    # do it again: never retried.
    final = (TaskRunTimeoutError, ScoringLockTimeout)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, final):
            return False
        if isinstance(exc, transient) or (isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only what :func:`is_transient` calls transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the task's own failure, judged here
        transient = is_transient(exc)
        run_logger().warning("%s failed (%s: %s); %s", task_run.name, type(exc).__name__, exc,
                             "transient: retrying" if transient else "not transient: no retry")
        return transient
    return False


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task, the module logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("lung_factory")


def say(message: str) -> None:
    """Progress lines: to the Prefect run log (which the UI shows) and to the console. In a model
    process they travel to the task that waits for it, which logs them under its own run."""
    if _PROGRESS is not None:
        _PROGRESS.put(message)
        return
    run_logger().info(message)


def _start_model_process(progress) -> None:
    from lung_models import progress as bars

    global _PROGRESS
    _PROGRESS = progress
    bars.forward_to(progress.put)  # the parent draws this process's progress bars
    parent = os.getppid()

    def exit_with_parent() -> None:
        # A flow process killed outright cannot stop its model process; without this it would
        # train on, then hold TensorFlow's memory waiting for work that never comes.
        while os.getppid() == parent:
            time.sleep(5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


@contextmanager
def model_process(model_name: str) -> Iterator[None]:
    """Run the TensorFlow work of one model (training, evaluation, export) in a process of its own.

    TensorFlow keeps most of what a model's graphs, traced functions and conversion took until the
    process ends (``clear_session`` gives back only part of it), so one flow training eight models
    in one process grew by gigabytes; a process per model gives all of it back before the next
    starts. Spawned, not forked: the flow's process holds Prefect's threads. Tasks called outside
    this context (tests, a single task run) run in their caller's process as before.
    """
    global _WORKER
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    pool = ProcessPoolExecutor(1, mp_context=context, initializer=_start_model_process, initargs=(progress,))
    _WORKER = (pool, progress, model_name)
    try:
        yield
    except BaseException:
        # Cancelled, interrupted or failed: stop the model's work now rather than wait for it
        # (shutdown does not cancel a running call; ProcessPoolExecutor has no public way to
        # stop its workers before Python 3.14's terminate_workers).
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        raise
    finally:
        _WORKER = None
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()


def in_model_process(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the current model's process (in this one outside ``model_process``); its
    progress lines are logged here, as they arrive."""
    from lung_models import progress as bars

    if _WORKER is None:
        return fn(*args)
    pool, progress, model_name = _WORKER
    future = pool.submit(fn, *args)

    def drain(wait: float) -> None:
        while True:
            try:
                message = progress.get(timeout=wait)
            except queue_module.Empty:
                return
            if not bars.replay(message):
                say(message)

    try:
        while not future.done():
            drain(0.2)
        drain(0.2)  # lines still in the queue's pipe when the result arrived
    finally:
        bars.close_replayed()  # bars of a process that died before closing them
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(f"{model_name}: the process running its training/export ended abruptly (killed, "
                           "most often by the kernel when memory ran out: see `dmesg`; or its result could "
                           "not be passed back). Nothing it wrote to the exports folder is published before "
                           "its bundle is complete.") from exc


def forward_library_logs(names: tuple[str, ...] = ("lung_models",)) -> None:
    """Send the library's own log records (a broken bundle skipped, a report recovered, a download
    retried) to the Prefect run they happen in, so the UI shows them beside the task's lines.
    Outside a flow or task run they go nowhere new. Like PREFECT_LOGGING_EXTRA_LOGGERS, but set in
    code: that setting is read when Prefect configures logging, which in a worker's flow-run process
    happens before the project is imported."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogForwarder(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
                super().emit(record)

    for name in names:
        logger = logging.getLogger(name)
        if not any(type(h).__name__ == "RunLogForwarder" for h in logger.handlers):
            logger.addHandler(RunLogForwarder())
        if logger.level == logging.NOTSET:  # the root's WARNING would drop the INFO lines
            logger.setLevel(logging.INFO)


forward_library_logs()
