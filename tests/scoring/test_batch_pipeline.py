"""The batch pipeline on fake models (no ONNX needed): decode once, share prepared arrays, one row per
(scan, model) with its aggregate, a bounded window under a slow model, the hash cache, fixed columns."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from lung_models.bundle import ModelBundle
from lung_models.data import dicom, dicom_writer, phantoms
from lung_models.registry import CT_SLICE, CT_SLICE_WINDOW, CT_VOLUME, HISTOLOGY_TILE
from lung_models.scoring import Ledger, decode, discover, pipeline, rows
from lung_models.scoring import discovery as discover_mod
from lung_models.scoring.runtime import LoadedModel

RGB_224 = {"kind": "rgb_image", "size": [64, 64], "scale": 1.0, "ct_window": CT_SLICE_WINDOW}
VOLUME = {"kind": "ct_volume", "hu_window": [-1000.0, 400.0], "rotate90": 1, "target_shape": [32, 32, 16],
          "zoom_order": 1}


class FakeSession:
    """Probabilities from the mean input value (so different inputs score differently), optionally slow."""

    def __init__(self, n_classes: int, delay: float = 0.0):
        self.n_classes, self.delay, self.batches = n_classes, delay, []

    def run(self, _outputs, feeds):
        (x,) = feeds.values()
        self.batches.append(len(x))
        time.sleep(self.delay)
        level = x.reshape(len(x), -1).mean(axis=1) / 255.0  # per item: batches must not change a score
        logits = np.stack([level * (k + 1) for k in range(self.n_classes)], axis=1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return [(e / e.sum(axis=1, keepdims=True)).astype(np.float32)]


def fake_model(name: str, modality: str, params: dict, classes=("a", "b", "c"), delay: float = 0.0) -> LoadedModel:
    card = {"model": {"name": name, "class_names": list(classes), "modality": modality}, "version": "v1",
            "preprocessing": params, "onnx_sha256": f"sha-{name}"}
    return LoadedModel(ModelBundle(Path("/nonexistent") / name, card), FakeSession(len(classes), delay),
                       "CPUExecutionProvider", "input", f"sha-{name}")


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "in"
    _png(folder / "slice.png", phantoms.ct_slice("normal", np.random.default_rng(1), size=96))
    _png(folder / "tile.png", phantoms.histology_tile("lung_aca", np.random.default_rng(2), 96))
    vol, affine = phantoms.ct_volume("normal", np.random.default_rng(3), in_plane=48, slices=12)
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), str(folder / "scan.nii.gz"))
    spacing = tuple(float(v) for v in np.abs(np.diag(affine)[:3]))
    dicom_writer.write_series(vol, spacing, folder / "series")
    lone = dicom_writer.write_series(vol[:, :, :1], spacing, folder / "lone")  # one slice: a scan of its own
    assert len(lone) == 1
    return folder


def _models() -> list[LoadedModel]:
    # Two 2-D CT models with one signature (they differ only in the per-batch scale), one with another
    # size, a tile model and the 3-D model.
    return [fake_model("ct-a", CT_SLICE, RGB_224), fake_model("ct-b", CT_SLICE, {**RGB_224, "scale": 1 / 255}),
            fake_model("ct-c", CT_SLICE, {**RGB_224, "size": [48, 48]}),
            fake_model("tiles", HISTOLOGY_TILE, {"kind": "rgb_image", "size": [64, 64], "scale": 1 / 255}),
            fake_model("vol", CT_VOLUME, VOLUME, classes=("normal", "abnormal"))]


def _jobs(folder: Path, models: list[LoadedModel]) -> list[pipeline.Job]:
    from lung_models.scoring.items import takes

    return [pipeline.Job(i, [m for m in models if takes(m.bundle.modality, i)]) for i in discover(folder).items]


def test_each_item_is_decoded_once_for_every_model_and_gets_one_row_per_model(mixed_folder):
    calls: dict[str, int] = {}
    prepared: dict[str, int] = {}

    def counting_decoder(item, root):
        calls[item.key] = calls.get(item.key, 0) + 1
        decoded = decode.decode(item, root)
        real_prepare = decoded.prepared.__setitem__

        def count_prepare(sig, value):
            prepared[item.key] = prepared.get(item.key, 0) + 1
            real_prepare(sig, value)
        decoded.prepared = _CountingDict(count_prepare)
        return decoded

    models = _models()
    jobs = _jobs(mixed_folder, models)
    out = [r for batch in pipeline.score(jobs, mixed_folder, decoder=counting_decoder, batch_size=4) for r in batch]
    assert calls == {"slice.png": 1, "tile.png": 1, "scan.nii.gz": 1, "series": 1, "lone/IM000001.dcm": 1}
    # ct-a and ct-b share one prepared array; ct-c another; the 3-D model its own.
    assert prepared == {"slice.png": 2, "tile.png": 1, "scan.nii.gz": 3, "series": 3, "lone/IM000001.dcm": 2}
    by = {(r["relative_path"], r["model"]): r for r in out}
    assert len(by) == len(out)  # one row per (scan, model)
    ct = {"ct-a", "ct-b", "ct-c"}
    assert {m for p, m in by if p == "series"} == ct | {"vol"} == {m for p, m in by if p == "scan.nii.gz"}
    assert {m for p, m in by if p == "slice.png"} == ct and {m for p, m in by if p == "tile.png"} == {"tiles"}
    assert all(r["status"] == "ok" for r in out), [r["error"] for r in out if r["status"] != "ok"]
    assert by[("series", "ct-a")]["n_inputs"] == 12 and by[("series", "vol")]["n_inputs"] == 1
    assert by[("scan.nii.gz", "ct-a")]["n_inputs"] == 12 and by[("slice.png", "ct-a")]["n_inputs"] == 1
    # The series and the NIfTI of the same volume show the 2-D models the same slices.
    assert by[("series", "ct-c")]["max_probabilities"] == by[("scan.nii.gz", "ct-c")]["max_probabilities"]


class _CountingDict(dict):
    def __init__(self, on_set):
        super().__init__()
        self._on_set = on_set

    def __setitem__(self, key, value):
        self._on_set(key, value)
        super().__setitem__(key, value)


def test_a_scan_row_aggregates_its_slices():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    got = rows.prediction(["normal", "tumour"], probs)
    assert got["predicted_class"] == "normal" and got["probability"] == pytest.approx(0.6)
    assert json.loads(got["probabilities"]) == pytest.approx({"normal": 0.6, "tumour": 0.4})
    assert json.loads(got["max_probabilities"]) == {"normal": 0.9, "tumour": 0.8}
    assert json.loads(got["max_slice"]) == {"normal": 0, "tumour": 1} and got["n_inputs"] == 3
    one = rows.prediction(["normal", "tumour"], probs[1:2])
    assert one["probabilities"] == one["max_probabilities"] and one["predicted_class"] == "tumour"


def test_the_decode_window_stays_bounded_under_a_slow_model(tmp_path):
    folder = tmp_path / "in"
    for i in range(40):
        _png(folder / f"t{i:02d}.png", phantoms.histology_tile("lung_n", np.random.default_rng(i), 48))
    slow = fake_model("tiles", HISTOLOGY_TILE, {"kind": "rgb_image", "size": [48, 48], "scale": 1 / 255},
                      delay=0.05)
    stats = pipeline.PipelineStats()
    jobs = _jobs(folder, [slow])
    out = [r for b in pipeline.score(jobs, folder, batch_size=4, workers=2, prefetch=3, stats=stats) for r in b]
    assert len(out) == 40 and stats.decoded == stats.finished == 40
    # At most the window (3) plus one batch being filled (4) wait for inference, never the folder.
    assert 0 < stats.max_ahead <= 3 + 4, stats.max_ahead
    assert slow.session.batches and max(slow.session.batches) <= 4


def test_a_series_that_is_no_volume_is_still_slices_for_2d_models(tmp_path):
    folder = tmp_path / "in"
    vol, affine = phantoms.ct_volume("normal", np.random.default_rng(3), in_plane=48, slices=12)
    files = dicom_writer.write_series(vol, tuple(float(v) for v in np.abs(np.diag(affine)[:3])), folder / "series")
    files[5].unlink()  # a gap: no volume
    models = _models()
    out = {r["model"]: r for b in pipeline.score(_jobs(folder, models), folder) for r in b}
    assert out["vol"]["status"] == "rejected" and "missing" in out["vol"]["error"]
    assert out["ct-a"]["status"] == "ok" and out["ct-a"]["n_inputs"] == 11


def test_a_model_without_a_ct_window_is_an_error_for_ct_input_only(mixed_folder):
    no_window = fake_model("old-ct", CT_SLICE, {k: v for k, v in RGB_224.items() if k != "ct_window"})
    out = {r["relative_path"]: r for b in pipeline.score(_jobs(mixed_folder, [no_window]), mixed_folder) for r in b}
    assert out["slice.png"]["status"] == "ok"
    assert out["series"]["status"] == out["lone/IM000001.dcm"]["status"] == "error"
    assert "ct_window" in out["series"]["error"]


def test_unchanged_files_are_not_read_again_the_next_night(mixed_folder, tmp_path, monkeypatch):
    hashed: list[str] = []
    real = discover_mod.sha256_file
    monkeypatch.setattr(discover_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    with Ledger(tmp_path / "out") as ledger:
        first = discover(mixed_folder, cache=ledger)
        n_files = len([p for p in mixed_folder.rglob("*") if p.is_file()])
        assert first.hashed == n_files == len(hashed) and first.cached == 0
        hashed.clear()
        header_reads = threading.local()
        header_reads.n = 0
        real_group = dicom.group_series

        def counting_group(paths, known=None):
            header_reads.n += len(set(paths) - set(known or {}))
            return real_group(paths, known=known)

        monkeypatch.setattr(discover_mod.dicom, "group_series", counting_group)
        again = discover(mixed_folder, cache=ledger)
        assert hashed == [] and again.cached == n_files and header_reads.n == 0
        assert [i.as_dict() for i in again.items] == [i.as_dict() for i in first.items]
        # A changed file is hashed again (and only it).
        _png(mixed_folder / "slice.png", phantoms.ct_slice("adenocarcinoma", np.random.default_rng(9), size=96))
        third = discover(mixed_folder, cache=ledger)
        assert hashed == ["slice.png"] and third.hashed == 1
        changed = {i.key: i.sha256 for i in third.items}
        assert changed["slice.png"] != {i.key: i.sha256 for i in first.items}["slice.png"]


def test_scoring_sessions_share_one_cpu_arena_and_fix_their_threads():
    """Each session's own arena would keep its largest working set for the night, so eight models
    held eight peaks; the scorer's sessions draw on one arena registered for the process."""
    from lung_models.scoring import runtime

    options = runtime.session_options(intra_op_threads=3)
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert runtime.session_options().get_session_config_entry("session.use_env_allocators") == "1"  # registered once
