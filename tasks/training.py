"""Train, evaluate and export one registered model; each task passes paths and small dicts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_table_artifact

from lung_models import calibration, crossval, drift, evaluation, explain, export, preprocess, registry, training
from lung_models.data.datasets import SPLITS, PreparedData
from lung_models.fileutil import atomic_write_json, utc_stamp
from lung_models.training import release_tensorflow_memory
from tasks.common import TIMEOUTS, in_model_process, say


def run_dir(work_dir: str, model_name: str) -> Path:
    path = Path(work_dir) / "runs" / model_name / utc_stamp()
    path.mkdir(parents=True, exist_ok=True)
    return path


@task(name="train-model", task_run_name="train {model_name} ({profile})", timeout_seconds=TIMEOUTS["train"])
def train_model(model_name: str, prepared: str, work_dir: str, profile: str = "full",
                overrides: dict[str, Any] | None = None, seed: int = 1337,
                input_shape: list[int] | None = None, parts: dict[str, str] | None = None) -> dict[str, Any]:
    return in_model_process(_train, model_name, prepared, work_dir, profile, overrides, seed, input_shape, parts)


def _train(model_name: str, prepared: str, work_dir: str, profile: str, overrides: dict[str, Any] | None,
           seed: int, input_shape: list[int] | None, parts: dict[str, str] | None) -> dict[str, Any]:
    entry = registry.get(model_name)
    recipe = entry.spec.recipe_for(profile, **(overrides or {}))
    result = training.train(entry.spec, entry.build, PreparedData(Path(prepared)), recipe,
                            run_dir(work_dir, model_name), seed=seed,
                            input_shape=tuple(input_shape) if input_shape else None, parts=parts,
                            finalize=entry.finalize, progress=say)
    release_tensorflow_memory()
    return {**dataclasses.asdict(result), "recipe": dataclasses.asdict(recipe), "profile": profile,
            "seed": seed}


@task(name="cross-validate-model", task_run_name="cross-validate {model_name} ({folds} folds)",
      timeout_seconds=TIMEOUTS["cross_validate"])
def cross_validate_model(model_name: str, prepared: str, work_dir: str, profile: str = "full",
                         overrides: dict[str, Any] | None = None, seed: int = 1337,
                         input_shape: list[int] | None = None, folds: int = 5) -> dict[str, Any]:
    """k-fold cross-validation of the profile's recipe on the pooled train and validation splits."""
    summary = in_model_process(_cross_validate, model_name, prepared, work_dir, profile, overrides, seed,
                               input_shape, folds)
    create_table_artifact(
        key=f"crossval-{model_name}",
        table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in fold.items()}
               for fold in summary["per_fold"]],
        description=f"{model_name} ({profile} profile): {folds}-fold cross-validation, accuracy "
                    f"{summary['accuracy']['mean']:.3f} ± {summary['accuracy']['std']:.3f}, macro-F1 "
                    f"{summary['macro_f1']['mean']:.3f} ± {summary['macro_f1']['std']:.3f} (n={summary['n']})")
    return summary


def _cross_validate(model_name: str, prepared: str, work_dir: str, profile: str, overrides: dict[str, Any] | None,
                    seed: int, input_shape: list[int] | None, folds: int) -> dict[str, Any]:
    entry = registry.get(model_name)
    recipe = entry.spec.recipe_for(profile, **(overrides or {}))
    out = Path(work_dir) / "crossval" / model_name / utc_stamp()
    summary = crossval.cross_validate(entry.spec, entry.build, PreparedData(Path(prepared)), recipe, out,
                                      folds=folds, seed=seed,
                                      input_shape=tuple(input_shape) if input_shape else None, progress=say)
    return {**summary, "profile": profile, "recipe": dataclasses.asdict(recipe)}


@task(name="evaluate-model", task_run_name="evaluate {model_name}", timeout_seconds=TIMEOUTS["evaluate"])
def evaluate_model(model_name: str, prepared: str, trained: dict[str, Any]) -> str:
    """Metrics on the held-out test split (and accuracy/loss on every split), plots, split manifest."""
    path = in_model_process(_evaluate, model_name, prepared, trained)
    metrics = json.loads(Path(path).read_text())
    splits = metrics["splits"]
    lo, hi = metrics["accuracy_ci95_wilson"]
    create_table_artifact(
        key=f"metrics-{model_name}",
        table=[{"split": s, **v} for s, v in splits.items()]
        + [{"split": f"test/{c}", **{k: round(v, 4) for k, v in m.items()}} for c, m in metrics["per_class"].items()],
        description=f"{model_name}: accuracy and loss per split, per-class test metrics "
                    f"(test accuracy 95% Wilson CI {lo:.3f}-{hi:.3f})")
    return path


def _evaluate(model_name: str, prepared: str, trained: dict[str, Any]) -> str:
    from sklearn.metrics import log_loss

    spec = registry.get(model_name).spec
    data = PreparedData(Path(prepared))
    params = data.manifest["preprocessing"]
    model = training.load_checkpoint(trained["checkpoint"])
    out = Path(trained["checkpoint"]).parent
    splits: dict[str, dict[str, float]] = {}
    metrics: dict[str, Any] = {}
    for split in SPLITS:
        x, y = data.arrays(split)
        fn = export.probability_function(model, spec.output, tuple(x.shape[1:]))
        probs = training.predict_split(fn, x, params)
        labels = list(range(len(spec.class_names)))
        splits[split] = {"n": len(y), "accuracy": float((probs.argmax(1) == y).mean()),
                         "loss": float(log_loss(y, np.clip(probs, 1e-7, 1), labels=labels))}
        if split == "test":
            metrics = evaluation.classification_metrics(y, probs, list(spec.class_names))
            evaluation.plot_roc(y, probs, list(spec.class_names), out / "roc.png", f"{spec.name} (test split)")
    metrics["splits"] = splits
    metrics["split_fractions"] = spec.dataset.split
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "split_manifest.json", data.manifest)
    evaluation.plot_history(training.history_of(trained["history"]), out / "training_curves.png", spec.name)
    evaluation.plot_confusion(metrics["confusion_matrix"], list(spec.class_names),
                              out / "confusion_matrix.png", f"{spec.name} (test split)")
    del model, fn
    release_tensorflow_memory()
    lo, hi = metrics["accuracy_ci95_wilson"]
    say(f"{model_name}: test accuracy {metrics['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={metrics['n']}), "
        f"ROC AUC {metrics['roc_auc'] if metrics['roc_auc'] is None else round(metrics['roc_auc'], 3)}")
    return str(out / "metrics.json")


@task(name="export-model", task_run_name="export {model_name}", timeout_seconds=TIMEOUTS["export"])
def export_model(model_name: str, prepared: str, trained: dict[str, Any], metrics_path: str,
                 data_info: dict[str, Any], exports_dir: str, crossval_summary: dict[str, Any] | None = None) -> str:
    bundle = in_model_process(_export, model_name, prepared, trained, metrics_path, data_info, exports_dir,
                              crossval_summary)
    _export_artifact(model_name, Path(bundle))
    return bundle


def _export_artifact(model_name: str, bundle: Path) -> None:
    """The export in the Prefect UI: parity, the promotion verdict, and links to the bundle's plots."""
    from prefect.artifacts import create_markdown_artifact

    card = json.loads((bundle / "model_card.json").read_text())
    parity, verdict = card["parity"], card.get("promotion") or {}
    lines = [f"# {model_name} {card['version']}", "",
             f"- bundle: [{bundle}]({bundle.resolve().as_uri()})",
             f"- ONNX parity with Keras on {parity['items']} test items: {'passed' if parity['passed'] else 'FAILED'} "
             f"(max abs difference {parity['max_abs_diff']}, {parity['class_mismatches']} class mismatches)",
             f"- promotion gate: {'passed' if verdict.get('passed') else 'failed, NOT promoted'}: "
             f"{verdict.get('reason', '')}"]
    if card.get("calibration"):
        lines.append(f"- calibration: {calibration.summary(card['calibration'])}")
    lines += ["", "Plots:", ""]
    lines += [f"- [{name}]({(bundle / name).resolve().as_uri()})"
              for name in ("training_curves.png", "confusion_matrix.png", "roc.png", "reliability.png")
              if (bundle / name).is_file()]
    create_markdown_artifact(key=f"export-{model_name}", markdown="\n".join(lines),
                             description=f"{model_name}: parity, promotion and plots of bundle {card['version']}")


def _calibrate(spec, model, data: PreparedData, plot: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Temperature scaling fitted on the validation split, its test-split reliability before and
    after, and the reliability diagram at ``plot``; with the calibrated probabilities of the
    validation and test items (what the scorer will output for them)."""
    params = data.manifest["preprocessing"]
    (x_val, y_val), (x_test, y_test) = data.arrays("val"), data.arrays("test")
    fn = export.probability_function(model, spec.output, tuple(x_test.shape[1:]))
    val_probs, test_probs = training.predict_split(fn, x_val, params), training.predict_split(fn, x_test, params)
    record = calibration.calibrate(val_probs, y_val, test_probs, y_test)
    calibration.plot_reliability(record, plot, f"{spec.name} (test split)")
    say(f"{spec.name}: {calibration.summary(record)}")
    held_out = calibration.apply_temperature(np.concatenate([val_probs, test_probs]), record["temperature"])
    return record, held_out


def _drift_reference(spec, data: PreparedData, x_train: np.ndarray, held_out: np.ndarray, path: Path) -> dict[str, Any]:
    """The bundle's drift reference (``drift``): the training inputs' features as the scorer will
    compute them tonight, and the model's calibrated confidence on held-out items."""
    params = data.manifest["preprocessing"]
    inputs = (preprocess.batch_stage(x_train[i:i + 1], params) for i in drift.reference_indices(len(x_train)))
    ref = drift.reference(inputs, held_out.max(axis=1), held_out.argmax(axis=1), list(spec.class_names))
    atomic_write_json(path, ref)
    say(f"{spec.name}: drift reference of {ref['n_inputs']} training inputs and {ref['n_outputs']} held-out outputs")
    return {"file": drift.REFERENCE_NAME, "test": ref["test"], "features": list(drift.FEATURES),
            "n_inputs": ref["n_inputs"], "n_outputs": ref["n_outputs"], "alpha": ref["alpha"],
            "min_statistic": ref["min_statistic"], "min_items": ref["min_items"]}


def _export(model_name: str, prepared: str, trained: dict[str, Any], metrics_path: str,
            data_info: dict[str, Any], exports_dir: str, crossval_summary: dict[str, Any] | None = None) -> str:
    spec = registry.get(model_name).spec
    data = PreparedData(Path(prepared))
    x_test, y_test = data.arrays("test")
    x_train, _ = data.arrays("train")
    run = Path(metrics_path).parent
    model = training.load_checkpoint(trained["checkpoint"])
    card_extra = {
        "metrics": json.loads(Path(metrics_path).read_text()),
        "data": {**data_info, "cache": prepared, "skipped_files": data.manifest.get("skipped", [])},
        "training": {k: trained[k] for k in ("device", "seconds", "epochs_run", "recipe", "profile", "seed")}
        | {"finalize": json.loads(Path(trained["history"]).read_text()).get("finalize") or None},
        "weights_init": trained["weights_init"],
        # The recipe's cross-validated figures (on the pooled train and validation splits), beside
        # the test split's in "metrics"; None when the run did not cross-validate.
        "crossval": crossval_summary,
    }
    smoke = bool(trained["recipe"].get("smoke_run"))
    if smoke:
        # The int8 gate compares accuracies; at chance level (a random backbone) it would pass a
        # variant without having measured anything.
        card_extra["int8"] = {"file": None, "usable": False,
                              "reason": "not made in a smoke run (accuracy at chance: nothing for the gate to check)"}
    card_extra["calibration"], held_out = _calibrate(spec, model, data, run / "reliability.png")
    card_extra["drift"] = _drift_reference(spec, data, x_train, held_out, run / drift.REFERENCE_NAME)
    files = {"metrics.json": run / "metrics.json", "split_manifest.json": run / "split_manifest.json",
             "history.json": Path(trained["history"]), "training_curves.png": run / "training_curves.png",
             "confusion_matrix.png": run / "confusion_matrix.png", "roc.png": run / "roc.png",
             "reliability.png": run / "reliability.png", drift.REFERENCE_NAME: run / drift.REFERENCE_NAME,
             "model.keras": Path(trained["checkpoint"]), **explain.hub_module_files(model)}
    bundle = export.export_bundle(spec, model, test_x=x_test, params=data.manifest["preprocessing"],
                                  exports_root=Path(exports_dir), card_extra=card_extra, files=files,
                                  progress=say, test_y=y_test, calib_x=None if smoke else x_train,
                                  temperature=card_extra["calibration"]["temperature"])
    del model
    release_tensorflow_memory()
    return str(bundle)
