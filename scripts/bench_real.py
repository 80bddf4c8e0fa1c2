"""Benchmarks (not CI): train models with their documented recipe on the real samples in
../shared/data and print the held-out metrics, one JSON object per model.

Presets (run one at a time; they take minutes on a 2-core CPU):

    .venv/bin/python scripts/bench_real.py lc25000-cnn      # real LC25000 tiles, aca vs scc
    .venv/bin/python scripts/bench_real.py chest            # chest-cnn + chest-ensemble (+ chest-resnet50)
    .venv/bin/python scripts/bench_real.py mixed7           # lc25000-inception-mixed7, 3 classes

ImageNet weights cannot be downloaded on the build machines, so the pretrained backbones train
from random initialisation here (``--weights random``, the default of this script); on a machine
with the weights, pass ``--weights pretrained``. The chest sample has no ``test`` folder: the
pipeline carves one from ``train`` (20%, seeded) and keeps ``valid`` for validation.
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
SHARED = REPO.parent / "shared" / "data"
PRESETS = {
    "lc25000-cnn": (["lc25000-cnn"], SHARED / "lc25000-lung-224"),
    "chest": (["chest-cnn", "chest-ensemble"], SHARED / "chest-ct-4class"),
    "mixed7": (["lc25000-inception-mixed7"], SHARED / "lc25000-lung-224"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--data", default=None, help="default: the preset's folder under ../shared/data")
    parser.add_argument("--epochs", type=int, default=None, help="default: the documented recipe")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--work-dir", default=str(REPO / "work" / "bench"))
    args = parser.parse_args()
    models, data = PRESETS[args.preset]
    data = Path(args.data or data)
    if not data.is_dir():
        raise SystemExit(f"{data}: real sample not found; pass --data")

    from flows.train import train_models
    from lung_models.bundle import load_bundle

    started = time.perf_counter()
    bundles = train_models(models=models, profile="full", source="local", data_dir=str(data),
                           exports_dir=str(Path(args.work_dir) / "exports"), work_dir=args.work_dir,
                           epochs=args.epochs, weights=args.weights)
    for name, path in bundles.items():
        card = load_bundle(path).card
        m = card["metrics"]
        print(json.dumps({
            "model": name, "data": str(data), "weights": card["weights_init"],
            "epochs_run": card["training"]["epochs_run"], "device": card["training"]["device"],
            "splits (accuracy, loss, n)": m["splits"], "test_accuracy": m["accuracy"],
            "test_accuracy_ci95_wilson": m["accuracy_ci95_wilson"], "roc_auc": m["roc_auc"],
            "per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"],
            "finalize": card["training"].get("finalize"),
            "documented": card["model"]["documented_metrics"], "bundle": path,
        }, indent=2))
    print(f"wall seconds: {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
