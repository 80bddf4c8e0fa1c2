"""Fetch a model's data set and cache its preprocessed arrays."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import task

from lung_models import registry
from lung_models.data import datasets
from lung_models.data.sources import source_from_config
from tasks.common import TIMEOUTS, retry_if_transient, say

KAGGLE_SECRET_BLOCK = "kaggle-credentials"
GENERATED_PER_CLASS = 200  # generated items per class when the profile does not say


def kaggle_credentials() -> dict[str, str] | None:
    """Credentials from KAGGLE_USERNAME/KAGGLE_KEY, else from the Prefect Secret block
    ``kaggle-credentials`` (JSON ``{"username": ..., "key": ...}``), else None."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return {"username": os.environ["KAGGLE_USERNAME"], "key": os.environ["KAGGLE_KEY"]}
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(KAGGLE_SECRET_BLOCK).get()
    except Exception:  # no block, or no server to ask: kagglehub will say what is missing
        return None
    return json.loads(value) if isinstance(value, str) else dict(value)


def source_config(model_name: str, source: str, profile: str, data_dir: str | None,
                  seed: int) -> dict[str, Any]:
    spec = registry.get(model_name).spec
    if source == "local":
        if not data_dir:
            raise ValueError("source 'local' needs data_dir: the folder holding the data set's documented layout")
        return {"path": data_dir}
    if source not in spec.dataset.sources:
        raise ValueError(f"{model_name}: no {source!r} source; available: "
                         f"{', '.join(spec.dataset.sources)}, local")
    config = dict(spec.dataset.sources[source])
    if source == "generated":
        # Profile options named generated_<param> become parameters of the phantom generator.
        opts = {k.removeprefix("generated_"): v for k, v in spec.profiles.get(profile, {}).items()
                if k.startswith("generated_")}
        n_per_class = opts.pop("per_class", GENERATED_PER_CLASS)
        params = {k: v for k, v in config.items() if k != "kind"} | opts
        return {"kind": config["kind"], "n_per_class": n_per_class, "seed": seed, "params": params}
    if source == "kaggle":
        config["credentials"] = kaggle_credentials()
    return config


# Retried only on network and I/O faults (the downloader has already retried each request): a bad
# --source, a checksum mismatch or a missing folder fails at once.
@task(name="fetch-data", task_run_name="fetch {model_name} ({source})", retries=2, retry_delay_seconds=[30, 120],
      retry_condition_fn=retry_if_transient, timeout_seconds=TIMEOUTS["fetch"])
def fetch_data(model_name: str, source: str, profile: str, work_dir: str, data_dir: str | None = None,
               seed: int = 1337) -> dict[str, Any]:
    """Download (or generate, or locate) the data set; returns its root and provenance."""
    config = source_config(model_name, source, profile, data_dir, seed)
    data_source = source_from_config(source, config)
    root = data_source.fetch(Path(work_dir) / "data", progress=say)
    return {"root": str(root), "provenance": data_source.provenance()}


@task(name="preprocess-data", task_run_name="preprocess {model_name}", timeout_seconds=TIMEOUTS["preprocess"])
def preprocess_data(model_name: str, data_root: str, work_dir: str, max_per_class: int | None = None,
                    input_shape: list[int] | None = None, profile: str = "full") -> str:
    """Cache the model's preprocessed splits; ``max_per_class`` (else the profile's) caps each split."""
    spec = registry.get(model_name).spec
    recipe = spec.recipe_for(profile, max_per_class=max_per_class)
    prepared = datasets.prepare(spec, Path(data_root), Path(work_dir) / "cache", max_per_class=recipe.max_per_class,
                                input_shape=tuple(input_shape) if input_shape else None,
                                preprocessing=recipe.preprocessing, progress=say)
    return str(prepared.folder)
