import re
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


def _card(accuracy: float, lower: float, weights_init: str, finalize: dict | None = None, **recipe) -> dict:
    split = {"accuracy": accuracy, "loss": 0.5}
    return {"metrics": {"accuracy": accuracy, "accuracy_ci95_wilson": [lower, accuracy + 0.03], "n": 80,
                        "splits": {"train": split, "val": split, "test": split}},
            "weights_init": weights_init, "training": {"finalize": finalize, "recipe": {"epochs": 1, **recipe}}}


def test_demo_summary_says_which_models_are_smoke_runs_and_which_learned():
    from flows.cli import DEMO_LEARNED_BOUND, summary_rows

    random_init = "RANDOM INITIALISATION instead of the documented pretrained weights (imagenet): ..."
    smoke = summary_rows("chest-resnet50", _card(0.25, 0.17, random_init, smoke_run=True, input_shape=[96, 96, 3]))
    assert smoke[0].startswith("chest-resnet50") and "0.250/0.500" in smoke[0] and "(n=80)" in smoke[0]
    assert "SMOKE RUN" in smoke[1] and random_init in smoke[1] and "trained at 96x96x3 input" in smoke[2]
    # From scratch, the bar is the lower end of the test accuracy's 95% interval, not the accuracy.
    missed = summary_rows("chest-cnn", _card(0.80, DEMO_LEARNED_BOUND - 0.01, "random initialisation"))
    assert len(missed) == 2 and "DID NOT SHOW LEARNING" in missed[1]
    learned = summary_rows("chest-ensemble", _card(0.80, DEMO_LEARNED_BOUND, "from chest-cnn",
                                                   {"summary": "chose plain_average"}))
    assert "learned" in learned[1] and "SMOKE" not in learned[1] and learned[2].endswith("^ chose plain_average")
    assert len(summary_rows("lc25000-cnn", _card(0.99, 0.95, "random initialisation"))) == 2


def test_the_demo_reports_its_peak_memory_as_getrusage_measures_it():
    import resource

    from flows.cli import peak_memory_line

    line = peak_memory_line()
    largest = float(line.split(" GiB")[0])
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert largest >= round(own, 1) > 0 and "summed" not in line
    assert "7.5 GiB summed over the process tree" in peak_memory_line(7.5)


def _hold(megabytes: int, seconds: float) -> None:
    import time

    block = bytearray(megabytes * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    time.sleep(seconds)


def test_the_tree_sampler_counts_a_child_processs_memory():
    import multiprocessing

    from flows.cli import TreeMemory

    with TreeMemory(interval=0.2) as memory:
        alone = memory.sample()
        child = multiprocessing.get_context("spawn").Process(target=_hold, args=(400, 3.0))
        child.start()
        child.join()
    assert memory.peak_gib >= alone + 0.3  # the child's 400 MiB were seen while it held them


def _said(message: str, output: str) -> bool:
    """Whether Typer's error box says ``message``. The box wraps long messages inside box-drawing
    borders wherever the terminal's width falls, even between a path and the colon after it, so
    both are compared without their whitespace."""
    return "".join(message.split()) in "".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_score_refuses_models_with_nothing_to_score_before_any_flow(tmp_path):
    exports = tmp_path / "exports"
    (exports / "weak" / "20260101T000000Z").mkdir(parents=True)
    (exports / "weak" / "20260101T000000Z" / "model_card.json").write_text("{}")
    out = tmp_path / "out"
    runner = CliRunner()
    unknown = runner.invoke(app, ["score", str(tmp_path), str(out), "-m", "nope", "--exports-dir", str(exports)])
    assert unknown.exit_code == 2 and _said("no exported bundle of nope", unknown.output)
    assert _said("it has: weak", unknown.output)
    weak = runner.invoke(app, ["score", str(tmp_path), str(out), "-m", "weak", "--exports-dir", str(exports)])
    assert weak.exit_code == 2 and _said("weak: no promoted version", weak.output)
    assert _said("--include-unpromoted", weak.output)
    assert not out.exists()  # nothing was started


def test_train_refuses_bad_arguments_in_one_line_before_any_flow(tmp_path):
    runner = CliRunner()
    work = tmp_path / "work"
    cases = [(["--source", "kagle"], "'kagle' is not a source; use one of generated, kaggle, url, local"),
             (["--profile", "ful"], "'ful' is not a profile; use one of demo, full, tuned"),
             (["--source", "local"], "--source local needs --data-dir"),
             (["--source", "local", "--data-dir", str(tmp_path / "nope")], "nope: no such folder"),
             (["--data-dir", str(tmp_path)], "--data-dir is only read with --source local"),
             (["--weights", str(tmp_path / "w.h5")], "w.h5: no such weights file")]
    for args, message in cases:
        result = runner.invoke(app, ["train", "--work-dir", str(work), *args])
        assert result.exit_code == 2 and _said(message, result.output), (args, result.output)
    assert not work.exists()


def test_score_refuses_a_missing_input_folder_before_touching_the_output(tmp_path):
    result = CliRunner().invoke(app, ["score", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 2 and _said("nope: no such folder", result.output)
    assert not (tmp_path / "out").exists()


def test_models_are_listed_in_aligned_columns():
    result = CliRunner().invoke(app, ["models"])
    lines = result.output.splitlines()
    starts = {line.index(registry.get(line.split()[0]).spec.modality) for line in lines[1:]}
    assert len(lines) == len(registry.names()) + 1 and len(starts) == 1


def test_the_cli_offers_the_data_layers_sources():
    from flows.cli import SOURCES
    from lung_models.data.sources import SOURCE_KINDS

    assert set(SOURCES) == set(SOURCE_KINDS)


def _in_a_terminal(cmd: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as its stdout and stderr, as an operator's shell would;
    returns its exit code and everything it wrote there."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(30), b"".join(chunks).decode(errors="replace")


def test_scoring_in_a_terminal_draws_bars_and_in_a_pipe_logs_plain_lines(factory, tmp_path):
    import os

    from lung_models.data import phantoms

    folder = tmp_path / "incoming"
    phantoms.write_incoming(folder, seed=31, n_tiles=3, n_volumes=1, n_slices=3, corrupt=False, tile_size=256,
                            in_plane=64, slices=30)
    env = {k: v for k, v in os.environ.items() if k != "LUNG_FACTORY_PROGRESS"}
    cli = [sys.executable, "-m", "flows.cli", "score", str(folder)]
    options = ["--exports-dir", str(factory["exports"]), "--settle-seconds", "0", "--no-prefect"]
    code, shown = _in_a_terminal([*cli, str(tmp_path / "tty"), *options], env)
    assert code == 0, shown
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)  # the terminal's colour and cursor codes
    assert "finding files in incoming" in shown and re.search(r"scoring shard \S+ .*━", shown), shown
    assert re.search(r"\d+/\d+ scores", shown) and "scores-" in shown  # the counts drawn, then the CSV's path
    piped = subprocess.run([*cli, str(tmp_path / "pipe"), *options], capture_output=True, text=True, env=env,
                           timeout=600)
    assert piped.returncode == 0, piped.stderr
    assert "━" not in piped.stderr + piped.stdout and "\x1b[" not in piped.stdout  # no bars, no escapes in a log
    assert piped.stdout.strip().splitlines()[-1].endswith(".csv")
