from __future__ import annotations

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
    global _PROGRESS
    _PROGRESS = progress
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
    if _WORKER is None:
        return fn(*args)
    pool, progress, model_name = _WORKER
    future = pool.submit(fn, *args)

    def drain(wait: float) -> None:
        while True:
            try:
                say(progress.get(timeout=wait))
            except queue_module.Empty:
                return

    while not future.done():
        drain(0.5)
    drain(0.2)  # lines still in the queue's pipe when the result arrived
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(f"{model_name}: the process running its training/export ended abruptly (killed, "
                           "most often by the kernel when memory ran out: see `dmesg`; or its result could "
                           "not be passed back). Nothing it wrote to the exports folder is published before "
                           "its bundle is complete.") from exc
