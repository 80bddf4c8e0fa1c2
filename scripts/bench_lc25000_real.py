"""Benchmark (not CI): the lc25000-cnn pipeline on real LC25000 tiles from ../shared/data.

Trains with the documented recipe (``full`` profile: 10 epochs, batch 32, 80/10/10 split, seed
1337) on ``lc25000-lung-224`` (300 lung_aca + 300 lung_scc, 224 px, resized to 256 like the
originals), then prints the held-out test metrics. Rerun:

    .venv/bin/python scripts/bench_lc25000_real.py [--data ../shared/data/lc25000-lung-224] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lc25000-lung-224"))
    parser.add_argument("--epochs", type=int, default=None, help="default: the documented recipe")
    parser.add_argument("--work-dir", default=str(REPO / "work" / "bench"))
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: real LC25000 sample not found; pass --data")

    from flows.train import train_models
    from lung_models.bundle import load_bundle

    started = time.perf_counter()
    bundles = train_models(models=["lc25000-cnn"], profile="full", source="local", data_dir=args.data,
                           exports_dir=str(Path(args.work_dir) / "exports"), work_dir=args.work_dir,
                           epochs=args.epochs)
    card = load_bundle(bundles["lc25000-cnn"]).card
    m = card["metrics"]
    print(json.dumps({
        "data": args.data, "epochs_run": card["training"]["epochs_run"], "device": card["training"]["device"],
        "splits": m["splits"], "test_accuracy": m["accuracy"], "test_accuracy_ci95": m["accuracy_ci95_wilson"],
        "roc_auc": m["roc_auc"], "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"],
        "documented_test_accuracy": card["model"]["documented_metrics"]["test_accuracy"],
        "wall_seconds": round(time.perf_counter() - started, 1), "bundle": bundles["lc25000-cnn"],
    }, indent=2))


if __name__ == "__main__":
    main()
