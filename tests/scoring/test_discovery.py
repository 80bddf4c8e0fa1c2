"""Discovery: incoming files that would be scored as the wrong kind, crash on their name alone,
block the night (pipes, links) or have a DICOM series scored short."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lung_models import scoring
from lung_models.data import dicom, dicom_writer, phantoms

SLICE = phantoms.ct_slice("normal", np.random.default_rng(1), size=128)


def test_a_ct_slice_with_a_burnt_in_ruler_is_still_a_ct_slice_and_a_sparse_tile_still_a_tile(tmp_path):
    ruler = np.repeat(SLICE[..., None], 3, axis=2)
    ruler[4:8, 4:124] = (255, 0, 0)  # about 3% of the pixels
    Image.fromarray(ruler).save(tmp_path / "ruler.png")
    tile = phantoms.histology_tile("lung_n", np.random.default_rng(3), 128)
    Image.fromarray(tile).save(tmp_path / "tile.png")
    edge = np.full_like(tile, 245)  # a tile at the tissue's edge: 10% tissue, the rest bare glass
    edge[:, :13] = tile[:, :13]
    Image.fromarray(edge).save(tmp_path / "edge.png")
    assert scoring.input_kind(tmp_path / "ruler.png") == "ct_slice"
    assert scoring.input_kind(tmp_path / "tile.png") == "histology_tile"
    assert scoring.input_kind(tmp_path / "edge.png") == "histology_tile"


def test_a_name_that_is_not_utf8_is_refused_by_name_not_a_crash(tmp_path):
    Image.fromarray(SLICE).save(tmp_path / "ok.png")
    (tmp_path / "slice_\udce9.png").write_bytes((tmp_path / "ok.png").read_bytes())
    found = {i.key: i for i in scoring.discover(tmp_path).items}
    assert set(found) == {"ok.png", "slice_\\xe9.png"}
    bad = found["slice_\\xe9.png"]
    assert bad.refusal_status == "rejected" and "not valid UTF-8" in bad.refusal
    bad.key.encode("utf-8")  # what SQLite and the CSV need


def test_a_series_with_an_unreadable_slice_in_its_folder_is_rejected_not_scored_short(tmp_path):
    vol, affine = phantoms.ct_volume("normal", np.random.default_rng(4), in_plane=32, slices=10)
    files = dicom_writer.write_series(vol, tuple(float(v) for v in np.abs(np.diag(affine)[:3])), tmp_path / "series")
    files[-1].write_bytes(b"")  # the last slice arrived empty
    series = [i for i in scoring.discover(tmp_path).items if i.file_kind == "dicom_series"]
    assert len(series) == 1 and series[0].refusal_status == "rejected", series
    assert f"{files[-1].name} in its folder cannot be read as DICOM" in series[0].refusal
    assert Path(series[0].files[-1]).name == files[-1].name  # its hash covers the broken file too


def _series_in(folder: Path, seed: int = 4) -> list[Path]:
    vol, affine = phantoms.ct_volume("normal", np.random.default_rng(seed), in_plane=32, slices=10)
    return dicom_writer.write_series(vol, tuple(float(v) for v in np.abs(np.diag(affine)[:3])), folder)


def test_a_non_utf8_pipe_or_outside_link_is_neither_opened_nor_waited_on(tmp_path):
    import os
    import threading

    folder, outside = tmp_path / "in", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    Image.fromarray(SLICE).save(outside / "secret.png")
    os.mkfifo(folder / "pipe_\udcff")  # extensionless: discovery would open it to look for a DICOM preamble
    os.mkfifo(folder / "pipe_\udcff.dcm")
    (folder / "link_\udcff.png").symlink_to(outside / "secret.png")
    result: dict[str, list] = {}
    worker = threading.Thread(target=lambda: result.update(items=scoring.discover(folder).items), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # release the blocked open() so the test run itself can end
        for name in ("pipe_\udcff", "pipe_\udcff.dcm"):
            os.close(os.open(folder / name, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("discovery blocked on a named pipe")
    found = {i.key: i for i in result["items"]}
    assert set(found) == {"pipe_\\xff.dcm", "link_\\xff.png"}
    assert "not a regular file" in found["pipe_\\xff.dcm"].refusal
    assert "outside the input folder" in found["link_\\xff.png"].refusal


def _series_items(root: Path) -> list:
    return [i for i in scoring.discover(root).items if i.file_kind == "dicom_series"]


def test_a_dicomdir_beside_a_series_does_not_hold_it_back(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    files = _series_in(tmp_path / "cd")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dicom.MEDIA_STORAGE_DIRECTORY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    directory = Dataset()
    directory.file_meta = meta
    directory.FileSetID = "CD"
    directory.DirectoryRecordSequence = []
    directory.save_as(tmp_path / "cd" / "DICOMDIR", enforce_file_format=True)
    series = _series_items(tmp_path)
    assert len(series) == 1 and not series[0].refusal and len(series[0].files) == len(files)


def test_a_slice_cut_short_before_its_uids_still_holds_its_series_back(tmp_path):
    import pydicom

    files = _series_in(tmp_path / "series")
    ds = pydicom.dcmread(files[-1])
    for tag in list(ds.keys()):  # what is left of a file cut at the element before (0020,000D)
        if tag >= 0x0020000D:
            del ds[tag]
    ds.save_as(files[-1])
    (series,) = _series_items(tmp_path)
    assert series.refusal_status == "rejected" and files[-1].name in series.refusal


def test_a_non_utf8_preview_beside_a_series_is_refused_alone(tmp_path):
    files = _series_in(tmp_path / "series")
    Image.fromarray(SLICE).save(tmp_path / "series" / "preview_\udcff.png")
    items = scoring.discover(tmp_path).items
    (series,) = [i for i in items if i.file_kind == "dicom_series"]
    assert not series.refusal and len(series.files) == len(files)
    assert [i.key for i in items if i.refusal] == ["series/preview_\\xff.png"]


def test_a_broken_dicom_with_a_non_utf8_name_is_named_in_escapes(tmp_path):
    _series_in(tmp_path / "series")
    (tmp_path / "series" / "AAA_\udcff.dcm").write_bytes(b"")
    (series,) = _series_items(tmp_path)
    assert "AAA_\\xff.dcm" in series.refusal
    series.refusal.encode("utf-8")  # what the ledger and the CSV need


def test_a_series_in_a_folder_named_in_latin1_is_one_rejected_series_row(tmp_path):
    _series_in(tmp_path / "patient_\udce9")
    series = _series_items(tmp_path)
    assert len(series) == 1 and series[0].key == "patient_\\xe9" and series[0].refusal_status == "rejected"
    assert "folder name is not valid UTF-8" in series[0].refusal


def test_a_broken_series_is_reported_once_and_scored_once_the_slice_is_removed(tmp_path):
    files = _series_in(tmp_path / "series")
    files[-1].write_bytes(b"")

    def series_item():
        (item,) = [i for i in scoring.discover(tmp_path).items if i.file_kind == "dicom_series"]
        return item

    first, again = series_item(), series_item()
    assert first.refusal and again.sha256 == first.sha256  # same ledger key: one row, not one a night
    files[-1].unlink()
    fixed = series_item()
    assert not fixed.refusal and fixed.sha256 != first.sha256 and len(fixed.files) == len(files) - 1


def test_a_series_still_being_transferred_waits_rather_than_being_rejected(tmp_path):
    import os
    import time

    files = _series_in(tmp_path / "series")
    old = time.time() - 3600
    for f in files:
        os.utime(f, (old, old))
    files[-1].write_bytes(b"")  # a slice left empty, beside a transfer that is still writing
    os.utime(files[-1], (old, old))
    (tmp_path / "series" / ".rsync_tmp").write_bytes(b"partial")
    incoming = scoring.discover(tmp_path, settle_seconds=60)
    assert not [i for i in incoming.items if i.file_kind == "dicom_series"]
    assert any(key.startswith("series (series ") for key, _ in incoming.skipped), incoming.skipped
