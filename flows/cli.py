"""Command line: ``lung-factory train|score|demo|models`` (also ``python -m flows.cli``)."""

from __future__ import annotations

import csv
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


def _check_exported(names: list[str] | None, exports_dir: str, include_unpromoted: bool) -> None:
    """Refuse, before any flow starts, model names with no bundle to score. Scoring hosts have no
    TensorFlow, so this reads the exports folder, not the registry."""
    from lung_models.bundle import LATEST, newest_version

    root = Path(exports_dir)
    exported = [name for name in _exported_models(exports_dir) if newest_version(root, name)]
    unknown = [name for name in names or [] if name not in exported]
    if unknown:
        raise typer.BadParameter(f"no exported bundle of {', '.join(unknown)} in {root.resolve()} (it has: "
                                 f"{', '.join(exported) or 'none'}); train it first or pass --exports-dir",
                                 param_hint="--models")
    unpromoted = [name for name in names or [] if not (root / name / LATEST).is_file()]
    if unpromoted and not include_unpromoted:
        raise typer.BadParameter(f"{', '.join(unpromoted)}: no promoted version (lung-factory bundles list); "
                                 "promote one or pass --include-unpromoted", param_hint="--models")


def _require_onnxruntime(hint: str) -> None:
    from lung_models.device import RuntimeMissing, import_onnxruntime

    try:
        import_onnxruntime()
    except RuntimeMissing as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from None


SOURCES = ("generated", "kaggle", "url", "local")  # data.sources.SOURCE_KINDS (checked in a test), without importing it
PROFILES = ("demo", "full", "tuned")


def _check_training_arguments(models: list[str] | None, profile: str | None, source: str, data_dir: str | None,
                              weights: str | None) -> str:
    """Refuse bad training arguments in one line before any flow, download or server starts; returns
    the profile (a real data set is never trained with the demo profile unless asked for)."""
    _require_onnxruntime("train")  # the export's parity check runs the graph: fail now, not after hours of training
    if source not in SOURCES:
        raise typer.BadParameter(f"{source!r} is not a source; use one of {', '.join(SOURCES)}", param_hint="--source")
    if profile is None:
        profile = "demo" if source == "generated" else "full"
        typer.echo(f"profile: {profile} (the default for --source {source}; --profile sets another)", err=True)
    if profile not in PROFILES:
        raise typer.BadParameter(f"{profile!r} is not a profile; use one of {', '.join(PROFILES)}",
                                 param_hint="--profile")
    if source == "local":
        if not data_dir:
            raise typer.BadParameter("--source local needs --data-dir, the folder holding the data set",
                                     param_hint="--data-dir")
        if not Path(data_dir).is_dir():
            raise typer.BadParameter(f"{data_dir}: no such folder", param_hint="--data-dir")
    elif data_dir:
        raise typer.BadParameter(f"--data-dir is only read with --source local, not {source}", param_hint="--data-dir")
    if weights and weights not in ("pretrained", "random") and not Path(weights).exists():
        raise typer.BadParameter(f"{weights}: no such weights file or module folder (or use pretrained, random)",
                                 param_hint="--weights")
    _check_models(models)
    return profile


@app.command()
def models() -> None:
    """List the registered models."""
    from lung_models import registry

    rows = [("model", "input", "classes", "documented by")]
    for name in registry.names():
        spec = registry.get(name).spec
        rows.append((name, spec.modality, ", ".join(spec.class_names), spec.documented_by))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


@app.command()
def train(
    models: list[str] | None = typer.Option(None, "--models", "-m", help="model names (default: all)"),
    profile: str | None = typer.Option(None, help="full = documented recipe, tuned = the documented network "
                                                     "trained for small real data sets, demo = small and fast "
                                                     "(default: demo for --source generated, else full)"),
    source: str = typer.Option("generated", help=" | ".join(SOURCES)),
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
    profile = _check_training_arguments(models, profile, source, data_dir, weights)
    from flows.train import train_models

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
          include_unpromoted: bool = typer.Option(False, help="score each model's newest export even where it "
                                                  "did not pass its promotion gate (rows say promoted=no)"),
          explain: bool = typer.Option(False, help="a heat map (Grad-CAM; SmoothGrad for a TF-Hub model) of every "
                                       "flagged scan, under OUTPUT_DIR/heatmaps (needs the train extra: the "
                                       "bundles' Keras models)"),
          no_prefect: bool = typer.Option(False, "--no-prefect", help="score in this process without Prefect: "
                                          "no temporary server to start, no run in the UI (one host, no Dask)"),
          ) -> None:
    """Run the score flow on a folder: score what is new, print this run's CSV path."""
    from flows.score import score_folder
    from lung_models.scoring.database import is_postgres_url

    if not Path(input_dir).is_dir():
        raise typer.BadParameter(f"{input_dir}: no such folder (check the path or the mount)", param_hint="INPUT_DIR")
    _check_exported(models, exports_dir, include_unpromoted)
    if precision not in ("fp32", "int8", "auto"):
        raise typer.BadParameter("use fp32, int8 or auto", param_hint="--precision")
    if ledger and ledger != "sqlite" and not is_postgres_url(ledger):
        raise typer.BadParameter("use sqlite or a postgresql://user@host:port/database URL", param_hint="--ledger")
    if explain:
        from lung_models.explain import ExplainUnavailable, require_tensorflow

        try:
            require_tensorflow()
        except ExplainUnavailable as exc:
            raise typer.BadParameter(str(exc), param_hint="--explain") from None
    if no_prefect:
        if workers > 1 or dask_address:
            raise typer.BadParameter("--workers > 1 and --dask-address run shards on Dask through the flow; "
                                     "leave out --no-prefect", param_hint="--no-prefect")
        from lung_models.scoring.night import run_night

        _require_onnxruntime("--no-prefect")
        typer.echo(run_night(input_dir, output_dir, exports_dir, models, batch_size=batch_size, workers=decode_threads,
                             precision=precision, settle_seconds=settle_seconds, ledger=ledger,
                             lock_timeout_seconds=lock_timeout_seconds, include_unpromoted=include_unpromoted,
                             page=True, explain=explain, progress=lambda m: typer.echo(m, err=True)))
        return
    typer.echo(score_folder(input_dir=input_dir, output_dir=output_dir, models=models, exports_dir=exports_dir,
                            batch_size=batch_size, settle_seconds=settle_seconds,
                            lock_timeout_seconds=lock_timeout_seconds, workers=workers, dask_address=dask_address,
                            ledger=ledger, decode_threads=decode_threads, precision=precision,
                            include_unpromoted=include_unpromoted, explain=explain))


bundles_app = typer.Typer(no_args_is_help=True, help="List, promote, roll back and prune exported model versions "
                          "(LATEST: the version the nightly deployment scores).")
app.add_typer(bundles_app, name="bundles")


def _promotion_call(fn, *args, **kwargs):
    """Run a promotion command; its refusals are one line on stderr and exit code 1, not a traceback."""
    from lung_models.promotion import PromotionError

    try:
        return fn(*args, **kwargs)
    except PromotionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _exported_models(exports_dir: str) -> list[str]:
    root = Path(exports_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@bundles_app.command("list")
def bundles_list(models: list[str] | None = typer.Argument(None, help="model names (default: every exported model)"),
                 exports_dir: str = typer.Option("exports")) -> None:
    """Every exported version: promoted (*), its gate, test accuracy and the 95% lower bound."""
    from lung_models import promotion

    names = models or _exported_models(exports_dir)
    if not names:
        typer.echo(f"no exported models in {Path(exports_dir).resolve()}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{'model':26s} {'version':18s} {'':1s} {'gate':12s} {'accuracy':>8s} {'95% low':>7s} {'n':>5s}  reason")
    for name in names:
        rows = promotion.listing(exports_dir, name)
        if not rows:
            typer.echo(f"{name:26s} (no exported version)")
        for r in rows:
            acc = "" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
            low = "" if r.get("ci95_low") is None else f"{r['ci95_low']:.3f}"
            typer.echo(f"{name:26s} {r['version']:18s} {'*' if r['promoted'] else ' '} {r['gate']:12s} {acc:>8s} "
                       f"{low:>7s} {str(r.get('n') or ''):>5s}  {r.get('reason', '')}")


@bundles_app.command("promote")
def bundles_promote(model: str, version: str, exports_dir: str = typer.Option("exports"),
                    force: bool = typer.Option(False, help="promote a version that failed its gate (needs --reason)"),
                    reason: str = typer.Option("", help="why; kept in exports/MODEL/promotions.jsonl")) -> None:
    """Make VERSION the one the nightly deployment scores."""
    from lung_models import promotion

    entry = _promotion_call(promotion.promote, exports_dir, model, version, force=force, reason=reason)
    typer.echo(f"{model}: LATEST {entry['previous'] or '(none)'} -> {entry['version']}")


@bundles_app.command("rollback")
def bundles_rollback(model: str, exports_dir: str = typer.Option("exports"),
                     reason: str = typer.Option("", help="why; kept in exports/MODEL/promotions.jsonl")) -> None:
    """Point LATEST back at the version promoted before the current one."""
    from lung_models import promotion

    entry = _promotion_call(promotion.rollback, exports_dir, model, reason=reason)
    typer.echo(f"{model}: LATEST {entry['previous']} -> {entry['version']} (rolled back)")


@bundles_app.command("prune")
def bundles_prune(model: str, keep: int = typer.Option(3, min=1, help="keep this many newest versions"),
                  exports_dir: str = typer.Option("exports"),
                  dry_run: bool = typer.Option(False, help="only say what would be removed")) -> None:
    """Remove old versions; never the promoted one nor the one a roll-back returns to."""
    from lung_models import promotion

    removed = _promotion_call(promotion.prune, exports_dir, model, keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{model}: {verb} {len(removed)} version(s){': ' + ', '.join(removed) if removed else ''}")


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
    if card.get("calibration"):
        from lung_models.calibration import summary

        rows.append(f"{'':26s} ^ {summary(card['calibration'])} (reliability.png)")
    int8 = card.get("int8")
    if int8:
        rows.append(f"{'':26s} ^ int8 variant {'usable' if int8['usable'] else 'not used'}: {int8['reason']}")
    verdict = card.get("promotion")
    if verdict:
        rows.append(f"{'':26s} ^ " + ("passed its promotion gate: the nightly deployment scores it" if verdict["passed"]
                                      else f"exported, NOT PROMOTED: {verdict['reason']}"))
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
        # The demo wrote these files a moment ago: no settling time (the nightly default waits 60 s). It
        # scores with every model, the ones that failed their gate too (their rows say promoted=no).
        report = score_folder(input_dir=str(incoming), output_dir=str(Path(work_dir) / "reports"),
                              exports_dir=exports_dir, settle_seconds=0, include_unpromoted=True, explain=True)
    typer.echo("\n=== demo summary (generated data, demo profile) ===")
    typer.echo(f"{'model':26s} {'train acc/loss':>15s} {'val acc/loss':>15s} {'test acc/loss':>15s}  test 95% CI")
    cards = {name: load_bundle(path).card for name, path in bundles.items()}
    for name, card in cards.items():
        for line in summary_rows(name, card):
            typer.echo(line)
    unpromoted = [name for name, card in cards.items() if not (card.get("promotion") or {}).get("passed")]
    if unpromoted:
        typer.echo(f"not promoted (scored here all the same, rows marked promoted=no; the nightly deployment "
                   f"skips them): {', '.join(unpromoted)}")
    typer.echo(f"devices: training on {sorted({card['training']['device'] for card in cards.values()})}")
    typer.echo(f"bundles: {Path(exports_dir).resolve()}")
    typer.echo(f"incoming files: {incoming}")
    typer.echo(f"scores CSV:     {report}")
    typer.echo(f"cumulative CSV: {Path(report).with_name('scores-cumulative.csv')}")
    from lung_models.scoring.html_report import page_name

    page = Path(report).with_name(page_name(report))
    typer.echo(f"night page:     {page if page.is_file() else '(not written: see the log)'}")
    from lung_models.explain import HEATMAP_DIR

    with open(report, newline="") as handle:
        count = sum(1 for row in csv.DictReader(handle) if row.get("heatmap"))
    typer.echo(f"heat maps:      {count} heat maps of tonight's flagged scans under "
               f"{Path(report).parent / HEATMAP_DIR}")
    drift_file = Path(report).parent / "drift.json"
    if drift_file.is_file():
        verdicts = json.loads(drift_file.read_text())["models"]
        typer.echo(f"drift:          {drift_file}: " + ", ".join(f"{m} {v['status']}" for m, v in verdicts.items()))
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
