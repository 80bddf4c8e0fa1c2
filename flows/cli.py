"""Command line: ``lung-factory train|score|demo|models`` (also ``python -m flows.cli``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Quiet, offline-friendly defaults; explicit settings in the environment win.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

import typer

from lung_models.scoring.items import DEFAULT_SETTLE_SECONDS
from lung_models.scoring.lock import DEFAULT_LOCK_TIMEOUT

# A model trained from scratch in the demo has shown that it learns when the lower end of the 95%
# Wilson interval of its test accuracy is at least this (chance is 0.25-0.5 for these tasks).
DEMO_LEARNED_BOUND = 0.75

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train, export and serve the documented lung-imaging models.")


def _check_models(names: list[str] | None) -> None:
    """Refuse unknown model names before any flow starts."""
    from lung_models import registry

    for name in names or []:
        try:
            registry.get(name)
        except KeyError as exc:
            raise typer.BadParameter(str(exc.args[0]), param_hint="--models") from None


@app.command()
def models() -> None:
    """List the registered models."""
    from lung_models import registry

    for name in registry.names():
        spec = registry.get(name).spec
        typer.echo(f"{name:28s} {spec.modality:15s} {'/'.join(spec.class_names):40s} {spec.documented_by}")


@app.command()
def train(
    models: list[str] | None = typer.Option(None, "--models", "-m", help="model names (default: all)"),
    profile: str = typer.Option("demo", help="full = documented recipe, tuned = the documented network "
                                              "trained for small real data sets, demo = small and fast"),
    source: str = typer.Option("generated", help="generated | kaggle | url | local"),
    data_dir: str | None = typer.Option(None, help="data set folder, for --source local"),
    exports_dir: str = typer.Option("exports"),
    work_dir: str = typer.Option("work", help="downloads, caches and training runs"),
    epochs: int | None = typer.Option(None), batch_size: int | None = typer.Option(None),
    max_per_class: int | None = typer.Option(None, help="use at most this many files per class"),
    weights: str | None = typer.Option(None, help="pretrained | random | path to a weights file or TF-Hub "
                                                  "module folder (default: the profile's)"),
    folds: int | None = typer.Option(None, help="first cross-validate each model's recipe k-fold on the pooled "
                                                "train and validation splits (figures in the model card)"),
) -> None:
    """Run the train flow: fetch, preprocess, train, evaluate and export each model."""
    from flows.train import train_models

    _check_models(models)
    bundles = train_models(models=models, profile=profile, source=source, data_dir=data_dir,
                           exports_dir=exports_dir, work_dir=work_dir, epochs=epochs,
                           batch_size=batch_size, max_per_class=max_per_class, weights=weights, folds=folds)
    typer.echo(json.dumps(bundles, indent=2))


@app.command()
def score(input_dir: str, output_dir: str,
          models: list[str] | None = typer.Option(None, "--models", "-m"),
          exports_dir: str = typer.Option("exports"), batch_size: int = typer.Option(8),
          settle_seconds: float = typer.Option(DEFAULT_SETTLE_SECONDS, help="leave files modified less than this "
                                               "long ago (still arriving) for a later run"),
          lock_timeout_seconds: float = typer.Option(DEFAULT_LOCK_TIMEOUT, help="wait this long for another run "
                                                     "on the same output folder to finish"),
          workers: int = typer.Option(1, min=1, help="score on a local Dask cluster of this many worker "
                                      "processes (1: in this process, no Dask)"),
          dask_address: str | None = typer.Option(None, help="score on an existing Dask cluster, "
                                                  "tcp://HOST:PORT of its scheduler (see README: a cluster)"),
          ledger: str | None = typer.Option(None, help="the ledger: the SQLite file in OUTPUT_DIR (default, one "
                                            "host) or postgresql://USER@HOST:PORT/DB, shared by runs and hosts"),
          decode_threads: int | None = typer.Option(None, min=1, help="decoding threads per worker feeding "
                                                    "inference (default: half its cores)"),
          precision: str = typer.Option("fp32", help="fp32 | int8 | auto (int8 where its export gate passed)"),
          ) -> None:
    """Run the score flow on a folder: score what is new, print this run's CSV path."""
    from flows.score import score_folder
    from lung_models.scoring.database import is_postgres_url

    _check_models(models)
    if precision not in ("fp32", "int8", "auto"):
        raise typer.BadParameter("use fp32, int8 or auto", param_hint="--precision")
    if ledger and ledger != "sqlite" and not is_postgres_url(ledger):
        raise typer.BadParameter("use sqlite or a postgresql://user@host:port/database URL", param_hint="--ledger")
    typer.echo(score_folder(input_dir=input_dir, output_dir=output_dir, models=models, exports_dir=exports_dir,
                            batch_size=batch_size, settle_seconds=settle_seconds,
                            lock_timeout_seconds=lock_timeout_seconds, workers=workers, dask_address=dask_address,
                            ledger=ledger, decode_threads=decode_threads, precision=precision))


def summary_rows(name: str, card: dict) -> list[str]:
    """The demo summary's lines for one bundle: its metrics row, then whether it was a smoke run (a
    pretrained backbone that cannot be had offline) or a from-scratch model that did or did not show
    it learns, and any ensemble choice and int8 verdict."""
    m = card["metrics"]
    lo, hi = m["accuracy_ci95_wilson"]
    cells = [f"{m['splits'][s]['accuracy']:.3f}/{m['splits'][s]['loss']:.3f}" for s in ("train", "val", "test")]
    rows = [f"{name:26s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s}  {lo:.3f}-{hi:.3f} (n={m['n']})"]
    recipe = card["training"].get("recipe") or {}
    if recipe.get("smoke_run"):
        rows.append(f"{'':26s} ^ SMOKE RUN: {card['weights_init']}; {recipe.get('epochs')} epoch(s) on a few "
                    "images prove the chain (data, training, ONNX, scoring), not the model")
    elif lo >= DEMO_LEARNED_BOUND:
        rows.append(f"{'':26s} ^ learned: test accuracy's 95% lower bound {lo:.3f} >= {DEMO_LEARNED_BOUND:.2f}")
    else:
        rows.append(f"{'':26s} ^ DID NOT SHOW LEARNING: test accuracy's 95% lower bound {lo:.3f} < "
                    f"{DEMO_LEARNED_BOUND:.2f} (n={m['n']})")
    if recipe.get("input_shape"):
        shape = (card.get("input") or {}).get("shape", [None, *recipe["input_shape"]])[1:]  # what it ran at
        rows.append(f"{'':26s} ^ trained at {'x'.join(str(v) for v in shape)} input (demo profile; the full "
                    "profile trains at the documented size)")
    choice = (card["training"].get("finalize") or {}).get("summary")
    if choice:
        rows.append(f"{'':26s} ^ {choice}")
    int8 = card.get("int8")
    if int8:
        rows.append(f"{'':26s} ^ int8 variant {'usable' if int8['usable'] else 'not used'}: {int8['reason']}")
    return rows


@app.command()
def demo(work_dir: str = typer.Option("work"), exports_dir: str = typer.Option("exports"),
         models: list[str] | None = typer.Option(None, "--models", "-m")) -> None:
    """The embedded default: train every model on generated data (demo profile), export the
    bundles, make a folder of incoming files (one deliberately corrupt) and score it."""
    from flows.score import score_folder
    from flows.train import train_models
    from lung_models.bundle import load_bundle
    from lung_models.data.phantoms import write_incoming

    _check_models(models)
    started = time.perf_counter()
    with TreeMemory() as memory:
        bundles = train_models(models=models, profile="demo", source="generated", exports_dir=exports_dir,
                               work_dir=work_dir)
        incoming = Path(work_dir) / "incoming"
        write_incoming(incoming, seed=int(time.time()) % 100000, n_slices=4, n_dicom_series=1)
        # The demo wrote these files a moment ago: no settling time (the nightly default waits 60 s).
        report = score_folder(input_dir=str(incoming), output_dir=str(Path(work_dir) / "reports"),
                              exports_dir=exports_dir, settle_seconds=0)
    typer.echo("\n=== demo summary (generated data, demo profile) ===")
    typer.echo(f"{'model':26s} {'train acc/loss':>15s} {'val acc/loss':>15s} {'test acc/loss':>15s}  test 95% CI")
    cards = {name: load_bundle(path).card for name, path in bundles.items()}
    for name, card in cards.items():
        for line in summary_rows(name, card):
            typer.echo(line)
    typer.echo(f"devices: training on {sorted({card['training']['device'] for card in cards.values()})}")
    typer.echo(f"bundles: {Path(exports_dir).resolve()}")
    typer.echo(f"incoming files: {incoming}")
    typer.echo(f"scores CSV:     {report}")
    typer.echo(f"cumulative CSV: {Path(report).with_name('scores-cumulative.csv')}")
    typer.echo(f"wall time:      {time.perf_counter() - started:.0f} s")
    typer.echo(f"peak memory:    {peak_memory_line(memory.peak_gib)}")


def peak_memory_line(tree_peak_gib: float | None = None) -> str:
    """The largest resident set of this process and of its finished child processes (what GNU time's
    maximum resident set reports, less the install), and the sampled peak of the whole process
    tree's proportional set size (each shared page counted once), when it was sampled."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    line = f"{max(own, child):.1f} GiB in the largest process (this one: {own:.1f} GiB)"
    if tree_peak_gib is not None:
        line += f"; {tree_peak_gib:.1f} GiB summed over the process tree at most (PSS, sampled every second)"
    return line


class TreeMemory:
    """Samples the summed proportional set size of this process and all its descendants (the model
    processes, converters, Prefect's server) once a second, in a background thread."""

    def __init__(self, interval: float = 1.0) -> None:
        import threading

        self.interval = interval
        self.peak_gib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def sample(self) -> float:
        import psutil

        root = psutil.Process()
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, AttributeError):
                continue  # ended between listing and reading, or no PSS on this platform
        return total / 2**30

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_gib = max(self.peak_gib, self.sample())

    def __enter__(self) -> TreeMemory:
        self.peak_gib = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


if __name__ == "__main__":
    app()
