"""The data-set catalog: each data set described once, and what the specs and phantoms take from it."""

import pytest

from lung_models import registry
from lung_models.data import catalog, phantoms


def test_every_model_learns_from_a_catalog_data_set_or_a_subset_of_one():
    for name in registry.names():
        spec = registry.get(name).spec
        (whole,) = [d for d in catalog.DATASETS if d.sources["generated"]["kind"]
                    == spec.dataset.sources["generated"]["kind"]]
        assert spec.class_names == spec.dataset.classes
        assert set(spec.dataset.classes) <= set(whole.classes)
        assert all(spec.dataset.layout[c] == whole.layout[c] for c in spec.dataset.classes)
        assert spec.dataset.file_suffixes == whole.file_suffixes


def test_a_subset_keeps_its_classes_order_for_the_layout_and_the_phantoms():
    subset = catalog.LC25000.subset(("lung_n", "lung_aca"), name="two", split={"seed": 3})
    assert subset.classes == ("lung_n", "lung_aca") and subset.name == "two" and subset.split == {"seed": 3}
    assert subset.sources["generated"] == {"kind": "lc25000", "classes": ["lung_n", "lung_aca"]}
    assert subset.sources["kaggle"] == catalog.LC25000.sources["kaggle"]
    assert "classes" not in catalog.LC25000.sources["generated"]  # the catalog entry is left as it was
    with pytest.raises(ValueError, match="no class \\['lung_x'\\]"):
        catalog.LC25000.subset(("lung_x",))


def test_the_phantoms_draw_every_catalog_data_set_with_its_classes():
    for dataset in catalog.DATASETS:
        kind = dataset.sources["generated"]["kind"]
        assert kind in phantoms.DATASET_KINDS and kind in phantoms.GENERATOR_VERSIONS
    assert phantoms.LC25000_CLASSES == catalog.LC25000.classes
    assert phantoms.MOSMED_FOLDERS == catalog.MOSMED.layout
    assert phantoms.CHEST_CLASSES == catalog.CHEST_CT.classes == tuple(catalog.CHEST_CT_STAGED_FOLDERS)
    assert phantoms.CANCER_CLASSES == catalog.CT_CANCER.classes
