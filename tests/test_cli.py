from typer.testing import CliRunner

from flows.cli import app
from lung_models import registry


def test_cli_lists_every_registered_model():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in registry.names():
        assert name in result.output


def test_cli_rejects_an_unknown_model_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["train", "-m", "no-such-model", "--work-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown model" in result.output and "no-such-model" in result.output
