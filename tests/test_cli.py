import subprocess
import sys

from typer.testing import CliRunner

from flows.cli import app
from lung_models import registry


def test_cli_lists_every_registered_model():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in registry.names():
        assert name in result.output


def test_cli_rejects_an_unknown_model_before_any_work(tmp_path):
    # A real process (not CliRunner, whose swapped streams outlive Prefect's log handlers).
    result = subprocess.run([sys.executable, "-m", "flows.cli", "train", "-m", "no-such-model", "--work-dir",
                             str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown model" in result.stderr and "no-such-model" in result.stderr
    assert not (tmp_path / "work").exists()  # failed before any flow or download started
