"""Defects an adversarial run found beyond the bad-input corpus (issue 16): where the scorer's own
files live, an output folder it cannot write, names that collide in reports, and entries that get
no row. The input kinds themselves are in ``corpus.py`` and checked by ``test_night.py``."""

from __future__ import annotations

import errno
import os
import sqlite3

import numpy as np
import pandas as pd
import pytest
from corpus import age_everything, csv_name, write_png, write_series

from lung_models.data import phantoms
from lung_models.fileutil import csv_cell, report_text
from lung_models.scoring import OutputNotWritable, night
from lung_models.scoring import ledger as ledger_mod
from lung_models.scoring import lock as lock_mod


def _score(factory, folder, out, **kw) -> pd.DataFrame:
    from flows.score import score_folder

    csv = score_folder(input_dir=str(folder), output_dir=str(out), exports_dir=str(factory["exports"]), **kw)
    return pd.read_csv(csv, keep_default_na=False)


def test_a_series_in_an_output_folder_that_is_the_input_folder_is_scored(factory, tmp_path):
    """Defect 9: the run's own lock, ledger and CSVs are not arrivals, so they cannot keep a series
    beside them "still arriving" night after night, and none of them is ever scored."""
    folder = tmp_path / "in"
    files = write_series(folder, seed=31)  # the slices at the top of the folder the reports go to
    age_everything(folder)
    models = ["mosmed-3dcnn", "chest-cnn"]
    first = _score(factory, folder, folder, settle_seconds=30, models=models)
    assert sorted(first.model) == sorted(models) and set(first.status) == {"ok"}
    assert set(first.item_kind) == {"dicom_series"}
    assert int(first[first.model == "chest-cnn"].n_inputs.iloc[0]) == len(files)
    age_everything(folder)  # the night's outputs, too, are an hour old by the next night
    second = _score(factory, folder, folder, settle_seconds=30, models=models)
    assert len(second) == 0  # nothing new: its own outputs were not taken for arrivals
    found = night.find_incoming(folder, folder, settle_seconds=30)
    assert {i.key for i in found.items} == {"."} and not found.skipped


def test_an_output_folder_inside_the_input_folder_is_not_walked(factory, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "in" / "reports"
    slice_ = phantoms.ct_slice("normal", np.random.default_rng(1), 64)
    write_png(folder / "scan.png", slice_)
    write_png(out / "screenshot.png", slice_)  # whatever lies in the output folder is not input
    df = _score(factory, folder, out, settle_seconds=0, models=["chest-cnn"])
    assert list(df.relative_path) == ["scan.png"]


def test_an_output_folder_the_scorer_cannot_write_is_named_with_the_fix(tmp_path, monkeypatch):
    """A read-only folder ended in a raw PermissionError (the lock) or sqlite's "attempt to write a
    readonly database" without a file name. Simulated, since the tests may run as root."""
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def denied(path, *args, **kw):
        if str(path).endswith(lock_mod.LOCK_NAME):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(lock_mod.os, "open", denied)
    with pytest.raises(OutputNotWritable) as raised, lock_mod.scoring_lock(out, timeout=0):
        pass
    assert str(out) in str(raised.value) and "write access" in str(raised.value)
    monkeypatch.setattr(lock_mod.os, "open", real_open)

    def read_only(self):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(ledger_mod.Ledger, "_init_schema", read_only)
    with pytest.raises(OutputNotWritable) as raised:
        ledger_mod.Ledger(out)
    assert str(out) in str(raised.value) and ledger_mod.LEDGER_NAME in str(raised.value)


def test_entries_that_get_no_row_are_listed_with_a_reason(tmp_path):
    """An extensionless pipe, a folder link (a loop) and an unlistable folder produce no row; each
    must still be named, with why, in what the night's summary artifact lists (Incoming.skipped)."""
    folder = tmp_path / "in"
    write_png(folder / "scan.png", phantoms.ct_slice("normal", np.random.default_rng(1), 64))
    os.mkfifo(folder / "extensionless_pipe")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    found = night.find_incoming(folder, tmp_path / "out", settle_seconds=0)
    reasons = dict(found.skipped)
    assert {i.key for i in found.items} == {"scan.png"}
    assert "pipe" in reasons["extensionless_pipe"] and "symbolic link" in reasons["loop"], reasons


def test_report_names_are_unique_per_file_and_formula_cells_are_neutralised():
    """Defect 2: the escape of a byte that is not UTF-8 cannot be spelt by a real name. Defect 1: the
    leading ' a formula-like cell gets is dropped again to give the true text back."""
    undecodable, literal = "slice_\udce9.png", "slice_\\xe9.png"
    assert report_text(undecodable) != report_text(literal)
    assert report_text("plain name.png") == "plain name.png"
    for text in ("=1+1.png", "+1", "-2+3", "@SUM(1)", "\tx", "\rx", "'already", "ok.png", ""):
        cell = csv_cell(text)
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")) and csv_name(cell) == text
    assert csv_cell(3.5) == 3.5
