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
