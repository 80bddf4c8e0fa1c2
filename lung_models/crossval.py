"""k-fold cross-validation of a recipe on the data a user has: how well, and how steadily, it does.

One validation split of a few dozen images says little about a recipe (one image is one or two
points of accuracy). Here the train and validation splits are pooled and cut into ``k`` folds,
stratified by class, with every near-copy of an image inside one fold (see
:mod:`lung_models.data.near_copies`). Each fold is held out once: the recipe trains on the
others (its early stopping and selection watching an inner validation split carved from them,
with the same grouping, never the held-out fold) and is scored on the held-out fold. The test
split is not touched, so it stays the final, once-only check of the model that ships.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lung_models.data import near_copies
from lung_models.data.datasets import PreparedData
from lung_models.fileutil import atomic_write_json
from lung_models.registry import ModelSpec, TrainingRecipe

log = logging.getLogger(__name__)
POOLED = ("train", "val")
INNER_VALIDATION_FOLDS = 7  # the inner validation split is one seventh (about 14%) of the training folds


def stratified_group_folds(y: np.ndarray, groups: list[str], k: int, seed: int) -> list[np.ndarray]:
    """The held-out indices of each of ``k`` folds: stratified by ``y``, a group never split."""
    from sklearn.model_selection import StratifiedGroupKFold

    smallest = int(np.bincount(y)[np.unique(y)].min()) if len(y) else 0
    if k < 2 or smallest < k:
        raise ValueError(f"{k}-fold cross-validation needs k >= 2 and at least k items of every class; the "
                         f"smallest class has {smallest}: use fewer folds or more data")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(y)), y, groups)]


def near_copy_groups(x: np.ndarray, params: dict[str, Any], exact: list[str]) -> list[str]:
    """A group per item (see :mod:`lung_models.data.near_copies`); volumes by ``exact`` hash only."""
    thumbs = np.stack([near_copies.thumbnail(image) for image in x]) if params.get("kind") == "rgb_image" else None
    return near_copies.groups(thumbs, exact)


def fold_plan(y: np.ndarray, groups: list[str], folds: int, seed: int
              ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, inner validation, held out) indices of each fold; a group never straddles two."""
    plan = []
    for i, held in enumerate(stratified_group_folds(y, groups, folds, seed)):
        rest = np.setdiff1d(np.arange(len(y)), held)
        smallest = int(np.bincount(y[rest])[np.unique(y[rest])].min())
        inner_k = max(2, min(INNER_VALIDATION_FOLDS, smallest))
        inner = stratified_group_folds(y[rest], [groups[j] for j in rest], inner_k, seed + i)[0]
        plan.append((np.setdiff1d(rest, rest[inner]), rest[inner], held))
    return plan


def cross_validate(spec: ModelSpec, build: Callable[..., Any], data: PreparedData, recipe: TrainingRecipe,
                   out_dir: Path, *, folds: int = 5, seed: int = 1337, input_shape: tuple[int, ...] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and score ``recipe`` on each of ``folds`` folds; mean, spread and per-fold figures."""
    from sklearn.metrics import f1_score

    from lung_models import export, training

    say = progress or log.info
    if spec.depends_on:
        raise ValueError(f"{spec.name} is built from {', '.join(spec.depends_on)}: cross-validating it would "
                         "retrain them on every fold; cross-validate them instead")
    manifest = data.manifest
    params = manifest["preprocessing"]
    xs, ys, groups = [], [], []
    for split in POOLED:
        x, y = data.arrays(split)
        xs.append(np.asarray(x))
        ys.append(y)
        groups += [entry["sha256"] for entry in manifest["splits"][split]]
    x_pool, y_pool = np.concatenate(xs), np.concatenate(ys)
    del xs
    groups = near_copy_groups(x_pool, params, groups)
    out_dir = Path(out_dir)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, (train_idx, val_idx, held) in enumerate(fold_plan(y_pool, groups, folds, seed)):
        fold_dir = out_dir / f"fold-{i + 1}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        for split, idx in (("train", train_idx), ("val", val_idx)):
            np.save(fold_dir / f"{split}_x.npy", x_pool[idx])
            np.save(fold_dir / f"{split}_y.npy", y_pool[idx])
        atomic_write_json(fold_dir / "manifest.json", {"preprocessing": params, "fold": i + 1, "folds": folds})
        say(f"{spec.name}: cross-validation fold {i + 1}/{folds}: {len(train_idx)} train / {len(val_idx)} inner "
            f"validation / {len(held)} held out")
        trained = training.train(spec, build, PreparedData(fold_dir), recipe, fold_dir / "run", seed=seed + i,
                                 input_shape=input_shape, progress=say)
        model = training.load_checkpoint(trained.checkpoint)
        fn = export.probability_function(model, spec.output, tuple(x_pool.shape[1:]))
        probs = training.predict_split(fn, x_pool[held], params)
        pred, truth = probs.argmax(1), y_pool[held]
        results.append({"fold": i + 1, "n_held_out": int(len(held)), "accuracy": float((pred == truth).mean()),
                        "macro_f1": float(f1_score(truth, pred, average="macro",
                                                   labels=list(range(len(spec.class_names))), zero_division=0)),
                        "epochs_run": trained.epochs_run})
        say(f"{spec.name}: fold {i + 1}/{folds} held-out accuracy {results[-1]['accuracy']:.3f}, "
            f"macro-F1 {results[-1]['macro_f1']:.3f}")
        del model, fn
        training.release_tensorflow_memory()
        shutil.rmtree(fold_dir, ignore_errors=True)  # arrays and checkpoints: only the figures are kept
    summary = {
        "folds": folds, "seed": seed, "pooled_splits": list(POOLED), "n": int(len(y_pool)),
        "grouping": f"stratified by class; exact copies and near-copies ({near_copies.RULE}) in one fold",
        "groups": len(set(groups)),
        "inner_validation": f"1/{INNER_VALIDATION_FOLDS} of the training folds (1/k for a class of k < "
                            f"{INNER_VALIDATION_FOLDS} items), for early stopping and selection",
        "seconds": round(time.perf_counter() - started, 1),
        "per_fold": results,
    }
    for metric in ("accuracy", "macro_f1"):
        values = np.array([r[metric] for r in results])
        # Sample standard deviation: the spread a new fold of such data would show.
        summary[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    atomic_write_json(out_dir / "crossval.json", summary)
    say(f"{spec.name}: {folds}-fold cross-validation accuracy {summary['accuracy']['mean']:.3f} "
        f"± {summary['accuracy']['std']:.3f}, macro-F1 {summary['macro_f1']['mean']:.3f} "
        f"± {summary['macro_f1']['std']:.3f} (n={summary['n']})")
    return summary

