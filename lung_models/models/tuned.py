"""What the ``tuned`` profiles share: the documented networks, trained the way a careful
practitioner trains on a few hundred medical images (``--profile tuned``).

Nothing here changes a layer, a size or the input contract, so a tuned bundle scores exactly like
a documented one. Per family the profile adds:

- a learning-rate warm-up, then a cosine decay (``warmup_cosine``);
- selection by validation loss averaged over three epochs, with patience, instead of the best
  single epoch (``selection``); the documented early stopping and plateau callbacks are off;
- augmentation in the data pipeline, suited to the images (:mod:`lung_models.augment`): CT slices
  turn, shift, scale and change contrast a little; H&E tiles flip, turn and change stain. The
  models' own augmentation layers (training-only) are off where the pipeline augments, so nothing
  is augmented twice;
- CT slices in grey (``preprocessing: colour grey``): the exports mix grey, RGB and RGBA files,
  some with coloured marks, and DICOM slices are grey;
- a loss weighted per class inversely to its frequency (``class_weight: balanced``);
- for H&E tiles, test-time augmentation: the model averaged over flipped views of its input,
  kept only when that lowers the validation loss (the card says which);
- an exponential moving average of the weights is what is validated, kept and exported
  (``weight_averaging``), for the networks whose BatchNorm statistics (if any) do not depend on
  the trained weights: no BatchNorm (chest-cnn, lc25000-cnn, the ensemble's combiner), or one
  right after a frozen backbone (chest-resnet50, chest-chained). Elsewhere (mixed7's head, the
  fine-tuned TF-Hub module, the 3-D CNN) the averaged weights would meet moving statistics
  gathered for other weights, so those do without.

Each family module states its epochs, batch size and what else differs, and why.
"""

from __future__ import annotations

from typing import Any

from lung_models.augment import DEFAULTS as AUGMENTATION_DEFAULTS

WARMUP_COSINE = {"kind": "warmup_cosine", "warmup_epochs": 2, "alpha": 0.01}
SELECTION = {"monitor": "val_loss", "window": 3, "patience": 8}
# Turns off the documented run's callbacks that the selection replaces.
NO_DOCUMENTED_CALLBACKS = {"early_stopping": None, "reduce_lr": None, "stop_above": None}
COMMON: dict[str, Any] = {"lr_schedule": WARMUP_COSINE, "selection": SELECTION, **NO_DOCUMENTED_CALLBACKS}
# An average over about one epoch of steps: long enough to smooth a small data set's noisy
# gradients, short enough not to drag the early, poor weights along.
AVERAGING = {"over_epochs": 1.0}

# Augmentation options are spelled out (the augmentation module's defaults), so the card records them.
CT_SLICE: dict[str, Any] = {**COMMON, "preprocessing": {"colour": "grey"}, "class_weight": "balanced",
                            "augmentation": {"kind": "ct_slice", **AUGMENTATION_DEFAULTS["ct_slice"]}}
HE_TILE: dict[str, Any] = {**COMMON, "class_weight": "balanced",
                           "augmentation": {"kind": "he_tile", **AUGMENTATION_DEFAULTS["he_tile"]},
                           "test_time_augmentation": "flips"}
# For builders with augmentation layers of their own: the pipeline augments instead.
PIPELINE_AUGMENTS = {"build_options": {"in_model_augmentation": False}}
