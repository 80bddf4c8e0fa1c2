"""`prefect deploy --all` against a real, throw-away Prefect server.

The server runs as a subprocess with its own PREFECT_HOME and SQLite file; every Prefect
command runs as a subprocess with an explicit environment (all inherited PREFECT_* variables
removed), so this module neither uses nor disturbs the session-wide test harness of conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
POOLS = {"train-models": "lung-factory-training", "nightly-scoring": "lung-factory-scoring"}
SERVER_START_TIMEOUT = 90  # seconds; a cold start on a slow 2-core machine takes about 10 s
CLI_TIMEOUT = 180  # seconds per Prefect CLI call (deploy loads both flow entrypoints)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _isolated_env(home: Path, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop("LUNG_FACTORY_DIR", None)  # pull-step variable: must not be needed at deploy time
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_CLI_PROMPT": "false",
    })
    return env


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the server runs in its own session: reach its children too
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=20)
    _signal_group(proc, signal.SIGKILL)  # anything of the group that outlived its leader


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _prefect(env: dict[str, str], *args: str) -> str:
    """Run ``python -m prefect ARGS`` with the test's interpreter from the repository root."""
    result = subprocess.run([sys.executable, "-m", "prefect", *args], check=False, cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, (
        f"prefect {' '.join(args)} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A running `prefect server start`; yields the environment for CLI calls against it."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _isolated_env(home, api_url)
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(api_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {proc.returncode}" if proc.poll() is not None
                       else f"not healthy after {SERVER_START_TIMEOUT} s")
                pytest.fail(f"prefect server {why}; its log:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.5)
        yield env
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def deployments(prefect_env) -> dict[str, dict]:
    """Create the work pool, run `prefect deploy --all`, return both deployments as JSON."""
    for pool in POOLS.values():
        _prefect(prefect_env, "work-pool", "create", pool, "--type", "process")
    _prefect(prefect_env, "--no-prompt", "deploy", "--all")
    return {name: json.loads(_prefect(prefect_env, "deployment", "inspect", name, "--output", "json"))
            for name in ("train-models/train-models", "score-folder/nightly-scoring")}


@pytest.fixture(scope="module")
def yaml_specs() -> dict[str, dict]:
    config = yaml.safe_load(PREFECT_YAML.read_text())
    return {spec["name"]: spec for spec in config["deployments"]}


def test_prefect_yaml_declares_both_deployments(yaml_specs):
    assert set(yaml_specs) == {"train-models", "nightly-scoring"}
    for spec in yaml_specs.values():
        assert spec["work_pool"]["name"] == POOLS[spec["name"]]
        path, _, func = spec["entrypoint"].partition(":")
        assert (REPO_ROOT / path).is_file() and f"def {func}(" in (REPO_ROOT / path).read_text()


def test_train_models_is_manual(deployments, yaml_specs):
    dep = deployments["train-models/train-models"]
    assert dep["entrypoint"] == "flows/train.py:train_models"
    assert dep["work_pool_name"] == POOLS["train-models"]
    assert dep["schedules"] == []
    assert dep["parameters"] == yaml_specs["train-models"]["parameters"]
    assert dep["parameters"]["models"] is None and dep["parameters"]["profile"] == "demo"
    assert set(dep["parameters"]) <= set(dep["parameter_openapi_schema"]["properties"])


def test_nightly_scoring_schedule_and_concurrency(deployments, yaml_specs):
    dep = deployments["score-folder/nightly-scoring"]
    assert dep["entrypoint"] == "flows/score.py:score_folder"
    assert dep["work_pool_name"] == POOLS["nightly-scoring"]
    assert dep["paused"] is False
    [schedule] = dep["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert dep["parameters"] == yaml_specs["nightly-scoring"]["parameters"]
    assert dep["parameters"]["input_dir"] == "/data/incoming"
    assert set(dep["parameters"]) <= set(dep["parameter_openapi_schema"]["properties"])
    # Prefect 3.8 keeps a deployment's concurrency limit in a global concurrency limit
    # ("deployment:<id>"); the response's own `concurrency_limit` field stays null.
    assert dep["global_concurrency_limit"]["limit"] == 1
    assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"


def test_pull_step_is_resolved_on_the_worker(deployments):
    # The `{{ $LUNG_FACTORY_DIR }}` placeholder is stored as written (the variable was unset at
    # deploy time) and read from the worker's environment when a run starts.
    for dep in deployments.values():
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": "{{ $LUNG_FACTORY_DIR }}"}}]
