"""The score flow on 1, 2 and 4 Dask workers: a benchmark, not a CI test. Every figure is measured in
this one run, against one running Prefect server, each night scored in a fresh process into a fresh
output folder, so the ratios compare like with like on a noisy machine. Needs exported bundles
(``lung-factory demo``, or ``lung-factory train --profile demo --epochs 1``).

    .venv/bin/python scripts/bench_dask.py --exports exports                 # 1, 2 and 4 workers
    .venv/bin/python scripts/bench_dask.py --exports exports --workers 1,3 --ledger postgresql://...

Each run's wall time includes starting its local Dask cluster (worker processes import ONNX Runtime
and open every model), as the nightly deployment pays it. The rows of every run are checked against
the first run's (same keys and statuses, probabilities within 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def child(args: argparse.Namespace) -> None:
    from flows.score import score_folder

    started = time.perf_counter()
    csv = score_folder(input_dir=args.input, output_dir=args.output, exports_dir=args.exports, models=args.models,
                       settle_seconds=0, workers=args.n, ledger=args.ledger, include_unpromoted=True)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "csv": csv}), flush=True)


def rows(csv: str):
    import pandas as pd

    df = pd.read_csv(csv, keep_default_na=False)
    return df.sort_values(["relative_path", "series_uid_hash", "model"]).reset_index(drop=True)


def same_rows(a, b) -> bool:
    key = ["relative_path", "series_uid_hash", "model", "status", "predicted_class", "n_inputs"]
    if a[key].astype(str).values.tolist() != b[key].astype(str).values.tolist():
        return False
    for x, y in zip(a.probabilities, b.probabilities):
        px, py = (json.loads(x) if x else {}), (json.loads(y) if y else {})
        if px.keys() != py.keys() or any(abs(px[c] - py[c]) > 1e-6 for c in px):
            return False
    return True


def new_database(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exports", default="exports")
    parser.add_argument("--work", default="work/bench-dask")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--models", nargs="*", default=None, help="default: every exported model")
    parser.add_argument("--ledger", default=None, help="a postgresql:// URL of a server where this user may create "
                        "databases: each run gets a new one (default: SQLite in each output folder)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--tiles", type=int, default=150)
    parser.add_argument("--volumes", type=int, default=3)
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from bench_night import prefect_server

    from lung_models.data import phantoms
    from lung_models.scoring.runtime import cpu_cores

    work = Path(args.work).resolve()
    folder = work / f"in-{args.slices}-{args.tiles}-{args.volumes}-{args.series}"
    if not folder.exists():
        phantoms.write_incoming(folder, seed=5, n_tiles=args.tiles, n_volumes=args.volumes, corrupt=False,
                                tile_size=768, in_plane=256, slices=48, n_slices=args.slices, slice_size=512,
                                n_dicom_series=args.series)
    n_files = sum(1 for p in folder.rglob("*") if p.is_file())
    counts = [int(n) for n in args.workers.split(",")]
    print(f"night folder: {folder} ({n_files} files); {cpu_cores()} cores here", flush=True)
    results = {}
    with prefect_server(work / f"server-{time.time_ns()}") as env:
        env = {**env, "PREFECT_LOGGING_LEVEL": "WARNING"}
        for n in counts:
            out = work / f"out-{n}-{time.time_ns()}"
            cmd = [sys.executable, __file__, "--child", "--input", str(folder), "--output", str(out),
                   "--exports", str(Path(args.exports).resolve()), "--n", str(n)]
            cmd += ["--models", *args.models] if args.models else []
            database = f"bench_dask_{n}_{time.time_ns()}"
            if args.ledger:  # each run a night of its own: a new database on the server, dropped after it
                cmd += ["--ledger", new_database(args.ledger, database)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if args.ledger:
                drop_database(args.ledger, database)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{n} workers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            result = json.loads(line.removeprefix("RESULT "))
            result["rows"] = rows(result["csv"])
            results[n] = result
            base = results[counts[0]]
            print(f"workers {n}: {result['seconds']:.1f} s for {len(result['rows'])} rows "
                  f"({len(result['rows']) / result['seconds']:.1f} rows/s), "
                  f"{base['seconds'] / result['seconds']:.2f}x the throughput of {counts[0]} worker(s); "
                  f"same rows as {counts[0]}: {'yes' if same_rows(result['rows'], base['rows']) else 'NO'}",
                  flush=True)


if __name__ == "__main__":
    main()
