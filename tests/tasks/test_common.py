"""The flow runs each model's TensorFlow work in a process of its own (tasks.common.model_process)."""

from __future__ import annotations

import os

import pytest

from tasks import common


def _report(message: str) -> int:
    common.say(message)
    return os.getpid()


def _die() -> None:
    os._exit(9)


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_a_models_work_runs_in_its_own_process_and_its_progress_is_logged_by_the_caller(monkeypatch):
    log = _Log()
    monkeypatch.setattr(common, "run_logger", lambda: log)  # the task's run logger, in the flow's process
    with common.model_process("some-model"):
        first = common.in_model_process(_report, "epoch 1/2 from the model process")
        second = common.in_model_process(_report, "epoch 2/2")
    assert first == second != os.getpid()  # one process for all of a model's tasks
    assert log.lines == ["epoch 1/2 from the model process", "epoch 2/2"]
    assert common.in_model_process(_report, "outside") == os.getpid()  # no model process: runs here


def test_a_model_process_that_dies_fails_its_task_with_the_model_named():
    with pytest.raises(RuntimeError, match="some-model: the process running its training/export ended abruptly"):
        with common.model_process("some-model"):
            common.in_model_process(_die)


def _sleep_long() -> None:
    import time

    time.sleep(300)


def test_a_failing_flow_stops_its_model_process_instead_of_waiting_for_it():
    import time

    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with common.model_process("some-model"):
            pool = common._WORKER[0]
            pool.submit(_sleep_long)
            time.sleep(1.0)  # the worker has started the long call
            processes = list(pool._processes.values())
            raise KeyboardInterrupt  # what a cancelled or interrupted flow raises in its thread
    assert time.perf_counter() - started < 60
    assert processes and not any(p.is_alive() for p in processes)
