"""Nightly scoring tasks: find and hash the incoming files, score them per model, write the CSV."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from lung_models import scoring
from lung_models.bundle import latest_bundles
from tasks.common import run_logger, say


@task(name="find-incoming-files")
def find_incoming(input_dir: str) -> dict[str, Any]:
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found; check the deployment's input_dir parameter")
    files = scoring.discover(root)
    say(f"found {len(files)} image/volume files under {root}; hashing them")
    return {"files": [f.relative_to(root).as_posix() for f in files],
            "hashes": scoring.hash_files(files, root),
            "kinds": {f.relative_to(root).as_posix(): scoring.input_kind(f) for f in files}}


@task(name="find-model-bundles")
def find_bundles(exports_dir: str, models: list[str] | None = None) -> list[str]:
    bundles = latest_bundles(exports_dir, models or None)
    if not bundles:
        raise FileNotFoundError(f"{exports_dir}: no exported model bundles; run the train flow first")
    return [str(b.path) for b in bundles.values()]


@task(name="score-with-model")
def score_with_model(bundle_path: str, input_dir: str, incoming: dict[str, Any],
                     batch_size: int = 8) -> list[dict[str, Any]]:
    """All files of this model's kind, in batches, in one task (not one task per file)."""
    from lung_models.bundle import load_bundle

    root = Path(input_dir)
    bundle = load_bundle(bundle_path)
    hashes = incoming["hashes"]
    todo = scoring.files_for(bundle, [root / f for f in incoming["files"]], incoming["kinds"], root)
    try:
        model = scoring.open_model(bundle)
    except Exception as exc:  # noqa: BLE001 - one refused model (bad hash, bad graph) must not sink the night
        run_logger().error("%s %s refused: %s", bundle.name, bundle.version, exc)
        return scoring.refused_rows(bundle, todo, root, hashes, f"model refused: {exc}")
    say(f"{bundle.name} {bundle.version}: scoring {len(todo)} files on {model.provider}")
    rows = list(scoring.score_files(model, todo, root, hashes, batch_size=batch_size))
    errors = sum(r["status"] != "ok" for r in rows)
    say(f"{model.bundle.name}: {len(rows) - errors} ok, {errors} error rows")
    return rows


@task(name="write-report")
def write_report(rows: list[dict[str, Any]], output_dir: str, input_dir: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(output_dir) / f"scores-{stamp}.csv"
    n = 1
    while path.exists():  # two runs in the same second never overwrite each other
        n += 1
        path = Path(output_dir) / f"scores-{stamp}-{n}.csv"
    scoring.write_report(rows, path)
    ok = sum(r["status"] == "ok" for r in rows)
    errors = [r for r in rows if r["status"] != "ok"]
    lines = ["# Scoring report", "", f"- input: `{input_dir}`", f"- CSV: [{path.name}]({path.resolve().as_uri()})",
             f"- rows: {len(rows)} ({ok} ok, {len(errors)} errors)", ""]
    if errors:
        lines += ["| file | model | error |", "|---|---|---|"]
        lines += [f"| {r['relative_path']} | {r['model']} | {r['error']} |" for r in errors[:50]]
    create_markdown_artifact(key="nightly-scoring-report", markdown="\n".join(lines),
                             description=f"scores written to {path}")
    say(f"report: {path} ({len(rows)} rows, {len(errors)} errors)")
    return str(path)
