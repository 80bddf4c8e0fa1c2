"""Every data set the models learn from, described once: its classes and folder layout, where it can
come from (generated phantoms, Kaggle, URLs), how it is split and how to cite it.

A model's spec takes its data set from here, restricted with :meth:`DatasetSpec.subset` where the
model uses fewer classes (or documents another split); the phantom generator draws the same
classes into the same folders, as each data set ships them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetSpec:
    """A data set, its documented folder layout and where it can come from.

    ``layout`` maps each class name to the name of the folder that holds that class's files
    somewhere under the data set's root (searched recursively, so the archive's own top-level
    folders do not matter). ``sources`` maps a source kind (``generated``, ``url``, ``kaggle``,
    ``local``) to that source's configuration.
    """

    name: str
    layout: dict[str, str]
    sources: dict[str, dict[str, Any]]
    file_suffixes: tuple[str, ...]
    split: dict[str, Any]
    citation: str = ""
    # The class that means "no finding": a scan predicted as any other class is flagged in the
    # night's report.
    negative: str = ""

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.layout)

    def subset(self, classes: Sequence[str], *, name: str | None = None,
               split: dict[str, Any] | None = None) -> DatasetSpec:
        """This data set with only ``classes``, in that order (generated phantoms too), optionally
        under another name or with another split."""
        unknown = [c for c in classes if c not in self.layout]
        if unknown:
            raise ValueError(f"{self.name}: no class {unknown}; its classes are {', '.join(self.layout)}")
        sources = {kind: {**config, "classes": list(classes)} if kind == "generated" else dict(config)
                   for kind, config in self.sources.items()}
        return dataclasses.replace(self, name=name or self.name, layout={c: self.layout[c] for c in classes},
                                   negative=self.negative if self.negative in classes else "",
                                   sources=sources, split=self.split if split is None else split)


LC25000 = DatasetSpec(
    name="LC25000 (lung subset)",
    # In this order the classes seed the phantoms (by class index), so it is part of what a seed
    # generates; a model's subset lists its own order.
    layout={"lung_aca": "lung_aca", "lung_scc": "lung_scc", "lung_n": "lung_n"},
    negative="lung_n",  # benign lung tissue
    sources={"generated": {"kind": "lc25000"},
             "kaggle": {"slug": "andrewmvd/lung-and-colon-cancer-histopathological-images"}},
    file_suffixes=(".jpeg", ".jpg", ".png"),
    split={"train": 0.8, "val": 0.1, "test": 0.1, "seed": 1337},
    citation="Borkowski AA et al. Lung and Colon Cancer Histopathological Image Dataset (LC25000), 2019",
)
# The folder that holds LC25000's lung class folders, as the archive ships it.
LC25000_PARENT = "lung_image_sets"

MOSMED_RELEASE = "https://github.com/hasibzunair/3D-image-classification-tutorial/releases/download/v0.2"
MOSMED = DatasetSpec(
    name="MosMedData (CT-0 normal, CT-23 viral pneumonia)",
    # MosMedData keeps each severity grade in its own folder; the Keras 3D-CT example uses CT-0 (no
    # findings) as normal and CT-23 (grades 2-3) as abnormal.
    layout={"normal": "CT-0", "abnormal": "CT-23"},
    negative="normal",
    sources={
        "generated": {"kind": "mosmed"},
        # No sha256 is published for these archives; the downloader records the one it sees.
        "url": {"archives": [{"url": f"{MOSMED_RELEASE}/CT-0.zip", "sha256": None},
                             {"url": f"{MOSMED_RELEASE}/CT-23.zip", "sha256": None}]},
    },
    file_suffixes=(".nii", ".nii.gz"),
    # Documented: 70/30 train/validation per class, validation also used for the reported
    # accuracy. We hold out a separate test split so the reported number is unbiased.
    split={"train": 0.7, "val": 0.15, "test": 0.15, "seed": 1337},
    citation="Morozov SP et al. MosMedData: chest CT scans with COVID-19 related findings, 2020",
)

CHEST_CT = DatasetSpec(
    name="Chest CT-Scan images (Kaggle mohamedhanyyy/chest-ctscan-images)",
    # Sorted as image_dataset_from_directory sorts the class folders. train/valid folders carry TNM
    # suffixes, test uses the short names: match by prefix.
    layout={"adenocarcinoma": "adenocarcinoma*", "large.cell.carcinoma": "large.cell.carcinoma*",
            "normal": "normal*", "squamous.cell.carcinoma": "squamous.cell.carcinoma*"},
    negative="normal",
    citation="Mohamed Hany, Chest CT-Scan images Dataset, Kaggle (mohamedhanyyy/chest-ctscan-images)",
    sources={"generated": {"kind": "chest_ct"}, "kaggle": {"slug": "mohamedhanyyy/chest-ctscan-images"}},
    file_suffixes=(".png", ".jpg", ".jpeg"),
    # The data set ships its own splits; a copy without a test folder gets one carved from train.
    split={"folders": {"train": "train", "val": "valid", "test": "test"}, "seed": 1337,
           "carve": {"val": 0.1, "test": 0.2}},
)
# As shipped: Data/{train,valid,test}/<class folder>; the train and valid class folders carry the
# site and TNM stage in their names, the test folders are the bare class names.
CHEST_CT_PARENT = "Data"
CHEST_CT_STAGED_FOLDERS = {
    "adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib",
    "large.cell.carcinoma": "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
    "normal": "normal",
    "squamous.cell.carcinoma": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa",
}

CT_CANCER = DatasetSpec(
    name="Lung CT-Scan images (Kaggle orvile/ct-scan-images)",
    # Any of three lung cancers, or none.
    layout={"Cancerous": "Cancerous", "Non-Cancerous": "Non-Cancerous"},
    negative="Non-Cancerous",
    citation="Lung CT-Scan images, Kaggle (orvile/ct-scan-images)",
    sources={"generated": {"kind": "ct_cancer"}, "kaggle": {"slug": "orvile/ct-scan-images"}},
    file_suffixes=(".png", ".jpg", ".jpeg", ".bmp"),
    # Documented: 30% held out (random_state 42), 30% of that as test: about 70/21/9.
    split={"train": 0.70, "val": 0.21, "test": 0.09, "seed": 42},
)
# The folders above the class folders, nesting and capitals as shipped.
CT_CANCER_PARENTS = ("CT-Scan images", "CT-Scan images", "CT-Scan Images")

DATASETS = (LC25000, MOSMED, CHEST_CT, CT_CANCER)


def negative_class(class_names: Sequence[str]) -> str | None:
    """The "no finding" class of a model with these classes (a bundle's card names them), as its data
    set declares it; None for a model whose classes are all findings (lc25000-cnn: two cancer types)."""
    for dataset in DATASETS:
        if dataset.negative and dataset.negative in class_names:
            return dataset.negative
    return None
