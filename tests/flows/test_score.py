"""The score flow on the factory's bundles: generated, corrupt and (when present) real files to one
CSV row per (file, model), and what it does with a broken graph, a dangling LATEST or a refused model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from lung_models import registry
from lung_models.bundle import latest_bundles, load_bundle
from lung_models.data import phantoms
from lung_models.fileutil import sha256_file

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


def _run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run_id])))]


# The scorer reads only the card and the ONNX graphs; the Keras files and plots are most of a copy.
SCORER_UNUSED = shutil.ignore_patterns("*.keras", "*.png")


def test_score_flow_survives_a_broken_graph_a_dangling_latest_and_a_huge_image(factory, tmp_path):
    from PIL import Image

    from flows.score import score_folder
    from lung_models.fileutil import atomic_write_json

    exports = tmp_path / "exports"
    shutil.copytree(factory["exports"], exports, ignore=SCORER_UNUSED)
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
    state = score_folder(input_dir=str(folder), output_dir=str(tmp_path / "out"), exports_dir=str(exports),
                         settle_seconds=0, return_state=True)
    df = pd.read_csv(state.result(), keep_default_na=False)
    assert "chest-chained" not in set(df.model)  # skipped with a logged error, not a crash
    # ... logged by the library (lung_models.bundle), and that line reached the flow run in Prefect.
    assert any("skipping" in m and "chest-chained" in m for m in _run_logs(state.state_details.flow_run_id))
    cnn = df[df.model == "chest-cnn"]
    assert set(cnn.status) == {"error"} and all("model refused" in e for e in cnn.error)
    huge = df[(df.relative_path == "huge.png") & (df.model != "chest-cnn")]
    assert len(huge) > 0 and set(huge.status) == {"rejected"} and all("huge.png" in e for e in huge.error)
    ok = df[(df.relative_path == "slice.png") & (df.model != "chest-cnn")]
    assert len(ok) == 3 and set(ok.status) == {"ok"}  # resnet50, ensemble, ct-inception-hub


def test_score_flow_reports_a_refused_model_and_still_scores_with_the_others(factory, tmp_path):
    from flows.score import score_folder

    exports = tmp_path / "exports"
    shutil.copytree(factory["exports"], exports, ignore=SCORER_UNUSED)
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


def test_the_night_scores_promoted_bundles_and_the_demo_also_the_others_marked(factory, tmp_path):
    from PIL import Image

    from flows.score import score_folder

    exports = tmp_path / "exports"
    shutil.copytree(factory["exports"], exports, ignore=SCORER_UNUSED)
    (exports / "chest-cnn" / "LATEST").unlink()  # exported, never promoted
    folder = tmp_path / "incoming"
    folder.mkdir()
    Image.fromarray(phantoms.ct_slice("normal", np.random.default_rng(3), size=128)).save(folder / "slice.png")

    nightly = pd.read_csv(score_folder(input_dir=str(folder), output_dir=str(tmp_path / "nightly"),
                                       exports_dir=str(exports), settle_seconds=0), keep_default_na=False)
    assert "chest-cnn" not in set(nightly.model) and len(nightly) == 4  # the other 2-D CT models
    assert set(nightly.promoted) == {"yes"}

    demo = pd.read_csv(score_folder(input_dir=str(folder), output_dir=str(tmp_path / "demo"), exports_dir=str(exports),
                                    settle_seconds=0, include_unpromoted=True), keep_default_na=False)
    cnn = demo[demo.model == "chest-cnn"]
    assert len(cnn) == 1 and cnn.promoted.iloc[0] == "no" and cnn.status.iloc[0] == "ok"
    assert set(demo[demo.model != "chest-cnn"].promoted) == {"yes"}
