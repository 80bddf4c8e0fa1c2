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


def _card(accuracy: float, weights_init: str, finalize: dict | None = None) -> dict:
    split = {"accuracy": accuracy, "loss": 0.5}
    return {"metrics": {"accuracy": accuracy, "accuracy_ci95_wilson": [accuracy - 0.05, accuracy + 0.03], "n": 80,
                        "splits": {"train": split, "val": split, "test": split}},
            "weights_init": weights_init, "training": {"finalize": finalize}}


def test_demo_summary_says_why_a_model_misses_the_demo_target():
    from flows.cli import DEMO_TARGET, summary_rows

    random_init = "RANDOM INITIALISATION instead of the documented pretrained weights (imagenet): ..."
    below = summary_rows("chest-resnet50", _card(0.25, random_init))
    assert below[0].startswith("chest-resnet50") and "0.250/0.500" in below[0] and "(n=80)" in below[0]
    assert random_init in below[1] and "as expected without the pretrained weights" in below[2]
    from_scratch = summary_rows("chest-cnn", _card(DEMO_TARGET - 0.07, "random initialisation (trained from scratch)"))
    assert len(from_scratch) == 2 and "BELOW the 0.95 demo target" in from_scratch[1]
    # At or above the target nothing is explained; an ensemble's choice is always shown.
    passed = summary_rows("chest-ensemble", _card(DEMO_TARGET, "from chest-cnn", {"summary": "chose plain_average"}))
    assert len(passed) == 2 and passed[1].endswith("^ chose plain_average")
    assert len(summary_rows("lc25000-cnn", _card(0.99, "random initialisation (trained from scratch)"))) == 1


def test_the_demo_reports_its_peak_memory_as_getrusage_measures_it():
    import resource

    from flows.cli import peak_memory_line

    line = peak_memory_line()
    own = float(line.split(" GiB")[0])
    assert own == round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1) and own > 0
    assert "largest child process" in line
