"""Train a registered model on prepared arrays, following its recipe."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import augment, preprocess
from lung_models import progress as bars
from lung_models.data.datasets import PreparedData
from lung_models.device import configure_tensorflow
from lung_models.fileutil import atomic_write_json
from lung_models.registry import ModelSpec, TrainingRecipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    history: str
    device: str
    epochs_run: int
    seconds: float
    weights_init: str


def labels_for_loss(y: np.ndarray, loss: str, num_classes: int) -> np.ndarray:
    if loss == "binary_crossentropy":
        return y.astype("float32")[:, None]
    if loss.startswith("categorical_"):
        return np.eye(num_classes, dtype="float32")[y]
    return y.astype("int64")


def stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of ``range(len(y))`` that spreads each class evenly: each class is shuffled,
    its i-th item of n gets the key (i + u) / n with u drawn once per class, and items are sorted
    by key. Any run of items then holds each class in the data's proportions as closely as whole
    items allow, exactly when each class's share of a batch is a whole number (two equal classes
    in even batches: every batch half one class, half the other). ``y`` holds integer labels."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"stratified_order needs one integer label per item, not an array of shape {y.shape}")
    _, class_of = np.unique(y, return_inverse=True)
    keys = np.empty(len(y))
    for k in range(class_of.max(initial=-1) + 1):
        members = rng.permutation(np.flatnonzero(class_of == k))
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(keys, kind="stable")


def balanced_class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """One weight per class, inversely proportional to its frequency (sklearn's "balanced")."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    weights = np.ones(num_classes, dtype="float32")
    weights[present] = compute_class_weight("balanced", classes=present, y=y)
    return weights


def make_batches(x: np.ndarray, y: np.ndarray, *, batch_size: int, params: dict[str, Any],
                 loss: str, num_classes: int, shuffle: bool, augmentation: dict[str, Any] | None,
                 seed: int, balanced: bool = False, class_weights: np.ndarray | None = None):
    """A Keras ``PyDataset`` over (memory-mapped) cached arrays: per-batch rescaling, optional
    augmentation (see :mod:`lung_models.augment`), a fresh seeded shuffle every epoch (``balanced``:
    a stratified one, see ``stratified_order``; without ``shuffle`` the order is the arrays' own),
    and per-item loss weights when ``class_weights`` is given."""
    import keras

    augment.check(augmentation)
    share = (augmentation or {}).get("probability", 1.0)  # of the items augmented
    if not 0 <= share <= 1:
        raise ValueError(f"augmentation probability must be between 0 and 1, not {share!r}")

    class ArrayBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.labels = labels_for_loss(y, loss, num_classes)
            self.order = self.shuffled() if shuffle else np.arange(len(x))

        def shuffled(self) -> np.ndarray:
            return stratified_order(y, self.rng) if balanced else self.rng.permutation(len(x))

        def __len__(self) -> int:
            return math.ceil(len(x) / batch_size)

        def __getitem__(self, index: int):
            idx = np.sort(self.order[index * batch_size:(index + 1) * batch_size])
            raw = x[idx]
            if augmentation and augmentation["kind"] in augment.IMAGE_KINDS:
                raw = augment.images(raw, augmentation, self.rng)
            batch = preprocess.batch_stage(raw, params)
            if augmentation and augmentation["kind"] == "volume_rotation":
                batch = np.stack([preprocess.random_rotate_volume(v, self.rng, augmentation["angles"])
                                  if share >= 1 or self.rng.random() < share else v for v in batch])
            if class_weights is not None:
                return batch, self.labels[idx], class_weights[y[idx]]
            return batch, self.labels[idx]

        def on_epoch_end(self) -> None:
            if shuffle:
                self.order = self.shuffled()

    return ArrayBatches()


def monitor_mode(monitor: str) -> str:
    """Accuracies improve upwards, losses downwards."""
    return "max" if "acc" in monitor else "min"


def make_optimizer(recipe: TrainingRecipe, steps_per_epoch: int = 1):
    """The recipe's optimizer, with its learning-rate schedule if it has one:

    - ``exponential_decay``: ``decay_steps``, ``decay_rate``, optional ``staircase``;
    - ``warmup_cosine``: a linear warm-up from a tenth of the learning rate over ``warmup_epochs``,
      then a cosine decay to ``alpha`` times it at the last epoch (so a from-scratch network's
      first, largest gradients cannot throw it far, and the last epochs settle).

    Any other kind is refused. ``weight_averaging`` turns on the optimizer's moving average of the
    weights, over ``over_epochs`` epochs' worth of steps.
    """
    import keras

    lr: Any = recipe.learning_rate
    sched = recipe.lr_schedule
    if sched and sched.get("kind") == "exponential_decay":
        lr = keras.optimizers.schedules.ExponentialDecay(
            recipe.learning_rate, decay_steps=sched["decay_steps"], decay_rate=sched["decay_rate"],
            staircase=sched.get("staircase", False))
    elif sched and sched.get("kind") == "warmup_cosine":
        warmup = max(1, round(sched.get("warmup_epochs", 1) * steps_per_epoch))
        total = max(warmup + 1, recipe.epochs * steps_per_epoch)
        lr = keras.optimizers.schedules.CosineDecay(
            recipe.learning_rate / 10, decay_steps=total - warmup, alpha=sched.get("alpha", 0.0),
            warmup_target=recipe.learning_rate, warmup_steps=warmup)
    elif sched:
        raise ValueError(f"unknown lr_schedule kind {sched.get('kind')!r}; known: exponential_decay, warmup_cosine")
    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "lion": keras.optimizers.Lion}
    if recipe.optimizer not in optimizers:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; known: {', '.join(optimizers)}")
    averaging = {}
    if recipe.weight_averaging:
        # The average's time constant, in optimizer steps: over_epochs epochs' worth.
        steps = max(1.0, recipe.weight_averaging.get("over_epochs", 1.0) * steps_per_epoch)
        averaging = {"use_ema": True, "ema_momentum": 1.0 - 1.0 / steps}
    return optimizers[recipe.optimizer](learning_rate=lr, **averaging)


class _ProgressLog:
    """A Keras callback that reports each epoch as one readable line and, in a terminal, draws bars
    of the epochs and of the current epoch's batches (no extra log lines elsewhere: plain=False)."""

    def __new__(cls, name: str, epochs: int, say: Callable[[str], None]):
        import keras

        class ProgressLog(keras.callbacks.Callback):
            epoch_bar = batch_bar = None

            def finish(self):  # also when fit raised, which skips on_train_end
                for b in (self.batch_bar, self.epoch_bar):
                    if b is not None:
                        b.finish()

            def on_train_begin(self, logs=None):
                self.epoch_bar = bars.start(f"{name} epochs", epochs, unit="epochs", transient=True, plain=False)

            def on_train_end(self, logs=None):
                self.finish()

            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()
                self.batch_bar = bars.start(f"{name} epoch {epoch + 1}", (self.params or {}).get("steps"),
                                            unit="batches", transient=True, plain=False)

            def on_train_batch_end(self, batch, logs=None):
                self.batch_bar.advance()

            def on_epoch_end(self, epoch, logs=None):
                self.batch_bar.finish()
                self.epoch_bar.advance()
                logs = logs or {}
                parts = " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items())
                                 if isinstance(v, (int, float)) and k != "learning_rate")
                say(f"{name}: epoch {epoch + 1}/{epochs} ({time.perf_counter() - self.started:.0f}s) {parts}")

        return ProgressLog()


def weights_description(spec: ModelSpec, recipe: TrainingRecipe) -> str:
    """What the weights started from, in words the log and the model card repeat verbatim."""
    if spec.pretrained is None:
        return "random initialisation (trained from scratch, as documented)"
    if recipe.weights == "random":
        return (f"RANDOM INITIALISATION instead of the documented pretrained weights "
                f"({spec.pretrained.get('handle') or spec.pretrained.get('weights')}): results are not "
                "comparable with the documented ones")
    if recipe.weights == "pretrained":
        return f"pretrained: {spec.pretrained.get('handle') or spec.pretrained.get('weights')}"
    return f"pretrained: local file {recipe.weights}"


def make_loss(recipe: TrainingRecipe, y_train: np.ndarray, num_classes: int):
    """The recipe's loss; ``alpha="balanced"`` becomes sklearn's balanced class weights."""
    import keras

    options = dict(recipe.loss_options or {})
    if recipe.loss == "categorical_focal_crossentropy":
        if options.get("alpha") == "balanced":
            from sklearn.utils.class_weight import compute_class_weight

            options["alpha"] = [float(w) for w in compute_class_weight(
                "balanced", classes=np.arange(num_classes), y=y_train)]
        return keras.losses.CategoricalFocalCrossentropy(**options)
    if options:
        return keras.losses.get({"class_name": recipe.loss, "config": options})
    return recipe.loss


class _SmoothedSelection:
    """Keep the model whose mean of ``monitor`` over the last ``window`` epochs is the best so far,
    and stop once ``patience`` epochs pass without a better mean.

    A validation set of a few dozen images moves by a whole image's share from one epoch to the
    next; the best single epoch on it is partly luck, the best run of epochs much less so. The
    weights kept are those at the end of the best run (with weight averaging, themselves an
    average over about an epoch). Nothing is chosen before ``window`` epochs have run (or all of
    them, in a shorter run), so one early lucky epoch cannot be chosen on its own.
    """

    def __new__(cls, path: Path, monitor: str, window: int, patience: int, say: Callable[[str], None]):
        import keras

        mode = monitor_mode(monitor)

        class SmoothedSelection(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.values: list[float] = []
                self.best = np.inf
                self.best_epoch = None
                self.best_mean = None
                self.wait = 0

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(monitor)
                if value is None or not np.isfinite(value):
                    return
                self.values.append(float(value))
                if len(self.values) < min(window, self.params.get("epochs") or window):
                    return
                mean = float(np.mean(self.values[-window:]))
                score = -mean if mode == "max" else mean
                if score < self.best:
                    self.best, self.best_epoch, self.best_mean, self.wait = score, epoch + 1, mean, 0
                    self.model.save(path)
                    return
                self.wait += 1
                if self.wait >= patience:
                    say(f"{monitor} averaged over {window} epochs last improved at epoch {self.best_epoch}: "
                        "stopping")
                    self.model.stop_training = True

        return SmoothedSelection()


class _StopAbove:
    """Stop training once a monitored value exceeds a threshold (documented for mixed7)."""

    def __new__(cls, monitor: str, value: float, say: Callable[[str], None]):
        import keras

        class StopAbove(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if (logs or {}).get(monitor, -np.inf) > value:
                    say(f"{monitor} {logs[monitor]:.4f} > {value}: stopping")
                    self.model.stop_training = True

        return StopAbove()


def build_model(build: Callable[..., Any], spec: ModelSpec, recipe: TrainingRecipe, *,
                input_shape: tuple[int, ...] | None, parts: dict[str, str] | None, adapt_x: np.ndarray | None):
    """Call a family's builder with the options it declares (weights, parts, adapt_x)."""
    accepted = inspect.signature(build).parameters
    kwargs: dict[str, Any] = dict(recipe.build_options or {})
    optional = {"weights": recipe.weights, "parts": parts, "adapt_x": adapt_x}
    kwargs.update({k: v for k, v in optional.items() if k in accepted})
    return build(spec, input_shape=input_shape, **kwargs)


def train(spec: ModelSpec, build: Callable[..., Any], data: PreparedData, recipe: TrainingRecipe,
          out_dir: Path, *, seed: int = 1337, input_shape: tuple[int, ...] | None = None,
          parts: dict[str, str] | None = None, finalize: Callable[..., Any] | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Fit the model; keep the best checkpoint (by ``recipe.checkpoint_monitor``) and the history.

    ``parts`` maps the models this one is built from to their checkpoints; ``finalize`` (from the
    registry) may replace the best model after fitting and explain its choice in the history.
    """
    import keras

    say = progress or log.info
    device = configure_tensorflow()
    weights = weights_description(spec, recipe)
    say(f"{spec.name}: training on {device}; weights: {weights}")
    keras.utils.set_random_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = data.manifest["preprocessing"]
    n_classes = len(spec.class_names)
    x_train, y_train = data.arrays("train")
    x_val, y_val = data.arrays("val")

    sample = np.sort(np.random.default_rng(seed).permutation(len(x_train))[:256])
    adapt_x = preprocess.batch_stage(x_train[sample], params)  # for layers adapted on training images
    model = build_model(build, spec, recipe, input_shape=input_shape, parts=parts, adapt_x=adapt_x)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    if recipe.min_steps and recipe.epochs * steps_per_epoch < recipe.min_steps:
        epochs = math.ceil(recipe.min_steps / steps_per_epoch)
        say(f"{spec.name}: {recipe.epochs} epochs of {steps_per_epoch} steps are fewer than the recipe's "
            f"{recipe.min_steps}: training up to {epochs} epochs")
        recipe = dataclasses.replace(recipe, epochs=epochs)
    model.compile(optimizer=make_optimizer(recipe, steps_per_epoch), loss=make_loss(recipe, y_train, n_classes),
                  metrics=["accuracy"])
    if recipe.class_weight not in (None, "balanced"):
        raise ValueError(f"unknown class_weight {recipe.class_weight!r}; known: balanced")
    common = dict(batch_size=recipe.batch_size, params=params, loss=recipe.loss, num_classes=n_classes)
    # The validation loss is weighted like the training loss (by the training split's class
    # frequencies), so selection judges what training optimises.
    class_weights = balanced_class_weights(y_train, n_classes) if recipe.class_weight else None
    train_batches = make_batches(x_train, y_train, shuffle=True, augmentation=recipe.augmentation,
                                 seed=seed, balanced=recipe.balanced_batches, class_weights=class_weights, **common)
    val_batches = make_batches(x_val, y_val, shuffle=False, augmentation=None, seed=seed,
                               class_weights=class_weights, **common)

    checkpoint = out_dir / "best.keras"
    # With weight averaging, the averaged weights are what is validated and kept: the swap
    # callback puts them in place at each epoch's end, before the checkpoint callback saves.
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if recipe.weight_averaging else []
    selection = None
    if recipe.selection:
        sel = {"monitor": "val_loss", "window": 3, "patience": 8, **recipe.selection}
        selection = _SmoothedSelection(checkpoint, sel["monitor"], int(sel["window"]), int(sel["patience"]), say)
        callbacks.append(selection)
    else:
        callbacks.append(keras.callbacks.ModelCheckpoint(checkpoint, monitor=recipe.checkpoint_monitor,
                                                         mode=monitor_mode(recipe.checkpoint_monitor),
                                                         save_best_only=True))
    progress_log = _ProgressLog(spec.name, recipe.epochs, say)
    callbacks.append(progress_log)
    if recipe.early_stopping:
        es = dict(recipe.early_stopping)
        es.setdefault("mode", monitor_mode(es["monitor"]))
        callbacks.append(keras.callbacks.EarlyStopping(**es))
    if recipe.reduce_lr:
        rl = dict(recipe.reduce_lr)
        rl.setdefault("mode", monitor_mode(rl["monitor"]))
        callbacks.append(keras.callbacks.ReduceLROnPlateau(**rl))
    if recipe.stop_above:
        callbacks.append(_StopAbove(recipe.stop_above["monitor"], recipe.stop_above["value"], say))
    say(f"{spec.name}: {len(x_train)} train / {len(x_val)} val items, {recipe.epochs} epochs, "
        f"batch {recipe.batch_size}")
    started = time.perf_counter()
    try:
        history = model.fit(train_batches, validation_data=val_batches, epochs=recipe.epochs,
                            callbacks=callbacks, verbose=0)
    finally:
        progress_log.finish()
    seconds = time.perf_counter() - started
    if not checkpoint.exists():  # monitor never improved on its initial value (e.g. NaN loss)
        model.save(checkpoint)
    notes: dict[str, Any] = {}
    if selection is not None and selection.best_epoch:
        notes["selection"] = {"epoch": selection.best_epoch, "mean": selection.best_mean,
                              "monitor": sel["monitor"], "window": sel["window"]}
        say(f"{spec.name}: kept epoch {selection.best_epoch} ({sel['monitor']} averaged over {sel['window']} "
            f"epochs {selection.best_mean:.4f})")
    if recipe.test_time_augmentation:
        best, notes["test_time_augmentation"] = choose_test_time_augmentation(
            spec, load_checkpoint(checkpoint), recipe.test_time_augmentation,
            preprocess.batch_stage(np.asarray(x_val), params), np.asarray(y_val),
            None if class_weights is None else class_weights[np.asarray(y_val)])
        best.save(checkpoint)
        say(f"{spec.name}: {notes['test_time_augmentation']['summary']}")
    if finalize is not None:
        best, finalized = finalize(spec, load_checkpoint(checkpoint),
                                   preprocess.batch_stage(np.asarray(x_val), params), np.asarray(y_val))
        best.save(checkpoint)
        notes.update(finalized)
        say(f"{spec.name}: {finalized.get('summary', finalized)}")
    history_path = out_dir / "history.json"
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    atomic_write_json(history_path, {"history": hist, "recipe": asdict(recipe), "device": device,
                                     "seconds": seconds, "seed": seed, "finalize": notes})
    say(f"{spec.name}: trained {len(hist.get('loss', []))} epochs in {seconds:.0f}s on {device}")
    return TrainResult(checkpoint=str(checkpoint), history=str(history_path), device=device,
                       epochs_run=len(hist.get("loss", [])), seconds=seconds, weights_init=weights)


def release_tensorflow_memory() -> None:
    """Drop the Keras graphs and traced functions of a model the caller has finished with.

    In a flow each model's process ends with it; a task called on its own (tests, a lone run) or a
    cross-validation's folds share one process, where earlier graphs would otherwise pile up.
    """
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()


def predict_split(fn, x: np.ndarray, params: dict[str, Any], batch_size: int = 16) -> np.ndarray:
    """``fn``'s probabilities for cached items ``x``, prepared batch by batch (``params``: their
    preprocessing; ``None`` when ``x`` is already model input)."""
    return np.concatenate([np.asarray(fn(x[i:i + batch_size] if params is None
                                         else preprocess.batch_stage(x[i:i + batch_size], params)))
                           for i in range(0, len(x), batch_size)])


def choose_test_time_augmentation(spec: ModelSpec, model, views: str, val_x: np.ndarray, val_y: np.ndarray,
                                  weights: np.ndarray | None = None):
    """``model`` or its test-time-augmented wrapper, whichever has the lower validation loss (a
    steadier guide than accuracy on a few dozen images; weighted per item like the training loss
    when ``weights`` is given), with both losses and accuracies."""
    from sklearn.metrics import log_loss

    from lung_models.export import probability_function
    from lung_models.models.blocks import with_test_time_augmentation

    shape = tuple(val_x.shape[1:])
    candidates = {"plain": model, "averaged": with_test_time_augmentation(model, shape, views)}
    loss, acc = {}, {}
    for key, candidate in candidates.items():
        fn = probability_function(candidate, spec.output, shape)
        probs = predict_split(fn, val_x, None)
        loss[key] = float(log_loss(val_y, np.clip(probs, 1e-7, 1), labels=list(range(probs.shape[1])),
                                   sample_weight=weights))
        acc[key] = float((probs.argmax(1) == val_y).mean())
    choice = "averaged" if loss["averaged"] < loss["plain"] else "plain"
    return candidates[choice], {
        "views": views, "validation_loss": loss, "validation_accuracy": acc, "used": choice == "averaged",
        "summary": f"test-time augmentation ({views}) validation loss {loss['averaged']:.4f} vs {loss['plain']:.4f} "
                   f"without: {'used' if choice == 'averaged' else 'not used'}"}


def load_checkpoint(path: str | Path):
    import keras

    from lung_models import registry

    registry.load_all()
    importlib.import_module(registry.KERAS_MODULE)  # registers the custom classes before deserialising
    # Our own checkpoints: a model wrapping a TF-Hub SavedModel (TFSMLayer) needs safe_mode off.
    return keras.models.load_model(path, safe_mode=False)


def history_of(path: str | Path) -> dict[str, list[float]]:
    return json.loads(Path(path).read_text())["history"]
