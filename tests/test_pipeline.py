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


def test_every_registered_model_has_test_settings():
    for name in registry.names():
        spec = registry.get(name).spec
        assert len(spec.test_input_shape) == len(spec.input_shape), name
        assert spec.test_input_shape[-1] == spec.input_shape[-1], name  # same channels
        assert all(t <= d for t, d in zip(spec.test_input_shape, spec.input_shape)), name


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
    assert card["input"]["shape"][1:] == list(registry.get(name).spec.test_input_shape)
    metrics = card["metrics"]
    assert 0 <= metrics["accuracy_ci95_wilson"][0] <= metrics["accuracy"] <= metrics["accuracy_ci95_wilson"][1]
    assert set(metrics["per_class"]) == set(card["model"]["class_names"])
    assert (path.parent / LATEST).read_text().strip() == path.name
    props = {p.key: p.value for p in onnx.load(str(path / "model.onnx")).metadata_props}
    assert props["model_name"] == name and props["version"] == card["version"]
    assert json.loads(props["class_names"]) == card["model"]["class_names"]
    assert json.loads(props["preprocessing"]) == card["preprocessing"]


@pytest.mark.parametrize("name", registry.names())
def test_onnx_file_reproduces_the_saved_keras_model(factory, name):
    """Independently of the export's own parity record: run the bundle's ONNX file and its Keras
    checkpoint on the same inputs and compare."""
    from lung_models import export, scoring, training

    bundle = load_bundle(factory["bundles"][name])
    model = training.load_checkpoint(bundle.path / "model.keras")
    x = np.random.default_rng(0).random((3, *bundle.card["input"]["shape"][1:]), dtype=np.float32)
    if bundle.preprocessing.get("scale") == 1.0:
        x *= 255  # models that rescale inside take 0-255 pixels
    keras_probs = export.probability_function(model, registry.get(name).spec.output, x.shape[1:])(x).numpy()
    onnx_probs = scoring.predict(scoring.open_model(bundle), x)
    assert np.isfinite(onnx_probs).all() and np.abs(onnx_probs - keras_probs).max() <= 1e-4
    np.testing.assert_allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-5)


def test_parity_check_fails_on_nan_and_on_disagreement():
    from lung_models.export import check_parity

    class Session:
        def __init__(self, out):
            self.out = out

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def run(self, _, feed):
            return [self.out]

    good = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)

    class Fn:
        def __call__(self, x):
            return type("T", (), {"numpy": lambda _self: good})()

    x = np.zeros((2, 4), dtype=np.float32)
    params = {"kind": "ct_volume"}
    assert check_parity(Fn(), Session(good), x, params)["passed"]
    assert not check_parity(Fn(), Session(np.full_like(good, np.nan)), x, params)["passed"]
    assert not check_parity(Fn(), Session(good[:, ::-1].copy()), x, params)["passed"]
    assert not check_parity(Fn(), Session(good + 2e-4), x, params)["passed"]


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


def make_incoming(folder: Path, shared: Path | None) -> dict[str, tuple[str, str]]:
    """Generated tiles, CT slices and volumes, corrupt files and (when present) real samples;
    returns ``{relative path: (input kind, expected status)}``."""
    from PIL import Image

    expected = {}
    for p in phantoms.write_incoming(folder / "generated", seed=5, n_tiles=3, n_volumes=1, corrupt=False,
                                     tile_size=256, in_plane=96, slices=40):
        kind = "ct_volume" if p.name.endswith(".nii.gz") else "histology_tile"
        expected[p.relative_to(folder).as_posix()] = (kind, "ok")
    for i, cls in enumerate(phantoms.CHEST_CLASSES):
        path = folder / "generated" / "slices" / f"slice_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(phantoms.ct_slice(cls, np.random.default_rng(i), size=256)).save(path)
        expected[path.relative_to(folder).as_posix()] = ("ct_slice", "ok")
    tile = next(p for p in (folder / "generated").glob("*.png"))
    jpg_bytes = next((folder / "generated").glob("*.jp*g")).read_bytes()
    bad = folder / "bad"
    bad.mkdir()
    vol = next(folder.rglob("*.nii.gz")).read_bytes()
    for name, data in CORRUPT.items():
        (bad / name).write_bytes(vol[: len(vol) // 3] if data is None else data)
        expected[f"bad/{name}"] = ("ct_volume" if ".nii" in name else "image", "rejected")
    (bad / "cut.png").write_bytes(tile.read_bytes()[:200])
    (bad / "cut.jpg").write_bytes(jpg_bytes[: len(jpg_bytes) // 4])
    expected["bad/cut.png"] = expected["bad/cut.jpg"] = ("image", "rejected")
    if shared is not None:
        real = folder / "real"
        real.mkdir()
        shutil.copy(shared / "nifti" / "example_ct.nii.gz", real / "example_ct.nii.gz")
        expected["real/example_ct.nii.gz"] = ("ct_volume", "ok")
        for cls in ("lung_aca", "lung_scc", "lung_n"):
            src = sorted((shared / "lc25000-lung-224" / cls).iterdir())[0]
            shutil.copy(src, real / src.name)
            expected[f"real/{src.name}"] = ("histology_tile", "ok")
        for src in sorted((shared / "chest-ct-4class" / "valid").rglob("*.png"))[::20]:
            shutil.copy(src, real / f"chest_{src.name.replace(' ', '_')}")
            expected[f"real/chest_{src.name.replace(' ', '_')}"] = ("ct_slice", "ok")
    return expected


def models_for(kind: str) -> set[str]:
    """A volume goes to the 3-D model and, as axial slices, to every 2-D CT model."""
    from lung_models.scoring import MODALITY_INPUTS

    return {n for n in registry.names() if kind in MODALITY_INPUTS[registry.get(n).spec.modality]}


def _score(factory, folder: Path, out: Path) -> pd.DataFrame:
    from flows.score import score_folder

    csv = score_folder(input_dir=str(folder), output_dir=str(out), exports_dir=str(factory["exports"]),
                       settle_seconds=0)
    assert Path(csv).parent == out and not list(out.glob(".*.tmp"))
    return pd.read_csv(csv, keep_default_na=False)


def check_report(df: pd.DataFrame, expected: dict[str, tuple[str, str]], factory, folder: Path) -> None:
    want = {(f, m) for f, (kind, _) in expected.items() for m in models_for(kind)}
    assert set(zip(df.relative_path, df.model)) == want and len(df) == len(want)  # one row per (file, model)
    for _, row in df.iterrows():
        bundle = load_bundle(factory["bundles"][row.model])
        assert row.status == expected[row.relative_path][1], (row.relative_path, row.model, row.error)
        if row.status == "ok":
            by_class = json.loads(row.probabilities)
            probs = [by_class[c] for c in bundle.class_names]
            assert abs(sum(probs) - 1) < 1e-4 and row.error == "" and row.precision == "fp32"
            assert row.predicted_class == bundle.class_names[int(np.argmax(probs))]
            assert abs(float(row.probability) - max(probs)) < 1e-6
            peaks = json.loads(row.max_probabilities)
            assert all(peaks[c] >= by_class[c] - 1e-6 for c in bundle.class_names)
        else:
            assert Path(row.relative_path).name in row.error and row.predicted_class == ""
        assert row.provider == "CPUExecutionProvider"
        assert row.model_version == bundle.version and row.bundle_sha256 == bundle.card["onnx_sha256"]
        assert row.file_sha256 == sha256_file(folder / row.relative_path)


def test_score_flow_scores_good_files_and_reports_bad_ones(factory, tmp_path, shared_data):
    folder = tmp_path / "incoming"
    expected = make_incoming(folder, shared_data)
    check_report(_score(factory, folder, tmp_path / "reports"), expected, factory, folder)


def test_score_flow_without_shared_data_still_scores_generated_and_corrupt(factory, tmp_path):
    folder = tmp_path / "incoming"
    expected = make_incoming(folder, None)
    check_report(_score(factory, folder, tmp_path / "reports"), expected, factory, folder)


def test_a_tampered_onnx_file_is_refused(factory, tmp_path):
    from lung_models import scoring

    bundle_dir = tmp_path / "b"
    shutil.copytree(factory["bundles"]["mosmed-3dcnn"], bundle_dir)
    with open(bundle_dir / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match"):
        scoring.open_model(load_bundle(bundle_dir))


def test_score_flow_survives_a_broken_graph_a_dangling_latest_and_a_huge_image(factory, tmp_path):
    from PIL import Image

    from flows.score import score_folder
    from lung_models.fileutil import atomic_write_json

    exports = tmp_path / "exports"
    shutil.copytree(factory["exports"], exports)
    # chest-cnn: a card whose hash matches a file ONNX Runtime cannot load.
    broken = latest_bundles(exports)["chest-cnn"]
    broken.onnx_path.write_bytes(b"not an onnx graph")
    atomic_write_json(broken.path / "model_card.json", {**broken.card, "onnx_sha256": sha256_file(broken.onnx_path)})
    # chest-chained: LATEST names a version that is gone.
    (exports / "chest-chained" / "LATEST").write_text("20000101T000000Z\n")
    folder = tmp_path / "incoming"
    folder.mkdir()
    Image.fromarray(phantoms.ct_slice("normal", np.random.default_rng(1), size=128)).save(folder / "slice.png")
    Image.new("L", (20000, 10000)).save(folder / "huge.png")  # > PIL's decompression-bomb limit
    csv = score_folder(input_dir=str(folder), output_dir=str(tmp_path / "out"), exports_dir=str(exports),
                       settle_seconds=0)
    df = pd.read_csv(csv, keep_default_na=False)
    assert "chest-chained" not in set(df.model)  # skipped with a logged error, not a crash
    cnn = df[df.model == "chest-cnn"]
    assert set(cnn.status) == {"error"} and all("model refused" in e for e in cnn.error)
    huge = df[(df.relative_path == "huge.png") & (df.model != "chest-cnn")]
    assert len(huge) > 0 and set(huge.status) == {"rejected"} and all("huge.png" in e for e in huge.error)
    ok = df[(df.relative_path == "slice.png") & (df.model != "chest-cnn")]
    assert len(ok) == 3 and set(ok.status) == {"ok"}  # resnet50, ensemble, ct-inception-hub


def test_score_flow_reports_a_refused_model_and_still_scores_with_the_others(factory, tmp_path):
    from flows.score import score_folder

    exports = tmp_path / "exports"
    shutil.copytree(factory["exports"], exports)
    tampered = latest_bundles(exports)["mosmed-3dcnn"].onnx_path
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    folder = tmp_path / "incoming"
    phantoms.write_incoming(folder, seed=9, n_tiles=2, n_volumes=1, corrupt=False, tile_size=256,
                            in_plane=64, slices=30)
    csv = score_folder(input_dir=str(folder), output_dir=str(tmp_path / "out"), exports_dir=str(exports),
                       settle_seconds=0)
    df = pd.read_csv(csv, keep_default_na=False)
    vol = df[df.model == "mosmed-3dcnn"]
    assert len(vol) == 1 and vol.status.iloc[0] == "error" and "does not match" in vol.error.iloc[0]
    tiles = df[df.model == "lc25000-cnn"]
    assert len(tiles) == 2 and set(tiles.status) == {"ok"}
    assert set(df[df.model != "mosmed-3dcnn"].status) == {"ok"}
