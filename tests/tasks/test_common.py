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


def test_only_network_and_io_faults_count_as_transient():
    import errno

    import psycopg
    import requests

    from lung_models.data.sources.base import DataSourceError
    from tasks.common import is_transient

    def caused_by(cause: BaseException) -> DataSourceError:
        try:
            raise DataSourceError("download failed after 3 attempts") from cause
        except DataSourceError as exc:
            return exc

    assert is_transient(caused_by(requests.ConnectionError("reset")))
    assert is_transient(caused_by(requests.Timeout()))
    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(OSError(errno.ESTALE, "Stale file handle"))
    assert is_transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert not is_transient(DataSourceError("sha256 mismatch"))
    assert not is_transient(ValueError("unknown source 'kagle'"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "No such file"))
    assert not is_transient(PermissionError(errno.EACCES, "Permission denied"))


def test_fetch_data_retries_a_dropped_connection_but_not_a_bad_source(prefect_harness, tmp_path, monkeypatch):
    """Before, any failure of fetch-data waited 30 s and 120 s for two more tries, a typo in --source too."""
    from prefect import flow

    import tasks.data
    from tasks.data import fetch_data

    calls = []

    class Flaky:
        def fetch(self, root, progress):
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("connection reset by peer")
            return root

        def provenance(self):
            return {"kind": "test"}

    @flow
    def fetch(source: str):
        return fetch_data.with_options(retry_delay_seconds=[0, 0])("mosmed-3dcnn", source, "full",
                                                                   str(tmp_path / "work"))

    bad = fetch("kagle", return_state=True)
    assert bad.is_failed() and "no 'kagle' source" in str(bad.result(raise_on_failure=False))
    assert _task_run_counts(bad) == [1]  # tried once
    monkeypatch.setattr(tasks.data, "source_from_config", lambda source, config: Flaky())
    monkeypatch.setattr(tasks.data, "source_config", lambda *args: {})
    good = fetch("url", return_state=True)
    assert good.is_completed() and len(calls) == 2  # retried once after the dropped connection
    assert _task_run_counts(good) == [2]


def _task_run_counts(flow_state) -> list[int]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[flow_state.state_details.flow_run_id])))
    return [run.run_count for run in runs]


def test_a_task_that_timed_out_or_waited_out_a_lock_is_not_retried():
    from prefect.task_engine import TaskRunTimeoutError

    from lung_models.scoring.lock import ScoringLockTimeout
    from tasks.common import is_transient

    assert not is_transient(TaskRunTimeoutError("Task run exceeded timeout of 7200.0 second(s)"))
    assert not is_transient(ScoringLockTimeout("another run has been publishing reports for more than 21600 s"))
    assert is_transient(TimeoutError("read timed out"))
