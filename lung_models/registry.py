"""The model registry: every documented model declared once, as data.

Each family module in :mod:`lung_models.models` declares a :class:`ModelSpec` and registers its
builder with ``@register(SPEC)``; :func:`load_all` imports every module of that package, so a new
model is one new module and nothing else lists it. Flows, the CLI and the tests iterate
:data:`REGISTRY`; nothing in the code base branches on a model's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lung_models.data.catalog import DatasetSpec

# Modalities, and which incoming files each one scores.
HISTOLOGY_TILE = "histology_tile"
CT_SLICE = "ct_slice"
CT_VOLUME = "ct_volume"
MODALITIES = (HISTOLOGY_TILE, CT_SLICE, CT_VOLUME)

# How a DICOM CT slice (in HU) becomes the 8-bit grey image the 2-D CT models were trained on. The
# Kaggle PNGs are viewer exports; most show air black and soft tissue mid-grey, i.e. a window that
# starts near -1000 HU and is about 2200 HU wide (so do most generated slices). Recorded in each
# 2-D CT model's preprocessing, hence in its bundle.
CT_SLICE_WINDOW = {"center": 100.0, "width": 2200.0}


@dataclass(frozen=True)
class TrainingRecipe:
    """The documented training recipe; its values are the defaults of the ``full`` profile."""

    epochs: int
    batch_size: int
    loss: str
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: dict[str, Any] | None = None
    early_stopping: dict[str, Any] | None = None
    checkpoint_monitor: str = "val_loss"
    augmentation: dict[str, Any] | None = None
    max_per_class: int | None = None  # None: every file the data set has
    # Keyword options for the family's build() that change no layer or size, e.g. the momentum
    # of BatchNormalization's moving statistics.
    build_options: dict[str, Any] | None = None
    # "pretrained" (the spec's pretrained weights), "random" (random initialisation, said loudly
    # in the log and the model card) or a path to a local weights file / TF-Hub module folder.
    weights: str = "pretrained"
    loss_options: dict[str, Any] | None = None  # e.g. focal loss gamma, alpha="balanced"
    reduce_lr: dict[str, Any] | None = None  # ReduceLROnPlateau arguments
    stop_above: dict[str, Any] | None = None  # {"monitor": "val_accuracy", "value": 0.9}
    # Every training batch holds the classes in the data's proportions, as closely as whole items
    # allow (see training.stratified_order).
    balanced_batches: bool = False
    # Train (and export) at this input size instead of the spec's: same layers, fewer pixels. Only
    # the demo profile uses it, to fit a CPU's minutes; the full profile trains at the documented size.
    input_shape: tuple[int, ...] | None = None
    # A run that proves the chain (data → training → ONNX → scoring) works end to end, not
    # that the model learns: what the demo does for models whose pretrained backbone cannot be had
    # offline. Said on the demo's summary row and in the model card.
    smoke_run: bool = False
    # --- what the ``tuned`` profiles add (none of it changes a layer, a size or the input contract)
    # Overrides of the spec's preprocessing, e.g. {"colour": "grey"}: recorded in the bundle, so
    # the scorer prepares its inputs the same way.
    preprocessing: dict[str, Any] | None = None
    # "balanced": each training item's loss is weighted inversely to its class's frequency.
    class_weight: str | None = None
    # {"over_epochs": 1.0}: the weights validated, kept and exported are an exponential moving
    # average of the trained ones (Polyak averaging), over about that many epochs of steps.
    weight_averaging: dict[str, Any] | None = None
    # {"monitor": "val_loss", "window": 3, "patience": 8}: keep the checkpoint whose mean of the
    # monitored value over the last ``window`` epochs is best, and stop after ``patience`` epochs
    # without a better mean, so one lucky epoch on a tiny validation set cannot pick the model.
    selection: dict[str, Any] | None = None
    # "flips": after training, also try the model averaged over flipped views of its input (one
    # graph, exported as such) and keep that only if its validation loss is lower.
    test_time_augmentation: str | None = None
    # Train at least this many optimizer steps: on a small data set the epochs grow until they
    # hold that many (a documented epoch count is for the full data set, where an epoch is many
    # times longer). An explicit --epochs turns it off.
    min_steps: int | None = None


RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingRecipe))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    documented_by: str
    modality: str
    input_shape: tuple[int, ...]
    # The same architecture on a smaller input, for the test suite: the same rank and channels,
    # just large enough for every conv/pool stage to leave at least one cell.
    test_input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    output: str  # "sigmoid" (one unit, P(class_names[1])), "softmax" or "logits"
    preprocessing: dict[str, Any]
    dataset: DatasetSpec
    recipe: TrainingRecipe
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    documented_metrics: dict[str, Any] = field(default_factory=dict)
    # Where pretrained weights come from, e.g. {"kind": "tfhub", "handle": ...} or
    # {"kind": "keras_applications", "weights": "imagenet"}; None: trained from scratch.
    pretrained: dict[str, Any] | None = None
    # Models whose trained checkpoints this one is built from (trained first by the flow).
    depends_on: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"{self.name}: unknown modality {self.modality!r}; use one of {MODALITIES}")
        if self.output not in ("sigmoid", "softmax", "logits"):
            raise ValueError(f"{self.name}: output must be 'sigmoid', 'softmax' or 'logits', not {self.output!r}")
        if self.output == "sigmoid" and len(self.class_names) != 2:
            raise ValueError(f"{self.name}: a sigmoid output needs exactly two class names")
        if (len(self.test_input_shape) != len(self.input_shape)
                or self.test_input_shape[-1] != self.input_shape[-1]):
            raise ValueError(f"{self.name}: test_input_shape {self.test_input_shape} must have the rank and "
                             f"channels of input_shape {self.input_shape}")
        # A profile holds recipe fields and generated-data options (generated_*); anything else is
        # a typo that would otherwise be dropped without a word.
        for profile, values in self.profiles.items():
            unknown = sorted(k for k in values if k not in RECIPE_FIELDS and not k.startswith("generated_"))
            if unknown:
                raise ValueError(f"{self.name}: profile {profile!r} has unknown keys {unknown}; a profile "
                                 f"takes TrainingRecipe fields ({', '.join(sorted(RECIPE_FIELDS))}) or generated_* "
                                 "data options")

    def recipe_for(self, profile: str = "full", **overrides: Any) -> TrainingRecipe:
        """The recipe of a profile (``full`` = documented values), with explicit overrides on top."""
        if profile != "full" and profile not in self.profiles:
            raise KeyError(f"{self.name}: no profile {profile!r}; known: full, {', '.join(self.profiles)}")
        values = {k: v for k, v in self.profiles.get(profile, {}).items() if k in RECIPE_FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("epochs") is not None:  # the epochs asked for, exactly
            values["min_steps"] = None
        return dataclasses.replace(self.recipe, **values)


@dataclass(frozen=True)
class RegisteredModel:
    spec: ModelSpec
    build: Callable[..., Any]  # build(spec, input_shape=None, weights=..., parts=..., **options) -> keras.Model
    # Optional step after fitting: finalize(spec, model, val_x, val_y, params) -> (model, card notes)
    finalize: Callable[..., Any] | None = None


REGISTRY: dict[str, RegisteredModel] = {}

# The package of the model families: importing a family module registers its models.
FAMILIES_PACKAGE = "lung_models.models"
# Custom Keras layers and models of the families, imported by their builders and by checkpoint loading.
KERAS_MODULE = f"{FAMILIES_PACKAGE}.blocks"


def register(spec: ModelSpec, finalize: Callable[..., Any] | None = None
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a family's ``build(spec, input_shape=None, ...)`` function."""

    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        if spec.name in REGISTRY and REGISTRY[spec.name].build is not build:
            raise ValueError(f"model {spec.name!r} is registered twice")
        REGISTRY[spec.name] = RegisteredModel(spec=spec, build=build, finalize=finalize)
        return build

    return decorator


def training_order(names: list[str]) -> list[str]:
    """``names`` plus everything they depend on, dependencies first (stable otherwise)."""
    ordered: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            raise ValueError(f"dependency cycle: {' -> '.join((*trail, name))}")
        if name in ordered:
            return
        for dep in get(name).spec.depends_on:
            visit(dep, (*trail, name))
        ordered.append(name)

    for name in names:
        visit(name, ())
    return ordered


def load_all() -> dict[str, RegisteredModel]:
    """Import every module of :data:`FAMILIES_PACKAGE` (each family registers its models) and
    return the registry. Shared modules there (pretrained weights, tuned recipes) register nothing;
    the Keras one (:data:`KERAS_MODULE`) is left to the builders that use it, so listing the models
    and reading their specs needs no TensorFlow (a scoring-only install has none)."""
    package = importlib.import_module(FAMILIES_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__, f"{FAMILIES_PACKAGE}."):
        if module.name != KERAS_MODULE:
            importlib.import_module(module.name)
    return REGISTRY


def get(name: str) -> RegisteredModel:
    load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def names() -> list[str]:
    return sorted(load_all())
