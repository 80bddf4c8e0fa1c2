"""Nightly scoring a hospital can trust: DICOM in, every bad input named, exactly-once reports,
crash and concurrency safety, no patient identifiers in the outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from corpus import (
    FORMULA_NAMES,
    HOUR_AGO,
    PHI,
    SLICES_STILL_SCORED,
    age_everything,
    csv_name,
    make_bad_corpus,
    series_uid,
    write_png,
    write_series,
)

from lung_models import registry, scoring
from lung_models.bundle import load_bundle
from lung_models.data import dicom, phantoms, readers
from lung_models.fileutil import sha256_file
from lung_models.scoring import discovery as discover_mod
from lung_models.scoring import pipeline

REPO = Path(__file__).resolve().parents[2]


def _run(factory, folder: Path, out: Path, **kw) -> pd.DataFrame:
    from flows.score import score_folder

    csv = score_folder(input_dir=str(folder), output_dir=str(out), exports_dir=str(factory["exports"]), **kw)
    df = pd.read_csv(csv, keep_default_na=False)
    # A cell a spreadsheet would run as a formula carries a leading ' in the CSV (the ledger tests
    # check that); the tests below compare the true names and messages.
    for column in ("relative_path", "error"):
        df[column] = df[column].map(csv_name)
    return df


def _models_for(kind: str) -> set[str]:
    return {n for n in registry.names() if kind in scoring.MODALITY_INPUTS[registry.get(n).spec.modality]}


@pytest.fixture(scope="module")
def corpus_run(factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    folder, outside = root / "incoming", root / "outside"
    expected = make_bad_corpus(folder, outside)
    # One file still arriving: modified just now, while everything else arrived an hour ago.
    age_everything(folder)
    arriving = write_png(folder / "arriving" / "slice.png", phantoms.ct_slice("normal", np.random.default_rng(9), 128))
    first = _run(factory, folder, root / "reports", settle_seconds=30)
    return {"root": root, "folder": folder, "expected": expected, "first": first, "arriving": arriving}


def test_the_report_rejects_at_least_twenty_kinds_of_bad_input(corpus_run):
    """Counted in the flow's report, not in the fixture: every planted bad input (22 kinds) has
    rejected rows, and nothing else was rejected."""
    df = corpus_run["first"]
    rejected = set(df[df.status == "rejected"].relative_path)
    planted = {k for k, (status, _) in corpus_run["expected"].items() if status == "rejected"}
    assert rejected == planted and len(rejected) >= 20, sorted(rejected ^ planted)


def test_the_night_csv_neutralises_every_formula_like_cell(corpus_run):
    """End to end (issue 16, defect 1): the corpus' file names a spreadsheet would run, and the error
    texts that quote them, reach the CSV with a ' in front; no text cell starts a formula."""
    night_csv = min(p for p in (corpus_run["root"] / "reports").glob("scores-*.csv") if "cumulative" not in p.name)
    raw = pd.read_csv(night_csv, keep_default_na=False, dtype=str)
    names = set(raw.relative_path)
    assert {"'" + n for n in FORMULA_NAMES} | {"'@SUM(1+1).png"} <= names
    assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in raw.to_numpy().ravel())


def test_every_bad_input_gets_a_row_naming_it_and_every_good_one_is_scored(corpus_run):
    df, expected = corpus_run["first"], corpus_run["expected"]
    items = scoring.discover(corpus_run["folder"]).items
    keys = {(i.key, i.series_uid_hash) for i in items}
    assert {k for k, _ in keys} == set(expected) | {"arriving/slice.png"}
    two_d = _models_for("ct_slice") - _models_for("histology_tile")
    for key, (status, word) in expected.items():
        rows = df[df.relative_path == key]
        kinds = {i.input_kind for i in items if i.key == key}
        assert len(rows) > 0 and set(rows.model) == set().union(*(_models_for(k) for k in kinds)), key
        assert not rows.duplicated("model").any(), key  # one row per (scan, model)
        if key in SLICES_STILL_SCORED:
            assert set(rows[rows.model.isin(two_d)].status) == {"ok"}, key
            rows = rows[~rows.model.isin(two_d)]
        assert set(rows.status) == {status}, (key, rows[["model", "status", "error"]].values)
        for _, row in rows.iterrows():
            if status == "ok":
                assert row.error == "" and row.predicted_class != ""
            else:  # "<file>: <problem>; <what to do>"
                assert Path(key).name in row.error and row.predicted_class == "" and ";" in row.error, row.error
                assert word.lower() in row.error.lower(), (key, row.error)
                assert "<img" not in row.error  # header text that failed validation is never quoted
    # A burnt-in red ruler (3% of the pixels) leaves a CT slice with the CT models.
    assert set(df[df.relative_path == "good/slice_with_ruler.png"].model) == _models_for("ct_slice")


def test_a_file_still_arriving_is_skipped_then_scored_and_nothing_is_scored_twice(corpus_run, factory):
    first = corpus_run["first"]
    assert "arriving/slice.png" not in set(first.relative_path)
    arriving = corpus_run["arriving"]
    os.utime(arriving, (HOUR_AGO, HOUR_AGO))  # the transfer finished
    second = _run(factory, corpus_run["folder"], corpus_run["root"] / "reports", settle_seconds=30)
    assert set(second.relative_path) == {"arriving/slice.png"}
    assert set(second.model) == _models_for("ct_slice") and set(second.status) == {"ok"}
    third = _run(factory, corpus_run["folder"], corpus_run["root"] / "reports", settle_seconds=30)
    assert len(third) == 0 and list(third.columns)[:3] == ["relative_path", "file_sha256", "model"]
    cumulative = pd.read_csv(corpus_run["root"] / "reports" / "scores-cumulative.csv", keep_default_na=False)
    assert len(cumulative) == len(first) + len(second)
    key = ["relative_path", "series_uid_hash", "model", "model_version"]
    assert not cumulative.duplicated(key).any()


def test_a_changed_file_is_scored_again(factory, tmp_path):
    folder = tmp_path / "in"
    path = write_png(folder / "s.png", phantoms.ct_slice("normal", np.random.default_rng(1), 128))
    out = tmp_path / "out"
    first = _run(factory, folder, out, settle_seconds=0, models=["chest-cnn"])
    write_png(path, phantoms.ct_slice("adenocarcinoma", np.random.default_rng(2), 128))
    second = _run(factory, folder, out, settle_seconds=0, models=["chest-cnn"])
    assert len(first) == len(second) == 1 and first.file_sha256[0] != second.file_sha256[0]
    assert second.file_sha256[0] == sha256_file(path)


def test_a_new_model_version_rescores_everything_for_that_model(factory, tmp_path):
    folder = tmp_path / "in"
    phantoms.write_incoming(folder, seed=3, n_tiles=3, n_volumes=0, corrupt=False, tile_size=128)
    exports = tmp_path / "exports"
    shutil.copytree(Path(factory["bundles"]["lc25000-cnn"]).parent, exports / "lc25000-cnn")
    out = tmp_path / "out"
    kw = {"input_dir": str(folder), "output_dir": str(out), "exports_dir": str(exports), "settle_seconds": 0}
    from flows.score import score_folder

    assert len(pd.read_csv(score_folder(**kw))) == 3
    assert len(pd.read_csv(score_folder(**kw))) == 0
    # A new version: same card, another ONNX file (another hash).
    old = load_bundle(Path(factory["bundles"]["lc25000-cnn"]))
    new_dir = exports / "lc25000-cnn" / "29990101T000000Z"
    shutil.copytree(old.path, new_dir)
    import onnx

    graph = onnx.load(str(new_dir / "model.onnx"))
    graph.doc_string = "re-exported"
    onnx.save(graph, str(new_dir / "model.onnx"))
    card = {**old.card, "version": new_dir.name, "onnx_sha256": sha256_file(new_dir / "model.onnx")}
    (new_dir / "model_card.json").write_text(json.dumps(card))
    (exports / "lc25000-cnn" / "LATEST").write_text(new_dir.name + "\n")
    again = pd.read_csv(score_folder(**kw), keep_default_na=False)
    assert len(again) == 3 and set(again.model_version) == {new_dir.name}


def test_dicom_series_and_the_same_volume_as_nifti_score_the_same(factory, tmp_path):
    folder = tmp_path / "in"
    files = write_series(folder / "patient" / "series", 11)
    volume, spacing, affine = dicom.read_series_hu(dicom.group_series(files)[0][0])
    nib.save(nib.Nifti1Image(volume, affine), str(folder / "same.nii.gz"))
    # The same scan stored left-right and front-back mirrored (LPS order, as many converters write it):
    # the affine says so, and the reader's reorientation must undo it.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(volume.shape[:2]) - 1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume[::-1, ::-1]), affine @ flip), str(folder / "lps.nii.gz"))
    assert nib.aff2axcodes(nib.load(str(folder / "lps.nii.gz")).affine) == ("L", "P", "S")
    df = _run(factory, folder, tmp_path / "out", settle_seconds=0, models=["mosmed-3dcnn", "chest-cnn"])
    assert set(df.status) == {"ok"} and len(df) == 6  # one row per scan and model
    for model, rows in df.groupby("model"):
        series = rows[rows.item_kind == "dicom_series"].iloc[0]
        assert series.relative_path == "patient/series" and len(series.series_uid_hash) == 16
        assert int(series.n_inputs) == (1 if model == "mosmed-3dcnn" else len(files))
        for name in ("same.nii.gz", "lps.nii.gz"):
            nifti = rows[rows.relative_path == name].iloc[0]
            assert nifti.n_inputs == series.n_inputs and nifti.max_slice == series.max_slice
            for cell in ("probabilities", "max_probabilities"):
                want, got = json.loads(series[cell]), json.loads(nifti[cell])
                assert max(abs(want[c] - got[c]) for c in want) < 1e-6, (model, name, cell)


def test_real_dicom_series_and_slices_are_scored(factory, tmp_path, shared_data):
    folder = tmp_path / "in"
    shutil.copytree(shared_data / "dicom", folder / "dicom")
    series = dicom.group_series(sorted((folder / "dicom" / "abdomen-series").iterdir()))[0][0]
    volume, _, affine = dicom.read_series_hu(series)
    nib.save(nib.Nifti1Image(volume, affine), str(folder / "abdomen_as_nifti.nii.gz"))
    df = _run(factory, folder, tmp_path / "out", settle_seconds=0)
    ok = df[df.status == "ok"]
    vol = ok[ok.model == "mosmed-3dcnn"].set_index("item_kind")
    assert set(vol.index) == {"dicom_series", "nifti"}
    probs = {kind: json.loads(vol.loc[kind, "probabilities"]) for kind in ("dicom_series", "nifti")}
    assert abs(probs["dicom_series"]["abnormal"] - probs["nifti"]["abnormal"]) < 1e-6
    # One row per scan and 2-D CT model (14): the ten lone TCGA slices, the two TCGA slices of one series, the
    # 20-slice series, the 2-slice lungmask pair (series too short to be volumes, still slices) and the
    # NIfTI's 20 axial slices.
    scans = {i.key: len(i.files) for i in scoring.discover(folder).items}
    scans["abdomen_as_nifti.nii.gz"] = 20
    assert scans["dicom/abdomen-series"] == 20 and scans["dicom/lungmask"] == 2 and len(scans) == 14
    for model in _models_for("ct_slice") - _models_for("histology_tile"):
        rows = ok[ok.model == model].set_index("relative_path")
        assert rows.n_inputs.astype(int).to_dict() == scans, model
        series, nifti = (json.loads(rows.loc[k, "max_probabilities"]) for k in ("dicom/abdomen-series",
                                                                                 "abdomen_as_nifti.nii.gz"))
        assert max(abs(series[c] - nifti[c]) for c in series) < 1e-5, model
    # The lungmask pair is rejected by the 3-D model, saying why.
    short = df[(df.relative_path == "dicom/lungmask") & (df.model == "mosmed-3dcnn")]
    assert len(short) == 1 and short.status.iloc[0] == "rejected" and "slices" in short.error.iloc[0]


def test_discovery_skips_a_file_that_grows_while_it_is_hashed(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    path = write_png(folder / "growing.png", phantoms.ct_slice("normal", np.random.default_rng(1), 64))
    real = discover_mod.sha256_file

    def hash_while_writing(p):
        digest = real(p)
        with open(p, "ab") as f:  # the transfer goes on
            f.write(b"more bytes")
        return digest

    monkeypatch.setattr(discover_mod, "sha256_file", hash_while_writing)
    found = scoring.discover(folder)
    assert found.items == [] and found.skipped[0][0] == "growing.png" and "being written" in found.skipped[0][1]
    monkeypatch.setattr(discover_mod, "sha256_file", real)
    assert [i.key for i in scoring.discover(folder).items] == [path.name]


def test_an_unreadable_file_is_an_error_row_and_its_neighbours_are_scored(factory):
    """Permissions: run discovery as an unprivileged user (root reads everything)."""
    base = Path(tempfile.mkdtemp(prefix="lung-perm-"))
    try:
        os.chmod(base, 0o755)
        folder = base / "in"
        write_png(folder / "readable.png", phantoms.ct_slice("normal", np.random.default_rng(1), 64))
        locked = write_png(folder / "locked.png", phantoms.ct_slice("normal", np.random.default_rng(2), 64))
        os.chmod(folder, 0o755)
        for p in folder.iterdir():
            os.chmod(p, 0o644)
        os.chmod(locked, 0o000)
        if os.geteuid() == 0:
            found = _discover_as_nobody(folder)
        else:
            found = scoring.discover(folder)
        by_key = {i.key: i for i in found.items}
        assert by_key["readable.png"].sha256 and not by_key["readable.png"].refusal
        assert by_key["locked.png"].refusal_status == "error"
        assert "locked.png" in by_key["locked.png"].refusal and "read access" in by_key["locked.png"].refusal
        # The rows a model writes for them: the neighbour is scored, the locked file is an error row
        # (retried next night), and the ledger takes both.
        os.chmod(locked, 0o644)  # (scoring itself runs as root here; the refusal was decided above)
        model = scoring.open_model(load_bundle(factory["bundles"]["chest-cnn"]))
        jobs = [pipeline.Job(i, [model]) for i in found.items]
        rows = [r for batch in pipeline.score(jobs, folder) for r in batch]
        assert {(r["relative_path"], r["status"]) for r in rows} == {("readable.png", "ok"), ("locked.png", "error")}
        with scoring.Ledger(base / "out") as ledger:
            assert ledger.record("run", rows) == 2
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _discover_as_nobody(folder: Path) -> scoring.Incoming:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, discover, send the items back
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            found = scoring.discover(folder)
            os.write(write, json.dumps([i.as_dict() for i in found.items]).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return scoring.Incoming(items=[scoring.Item.from_dict(d) for d in json.loads(b"".join(chunks))])


# ------------------------------------------------------------------ real processes: kill -9, concurrency
def _cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(REPO))
    return env


def _score_process(folder: Path, out: Path, exports: Path, home: Path, *models: str,
                   ledger: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "score", str(folder), str(out), "--exports-dir", str(exports),
            "--settle-seconds", "0", "--batch-size", "2"] + (["--ledger", ledger] if ledger else [])
    for m in models:
        args += ["-m", m]
    return subprocess.Popen(args, cwd=REPO, env=_cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _ledger_rows(out: Path, ledger: str | None = None) -> int:
    if ledger is not None:
        import psycopg

        try:
            with psycopg.connect(ledger, connect_timeout=2) as conn:
                return int(conn.execute("select count(*) from rows").fetchone()[0])
        except psycopg.Error:  # the tables are not created yet
            return 0
    db = out / "ledger.sqlite3"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("select count(*) from rows").fetchone()[0])
    except sqlite3.Error:  # not created yet, or busy: try again
        return 0


def _all_night_rows(out: Path) -> pd.DataFrame:
    nights = [pd.read_csv(p, keep_default_na=False) for p in sorted(out.glob("scores-2*.csv"))]
    return pd.concat(nights, ignore_index=True) if nights else pd.DataFrame()


def test_kill_9_mid_run_then_rerun_gives_every_row_exactly_once(factory, tmp_path, ledger_url):
    folder = tmp_path / "in"
    phantoms.write_incoming(folder, seed=21, n_tiles=160, n_volumes=0, corrupt=False, tile_size=192)
    out = tmp_path / "out"
    models = ("lc25000-cnn", "lc25000-inception-mixed7")
    proc = _score_process(folder, out, factory["exports"], tmp_path / "home1", *models, ledger=ledger_url)
    deadline = time.time() + 240
    while _ledger_rows(out, ledger_url) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _ledger_rows(out, ledger_url)
    total = 160 * len(models)
    assert 0 < at_kill < total, f"the kill should land mid-run ({at_kill} of {total} rows recorded)"
    assert not list(out.glob("scores-2*.csv")), "the killed run must not have published a partial report"
    rerun = _score_process(folder, out, factory["exports"], tmp_path / "home2", *models, ledger=ledger_url)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log[-3000:]
    nights = _all_night_rows(out)
    cumulative = pd.read_csv(out / "scores-cumulative.csv", keep_default_na=False)
    for df in (nights, cumulative):
        assert len(df) == total and not df.duplicated(["relative_path", "model"]).any()
        assert set(df.status) == {"ok"}
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


def _ledger_text(out: Path, ledger: str | None) -> str:
    """Everything the ledger stores, as text: the SQLite file's bytes, or the PostgreSQL tables' rows."""
    if ledger is None:
        return (out / "ledger.sqlite3").read_bytes().decode("latin-1")
    import psycopg

    with psycopg.connect(ledger) as conn:
        return "\n".join(str(row) for table in ("rows", "file_hashes", "reports", "nights", "claims")
                         for row in conn.execute(f"SELECT * FROM {table}"))


def test_two_runs_at_once_lose_and_duplicate_nothing_and_leak_no_patient_data(factory, tmp_path, ledger_url):
    """With SQLite the second run waits for the first (the lock); with PostgreSQL they share the night."""
    folder = tmp_path / "in"
    phantoms.write_incoming(folder, seed=22, n_tiles=40, n_volumes=0, corrupt=False, tile_size=128)
    files = write_series(folder / "dicom" / "series", 12)
    files[5].unlink()  # a bad series too: its error message must not leak identifiers either
    out = tmp_path / "out"
    models = ("lc25000-cnn", "chest-cnn", "mosmed-3dcnn")
    started = time.time()
    procs = [_score_process(folder, out, factory["exports"], tmp_path / f"home{i}", *models, ledger=ledger_url)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    # They did overlap: both were started before either could have published (a run takes seconds).
    first_published = min(p.stat().st_mtime for p in out.glob("scores-2*.csv"))
    assert first_published - started > 3
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    nights = _all_night_rows(out)
    cumulative = pd.read_csv(out / "scores-cumulative.csv", keep_default_na=False)
    want = 40 + 1 + 1  # tiles (lc25000-cnn), the series as slices (chest-cnn) and as a volume (mosmed-3dcnn)
    for df in (nights, cumulative):
        assert len(df) == want and not df.duplicated(["relative_path", "model"]).any()
    assert len(list(out.glob("scores-2*.csv"))) == 2  # each run wrote its own (one of them header-only)
    series_row = cumulative[cumulative.model == "mosmed-3dcnn"].iloc[0]
    assert series_row.status == "rejected" and "missing" in series_row.error.lower()
    slices_row = cumulative[(cumulative.model == "chest-cnn") & (cumulative.item_kind == "dicom_series")].iloc[0]
    assert slices_row.status == "ok" and int(slices_row.n_inputs) == len(files) - 1
    uid = series_uid(files[0])
    outputs = "\n".join(logs) + "".join(p.read_text() for p in out.glob("*.csv"))
    ledger_bytes = _ledger_text(out, ledger_url)
    for secret in (*PHI, uid):
        assert secret not in outputs and secret not in ledger_bytes, secret


# ------------------------------------------------------------------ discovery and reading edge cases
def test_a_series_with_a_slice_still_arriving_is_not_assembled_until_it_is_complete(factory, tmp_path):
    folder = tmp_path / "in"
    files = write_series(folder / "series", 13)
    age_everything(folder)
    os.utime(files[-1], None)  # the last slice landed just now
    out = tmp_path / "out"
    first = _run(factory, folder, out, settle_seconds=30, models=["mosmed-3dcnn", "chest-cnn"])
    assert len(first) == 0  # the scan is not complete: no model scores it, not even its settled slices
    age_everything(folder)
    second = _run(factory, folder, out, settle_seconds=30, models=["mosmed-3dcnn", "chest-cnn"])
    assert sorted(second.model) == ["chest-cnn", "mosmed-3dcnn"] and set(second.status) == {"ok"}
    assert list(second.n_inputs.astype(int)) == [len(files) if m == "chest-cnn" else 1 for m in second.model]


def test_a_file_that_changes_while_it_is_decoded_is_skipped_not_rejected(factory, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    path = write_png(folder / "s.png", phantoms.ct_slice("normal", np.random.default_rng(1), 64))
    items = scoring.discover(folder).items
    real = readers.READERS["image"]

    def cut_then_read(p, *args):
        p.write_bytes(p.read_bytes()[:100])  # the transfer rewrites the file under us
        return real(p, *args)

    monkeypatch.setitem(readers.READERS, "image", cut_then_read)  # what decode reads images with
    model = scoring.open_model(load_bundle(factory["bundles"]["chest-cnn"]))
    skipped: list = []
    rows = [r for batch in pipeline.score([pipeline.Job(i, [model]) for i in items], folder, skipped=skipped)
            for r in batch]
    assert rows == [] and skipped[0][0] == "s.png" and "changed" in skipped[0][1]
    assert path.stat().st_size == 100


def test_links_loops_and_pipes_never_hang_or_crash_the_night(factory, tmp_path):
    import threading

    folder = tmp_path / "in"
    write_png(folder / "good.png", phantoms.ct_slice("normal", np.random.default_rng(1), 64))
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "loop_a.dcm").symlink_to(folder / "loop_b.dcm")
    (folder / "loop_b.dcm").symlink_to(folder / "loop_a.dcm")
    (folder / "inside_link.png").symlink_to(folder / "good.png")
    os.mkfifo(folder / "pipe.dcm")
    os.mkfifo(folder / "extensionless_pipe")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(found=scoring.discover(folder)), daemon=True)
    worker.start()
    worker.join(60)
    assert "found" in result, "discovery blocked (on a pipe?)"
    items = {i.key: i for i in result["found"].items}
    assert set(items) == {"good.png", "inside_link.png", "dangling.png", "loop_a.dcm", "loop_b.dcm", "pipe.dcm"}
    for key in ("dangling.png", "loop_a.dcm", "loop_b.dcm", "pipe.dcm"):
        assert items[key].refusal_status == "rejected" and key in items[key].refusal and items[key].sha256
    df = _run(factory, folder, tmp_path / "out", settle_seconds=0, models=["chest-cnn"])
    assert dict(zip(df.relative_path, df.status)) == {"good.png": "ok", "inside_link.png": "ok", "dangling.png":
                                                      "rejected", "loop_a.dcm": "rejected", "loop_b.dcm": "rejected",
                                                      "pipe.dcm": "rejected"}


def test_a_series_waits_while_one_of_its_slices_cannot_be_read_or_links_out(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    files = write_series(folder / "series", seed=14)
    # A slice that vanishes (or hits an I/O error) between hashing and header reading.
    real = dicom.group_series
    original = files[4].read_bytes()

    def vanish_then_group(paths, **kw):
        files[4].unlink()
        return real(paths, **kw)

    monkeypatch.setattr(discover_mod.dicom, "group_series", vanish_then_group)
    found = scoring.discover(folder)
    assert not [i for i in found.items if i.file_kind == "dicom_series"]
    assert any("series" in rel and "IM000005.dcm cannot be read" in why for rel, why in found.skipped)
    monkeypatch.setattr(discover_mod.dicom, "group_series", real)
    # An extensionless link out of the folder might be one of its slices: the series waits, and says why.
    files[4].write_bytes(original)  # the vanished slice is back
    (tmp_path / "elsewhere").write_bytes(b"x")
    (folder / "series" / "EXTRA").symlink_to(tmp_path / "elsewhere")
    found = scoring.discover(folder)
    assert not [i for i in found.items if i.file_kind == "dicom_series"]
    assert any("EXTRA links out of the folder" in why for _, why in found.skipped)
    # A stray preview image linking out does not hold the series back, and a .dcm pipe goes to CT models only.
    (folder / "series" / "EXTRA").unlink()
    (folder / "series" / "preview.png").symlink_to(tmp_path / "elsewhere")
    os.mkfifo(folder / "series" / "pipe.dcm")
    found = scoring.discover(folder)
    by_key = {(i.key, i.file_kind): i for i in found.items}
    assert len(by_key[("series", "dicom_series")].files) == len(files)  # assembled whole again
    assert by_key[("series/pipe.dcm", "refused")].input_kind == "ct_slice"
    assert by_key[("series/preview.png", "refused")].refusal_status == "rejected"
