"""The whole chain on small generated data: train flow → bundle → score flow → CSV.

Models train for two epochs on small inputs (the architectures are the documented ones, only the
input size shrinks) so the suite stays fast; the demo and the benchmark scripts measure accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from lung_models import registry
from lung_models.bundle import LATEST, BundleError, latest_bundles, load_bundle
from lung_models.data import datasets, phantoms
from lung_models.fileutil import sha256_file

# Small inputs per model: the 3D CNN needs at least 46 voxels a side for its four conv/pool blocks.
TEST_INPUT = {"lc25000-cnn": [64, 64, 3], "mosmed-3dcnn": [48, 48, 48, 1]}
TEST_DATA = {"lc25000-cnn": ("lc25000", {"size": 96, "classes": ["lung_aca", "lung_scc"]}, 16),
             "mosmed-3dcnn": ("mosmed", {"in_plane": 64, "slices": (30, 36)}, 10)}


def test_every_registered_model_has_test_settings():
    assert set(TEST_INPUT) == set(registry.names())


@pytest.fixture(scope="session")
def factory(prefect_harness, tmp_path_factory):
    """Train and export every registered model once for the whole session (two epochs, small)."""
    from flows.train import train_models

    root = tmp_path_factory.mktemp("factory")
    bundles = {}
    for name in registry.names():
        kind, params, n = TEST_DATA[name]
        data_dir = root / "data" / name
        phantoms.write_dataset(kind, data_dir, n, seed=7, **params)
        bundles.update(train_models(models=[name], profile="full", source="local", data_dir=str(data_dir),
                                    exports_dir=str(root / "exports"), work_dir=str(root / "work"),
                                    epochs=2, batch_size=4, input_shape={name: TEST_INPUT[name]}))
    return {"root": root, "exports": root / "exports", "bundles": bundles}


@pytest.mark.parametrize("name", registry.names())
def test_model_trains_exports_and_onnx_matches_keras(factory, name):
    path = Path(factory["bundles"][name])
    bundle = load_bundle(path)
    for f in ("model.onnx", "model_card.json", "metrics.json", "split_manifest.json", "history.json",
              "training_curves.png", "confusion_matrix.png", "model.keras"):
        assert (path / f).is_file(), f
    card = bundle.card
    assert card["parity"]["passed"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert card["parity"]["class_mismatches"] == 0 and card["parity"]["items"] == card["metrics"]["n"] > 0
    assert card["onnx_sha256"] == sha256_file(path / "model.onnx")
    assert card["model"]["class_names"] == list(registry.get(name).spec.class_names)
    assert card["training"]["device"] in ("CPU",) or card["training"]["device"].startswith("GPU")
    assert card["data"]["provenance"]["kind"] == "local"
    assert card["input"]["shape"][1:] == TEST_INPUT[name]
    metrics = card["metrics"]
    assert 0 <= metrics["accuracy_ci95_wilson"][0] <= metrics["accuracy"] <= metrics["accuracy_ci95_wilson"][1]
    assert set(metrics["per_class"]) == set(card["model"]["class_names"])
    assert (path.parent / LATEST).read_text().strip() == path.name
    props = {p.key: p.value for p in onnx.load(str(path / "model.onnx")).metadata_props}
    assert props["model_name"] == name and props["version"] == card["version"]
    assert json.loads(props["class_names"]) == card["model"]["class_names"]
    assert json.loads(props["preprocessing"]) == card["preprocessing"]


@pytest.mark.parametrize("name", registry.names())
def test_split_manifest_has_disjoint_splits(factory, name):
    manifest = json.loads((Path(factory["bundles"][name]) / "split_manifest.json").read_text())
    seen = [e["sha256"] for split in ("train", "val", "test") for e in manifest["splits"][split]]
    assert len(seen) == len(set(seen)) > 0


def test_a_second_export_is_a_new_version_and_latest_moves(factory, tmp_path):
    from lung_models import export, training
    from lung_models.data.datasets import PreparedData

    src = Path(factory["bundles"]["lc25000-cnn"])
    exports = tmp_path / "exports"
    shutil.copytree(src.parent, exports / "lc25000-cnn")
    spec = registry.get("lc25000-cnn").spec
    data = PreparedData(Path(load_bundle(src).card["data"]["cache"]))
    model = training.load_checkpoint(src / "model.keras")
    new = export.export_bundle(spec, model, test_x=data.arrays("test")[0], params=data.manifest["preprocessing"],
                               exports_root=exports, card_extra={"weights_init": "random"}, files={},
                               progress=lambda m: None)
    assert new.name != src.name and (exports / "lc25000-cnn" / src.name / "model.onnx").is_file()
    assert latest_bundles(exports)["lc25000-cnn"].path == new

    # A failed parity check is loud and leaves no bundle behind.
    before = sorted(p.name for p in (exports / "lc25000-cnn").iterdir())
    original = export.PARITY_ATOL
    export.PARITY_ATOL = -1.0
    try:
        with pytest.raises(export.ParityError, match="bundle not written"):
            export.export_bundle(spec, model, test_x=data.arrays("test")[0],
                                 params=data.manifest["preprocessing"], exports_root=exports,
                                 card_extra={}, files={}, progress=lambda m: None)
    finally:
        export.PARITY_ATOL = original
    assert sorted(p.name for p in (exports / "lc25000-cnn").iterdir()) == before


def test_generated_source_loads_into_the_documented_layout(tmp_path):
    from lung_models.data.sources import source_from_config

    spec = registry.get("lc25000-cnn").spec
    src = source_from_config("generated", {"kind": "lc25000", "n_per_class": 6, "seed": 1,
                                           "params": {"size": 64, "classes": list(spec.class_names)}})
    root = src.fetch(tmp_path)
    items = datasets.find_items(root, spec.dataset, spec.class_names)
    assert len(items) == 12 and {i.label for i in items} == {0, 1}
    prepared = datasets.prepare(spec, root, tmp_path / "cache", input_shape=(32, 32, 3))
    x, y = prepared.arrays("train")
    assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) and len(x) == len(y)
    again = datasets.prepare(spec, root, tmp_path / "cache", input_shape=(32, 32, 3))
    assert again.folder == prepared.folder


def test_missing_class_folder_is_a_clear_error(tmp_path):
    spec = registry.get("lc25000-cnn").spec
    (tmp_path / "lung_aca").mkdir()
    with pytest.raises(datasets.DatasetLayoutError, match="lung_scc"):
        datasets.find_items(tmp_path, spec.dataset, spec.class_names)


# ------------------------------------------------------------------------------------- scoring
CORRUPT = {
    "empty.png": b"",
    "notes.png": b"this is a text file, not an image\n",
    "truncated_scan.nii.gz": None,  # filled from a real volume below
    "garbage.nii": b"\x00\x01garbage" * 20,
}


def make_incoming(folder: Path, shared: Path | None) -> dict[str, str]:
    """Generated tiles and volumes, corrupt files and (when present) real samples; returns the
    expected status of every file."""
    expected = {}
    for p in phantoms.write_incoming(folder / "generated", seed=5, n_tiles=3, n_volumes=1, corrupt=False):
        expected[p.relative_to(folder).as_posix()] = "ok"
    tile = next(p for p in folder.rglob("*.png"))
    jpg_bytes = next(p for p in folder.rglob("*.jp*g")).read_bytes() if any(folder.rglob("*.jp*g")) else None
    bad = folder / "bad"
    bad.mkdir()
    vol = next(folder.rglob("*.nii.gz")).read_bytes()
    for name, data in CORRUPT.items():
        (bad / name).write_bytes(vol[: len(vol) // 3] if data is None else data)
        expected[f"bad/{name}"] = "error"
    (bad / "cut.png").write_bytes(tile.read_bytes()[:200])
    expected["bad/cut.png"] = "error"
    if jpg_bytes:
        (bad / "cut.jpg").write_bytes(jpg_bytes[: len(jpg_bytes) // 4])
        expected["bad/cut.jpg"] = "error"
    if shared is not None:
        real = folder / "real"
        real.mkdir()
        shutil.copy(shared / "nifti" / "example_ct.nii.gz", real / "example_ct.nii.gz")
        expected["real/example_ct.nii.gz"] = "ok"
        for cls in ("lung_aca", "lung_scc", "lung_n"):
            src = sorted((shared / "lc25000-lung-224" / cls).iterdir())[0]
            shutil.copy(src, real / src.name)
            expected[f"real/{src.name}"] = "ok"
    return expected


def _score(factory, folder: Path, out: Path) -> pd.DataFrame:
    from flows.score import score_folder

    csv = score_folder(input_dir=str(folder), output_dir=str(out), exports_dir=str(factory["exports"]))
    assert Path(csv).parent == out and not list(out.glob(".*.tmp"))
    return pd.read_csv(csv, keep_default_na=False)


def test_score_flow_scores_good_files_and_reports_bad_ones(factory, tmp_path, shared_data):
    folder = tmp_path / "incoming"
    expected = make_incoming(folder, shared_data)
    df = _score(factory, folder, tmp_path / "reports")

    kinds = {"image": "lc25000-cnn", "volume": "mosmed-3dcnn"}
    want = {(f, kinds["volume" if f.endswith((".nii", ".nii.gz")) else "image"]) for f in expected}
    assert set(zip(df.relative_path, df.model)) == want and len(df) == len(want)  # one row per (file, model)
    for _, row in df.iterrows():
        assert row.status == expected[row.relative_path], (row.relative_path, row.error)
        if row.status == "ok":
            probs = [float(row[c]) for c in df.columns if c.startswith("prob_") and row[c] != ""]
            assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-4
            assert row.predicted_class in load_bundle(factory["bundles"][row.model]).class_names
            assert row.error == ""
        else:
            assert Path(row.relative_path).name in row.error and row.predicted_class == ""
        assert row.provider == "CPUExecutionProvider"
        assert row.model_version == load_bundle(factory["bundles"][row.model]).version
        if row.relative_path != "bad/empty.png":
            assert row.file_sha256 == sha256_file(folder / row.relative_path)


def test_score_flow_without_shared_data_still_scores_generated_and_corrupt(factory, tmp_path):
    folder = tmp_path / "incoming"
    expected = make_incoming(folder, None)
    df = _score(factory, folder, tmp_path / "reports")
    assert dict(zip(df.relative_path, df.status)) == expected


def test_a_tampered_onnx_file_is_refused(factory, tmp_path):
    from lung_models import scoring

    bundle_dir = tmp_path / "b"
    shutil.copytree(factory["bundles"]["mosmed-3dcnn"], bundle_dir)
    with open(bundle_dir / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match"):
        scoring.open_model(load_bundle(bundle_dir))


def test_score_flow_reports_a_refused_model_and_still_scores_with_the_others(factory, tmp_path):
    from flows.score import score_folder

    exports = tmp_path / "exports"
    shutil.copytree(factory["exports"], exports)
    tampered = latest_bundles(exports)["mosmed-3dcnn"].onnx_path
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    folder = tmp_path / "incoming"
    phantoms.write_incoming(folder, seed=9, n_tiles=2, n_volumes=1, corrupt=False, tile_size=128,
                            in_plane=64, slices=30)
    csv = score_folder(input_dir=str(folder), output_dir=str(tmp_path / "out"), exports_dir=str(exports))
    df = pd.read_csv(csv, keep_default_na=False)
    vol = df[df.model == "mosmed-3dcnn"]
    assert len(vol) == 1 and vol.status.iloc[0] == "error" and "does not match" in vol.error.iloc[0]
    tiles = df[df.model == "lc25000-cnn"]
    assert len(tiles) == 2 and set(tiles.status) == {"ok"}
