"""Train flow: for each selected model, fetch → preprocess → train → evaluate → export."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from lung_models import registry
from lung_models.device import import_onnxruntime
from tasks.common import model_process
from tasks.data import fetch_data, preprocess_data
from tasks.training import cross_validate_model, evaluate_model, export_model, train_model


def training_run_name() -> str:
    """What the Prefect UI lists for a training run: the models, the profile and the data source."""
    params = flow_run.parameters or {}
    models = params.get("models") or ["all models"]
    shown = ", ".join(models[:3]) + (f" +{len(models) - 3}" if len(models) > 3 else "")
    return f"train {shown} ({params.get('profile', 'demo')}, {params.get('source', 'generated')})"


@flow(name="train-models", flow_run_name=training_run_name, log_prints=True)
def train_models(models: list[str] | None = None, profile: str = "demo", source: str = "generated",
                 data_dir: str | None = None, exports_dir: str = "exports", work_dir: str = "work",
                 epochs: int | None = None, batch_size: int | None = None,
                 max_per_class: int | None = None, seed: int = 1337, weights: str | dict[str, str] | None = None,
                 input_shape: dict[str, list[int]] | None = None, folds: int | None = None) -> dict[str, str]:
    """Train, evaluate and export each model; returns ``{model: bundle folder}``.

    ``profile`` is ``full`` (the documented recipe) or ``demo`` (few epochs, small generated
    data); ``source`` is ``generated``, ``kaggle``, ``url`` or ``local`` (with ``data_dir``).
    ``weights`` is ``pretrained``, ``random`` (said loudly in logs and cards) or a local weights
    file / TF-Hub module folder (or a dict of those by model name); by default each profile's
    choice (``demo`` uses ``random``: pretrained weights cannot be fetched offline).
    ``input_shape`` (for tests) maps a model name to a smaller input size. ``folds`` (k >= 2)
    first cross-validates each model's recipe k-fold on its pooled train and validation splits
    (models built from others are not cross-validated); the figures go into the model card.
    """
    import_onnxruntime()  # the export's parity check runs the graph: fail before hours of training
    if folds is not None and folds < 2:
        raise ValueError(f"folds must be at least 2 (k-fold cross-validation), not {folds}; leave it unset to skip it")
    # Dependencies first (an ensemble is built from its trained submodels); unknown names fail here.
    names = registry.training_order(models or registry.names())
    bundles, checkpoints = {}, {}
    for name in names:
        shape = (input_shape or {}).get(name) or registry.get(name).spec.recipe_for(profile).input_shape
        shape = list(shape) if shape else None
        data = fetch_data(name, source, profile, work_dir, data_dir, seed)
        prepared = preprocess_data(name, data["root"], work_dir, max_per_class, shape, profile)
        model_weights = weights.get(name) if isinstance(weights, dict) else weights
        overrides = {"epochs": epochs, "batch_size": batch_size, "weights": model_weights}
        parts = {dep: checkpoints[dep] for dep in registry.get(name).spec.depends_on}
        # TensorFlow's share of the memory is given back when the model's own process ends.
        with model_process(name):
            crossval = None
            if folds and not registry.get(name).spec.depends_on:
                crossval = cross_validate_model(name, prepared, work_dir, profile, overrides, seed, shape, folds)
            trained = train_model(name, prepared, work_dir, profile, overrides, seed, shape, parts)
            checkpoints[name] = trained["checkpoint"]
            metrics = evaluate_model(name, prepared, trained)
            bundles[name] = export_model(name, prepared, trained, metrics, data, exports_dir, crossval)
    return bundles
