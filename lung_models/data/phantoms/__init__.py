"""Generated stand-ins for the lung data sets: H&E tiles like LC25000, chest CT volumes like MosMedData
and axial chest CT slices with lung cancers like Kaggle's chest-ctscan-images and Lung CT-Scan images.

No real data set can be downloaded on the build machines, yet training, export and scoring need
inputs in the real formats with a class difference a small network can learn. The generators draw
the anatomy each class is defined by (acinar glands, keratinising nests, alveolar lace; ground-glass
opacities in the lungs; peripheral spiculated nodules, pleural masses, cavitated hilar masses) and
randomise everything else (stain, blur, noise, body habitus, spacing, display window), so that a
model has to learn shape rather than one pixel statistic.

Everything is deterministic given a ``numpy.random.Generator``; the dataset writers seed one per item
from ``(seed, class index, item index)`` so items are reproducible and independent of write order.

One module per thing drawn: ``tiles`` (H&E tiles), ``chest_volumes`` (CT volumes) and
``chest_slices`` (axial CT slices), both CT modules cutting the patient ``thorax`` draws, on the
random ``fields`` every phantom starts from; ``writers`` lays them out as the real data sets ship.
"""

from lung_models.data.phantoms.chest_slices import CANCER_CLASSES, CHEST_CLASSES, CT_WINDOWS, ct_slice
from lung_models.data.phantoms.chest_volumes import MOSMED_CLASSES, ct_volume
from lung_models.data.phantoms.tiles import LC25000_CLASSES, histology_tile
from lung_models.data.phantoms.writers import (
    CHEST_FOLDERS,
    CT_CANCER_FOLDERS,
    DATASET_KINDS,
    GENERATOR_VERSIONS,
    MOSMED_FOLDERS,
    write_dataset,
    write_incoming,
)

__all__ = ["CANCER_CLASSES", "CHEST_CLASSES", "CHEST_FOLDERS", "CT_CANCER_FOLDERS", "CT_WINDOWS", "DATASET_KINDS",
           "GENERATOR_VERSIONS", "LC25000_CLASSES", "MOSMED_CLASSES", "MOSMED_FOLDERS", "ct_slice", "ct_volume",
           "histology_tile", "write_dataset", "write_incoming"]
