"""The exactly-once scoring ledger: done keys, night/cumulative CSVs, crash recovery, atomic writes, the lock."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from lung_models import fileutil
from lung_models.fileutil import atomic_writer
from lung_models.scoring import ledger as ledger_mod
from lung_models.scoring import report as report_mod
from lung_models.scoring.ledger import CUMULATIVE_NAME, Ledger
from lung_models.scoring.lock import LOCK_NAME, ScoringLockTimeout, scoring_lock
from lung_models.scoring.rows import COLUMNS, prediction

REPO = Path(__file__).resolve().parents[2]
HIST = ["aca", "n", "scc"]
CT = ["normal", "covid"]


def row(path: str, sha: str | None = None, *, bundle: str = "b1", model: str = "hist", version: str = "1",
        status: str = "ok", classes: list[str] = HIST, **extra) -> dict:
    out = {"relative_path": path, "file_sha256": sha if sha is not None else f"sha-{path}", "model": model,
           "model_version": version, "bundle_sha256": bundle, "status": status, "error": "",
           "predicted_class": "", "provider": "CPUExecutionProvider", "scored_utc": "2026-01-01T00:00:00+00:00"}
    if status == "ok":
        out.update(prediction(classes, [[1.0 / (i + 2) for i in range(len(classes))]]))
    elif status == "error":
        out["error"] = "cannot read"
    out.update(extra)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh))


def night_csvs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("scores-*.csv") if p.name != CUMULATIVE_NAME)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def ledger(tmp_path, ledger_url):
    """Every ledger test runs on both backends: SQLite in the output folder and a PostgreSQL database."""
    with Ledger(tmp_path / "out", url=ledger_url) as led:
        yield led


# ------------------------------------------------------------------------------------- done/record
def test_rerun_finds_items_done_and_changes_are_not(ledger):
    items = [(f"a{i}.png", f"sha{i}") for i in range(5)]
    assert ledger.done("hist", "b1", items) == set()
    assert ledger.record("run1", [row(p, s) for p, s in items]) == 5
    assert ledger.done("hist", "b1", items) == set(items)
    assert ledger.done("hist", "b1", iter(items)) == set(items)  # any iterable
    assert ledger.done("hist", "b1", [("a0.png", "changed")]) == set()  # changed content
    assert ledger.done("hist", "b2", items) == set()  # new model version (bundle)
    assert ledger.done("hist", "b1", [("a0.png", "sha0"), ("new.png", "x")]) == {("a0.png", "sha0")}


def test_done_key_is_recorded_once(ledger):
    assert ledger.record("run1", [row("a.png"), row("a.png")]) == 1  # duplicate within a batch
    assert ledger.record("run2", [row("a.png"), row("b.png")]) == 1  # already done in the ledger
    assert ledger.record("run2", [row("a.png", status="rejected")]) == 0  # done either way
    assert ledger.record("run3", [row("a.png", bundle="b2")]) == 1  # same file, new model version
    assert ledger.counts()["ok"] == 3


def test_a_row_quoting_a_non_utf8_name_is_stored_escaped_and_publishes(ledger, tmp_path):
    """A decoder's message may quote a file name that is not valid UTF-8 (Python holds its bytes as
    surrogates); stored raw, it would fail this and every later publish of the night's CSV."""
    bad = row("s", status="rejected", error="s: AAA_\udcff.dcm: empty file (0 bytes); resend it")
    assert ledger.record("run1", [bad]) == 1
    (published,) = read_csv(ledger.publish("run1", "night1"))
    assert published["error"] == "s: AAA_\\xff.dcm: empty file (0 bytes); resend it"


def test_error_rows_are_retried_and_superseded(ledger):
    assert ledger.record("run1", [row("a.png", status="error"), row("bad.png", status="rejected")]) == 2
    items = [("a.png", "sha-a.png"), ("bad.png", "sha-bad.png")]
    assert ledger.done("hist", "b1", items) == {("bad.png", "sha-bad.png")}
    night1 = read_csv(ledger.publish("run1", "n1"))
    assert [(r["relative_path"], r["status"]) for r in night1] == [("a.png", "error"), ("bad.png", "rejected")]
    assert ledger.record("run2", [row("a.png", status="error")]) == 1  # retried, failed again
    assert [r["status"] for r in read_csv(ledger.publish("run2", "n2"))] == ["error"]
    assert ledger.record("run3", [row("a.png")]) == 1  # retried, scored
    assert [r["status"] for r in read_csv(ledger.publish("run3", "n3"))] == ["ok"]
    assert ledger.record("run4", [row("a.png", status="error")]) == 0  # an error for a done key is ignored
    # the cumulative CSV shows each (path, model, bundle) once: the latest attempt
    cumulative = read_csv(ledger.write_cumulative())
    assert sorted((r["relative_path"], r["status"], r["run_id"]) for r in cumulative) == [
        ("a.png", "ok", "run3"), ("bad.png", "rejected", "run1")]


def test_killed_run_error_and_retry_are_not_both_published(ledger):
    # run1 recorded an error then died before publishing; run2 retried it (error again) and another
    # file errored with an empty hash (unreadable) before being read fine
    ledger.record("run1", [row("a.png", status="error"), row("u.png", "", status="error")])
    ledger.record("run2", [row("a.png", status="error"), row("u.png")])
    night = read_csv(ledger.publish("run2", "n1"))
    assert sorted((r["relative_path"], r["status"], r["run_id"]) for r in night) == [
        ("a.png", "error", "run2"), ("u.png", "ok", "run2")]
    assert ledger.counts()["superseded"] == 2


def test_error_row_of_one_series_survives_another_series_in_the_same_folder(ledger):
    """Two DICOM series in one folder share relative_path (the folder) and differ by file_sha256: one
    series' row is no later attempt at the other, in the night CSV nor in the cumulative one."""
    a = row("dicom/study1", "sha-series-a", status="error", item_kind="dicom_series", series_uid_hash="aaa")
    b = row("dicom/study1", "sha-series-b", item_kind="dicom_series", series_uid_hash="bbb")
    assert ledger.record("run1", [a, b]) == 2
    night1 = read_csv(ledger.publish("run1", "n1"))
    assert sorted((r["series_uid_hash"], r["status"]) for r in night1) == [("aaa", "error"), ("bbb", "ok")]
    assert ledger.counts()["superseded"] == 0
    # published on different nights: series B's later row does not hide series A's error in the cumulative CSV;
    # each series' current row is its latest (a new model version's row replaces the older version's)
    assert ledger.record("run2", [row("dicom/study1", "sha-series-b", bundle="b2", item_kind="dicom_series",
                                      series_uid_hash="bbb")]) == 1
    assert ledger.record("run2", [row("dicom/study2", "sha-series-c", bundle="b2", status="error")]) == 1
    ledger.publish("run2", "n2")
    assert ledger.record("run3", [row("dicom/study2", "sha-series-d", bundle="b2")]) == 1
    ledger.publish("run3", "n3")
    cumulative = read_csv(ledger.write_cumulative())
    assert sorted((r["relative_path"], r["file_sha256"], r["bundle_sha256"], r["status"]) for r in cumulative) == [
        ("dicom/study1", "sha-series-a", "b1", "error"), ("dicom/study1", "sha-series-b", "b2", "ok"),
        ("dicom/study2", "sha-series-d", "b2", "ok")]
    # the same series retried still replaces its own error, on the same night and in the cumulative CSV
    assert ledger.record("run4", [a]) == 1
    assert ledger.record("run5", [{**a, "status": "ok", "error": "", "prob_aca": 0.5}]) == 1
    assert [(r["status"], r["run_id"]) for r in read_csv(ledger.publish("run5", "n5"))] == [("ok", "run5")]
    cumulative = read_csv(ledger.write_cumulative())
    assert [(r["status"], r["run_id"]) for r in cumulative if r["file_sha256"] == "sha-series-a"] == [("ok", "run5")]


def test_two_models_with_identical_onnx_files_are_done_separately(ledger):
    """The done key includes the model: byte-identical ONNX files (same bundle_sha256) of two models
    do not make one model's rows count as the other's."""
    items = [("ct/a.png", "sha-a"), ("ct/b.png", "sha-b")]
    same_onnx = "identical-onnx-sha"
    assert ledger.record("run1", [row(p, s, bundle=same_onnx, model="chest-cnn") for p, s in items]) == 2
    assert ledger.done("chest-cnn", same_onnx, items) == set(items)
    assert ledger.done(model="chest-resnet50", bundle_sha256=same_onnx, items=items) == set()
    assert ledger.record("run1", [row(p, s, bundle=same_onnx, model="chest-resnet50") for p, s in items]) == 2
    assert ledger.done("chest-resnet50", same_onnx, items) == set(items)
    # an error of the second model is not dropped as 'already done' by the first model's ok row
    assert ledger.record("run2", [row("ct/c.png", "sha-c", bundle=same_onnx, model="chest-cnn")]) == 1
    assert ledger.record("run2", [row("ct/c.png", "sha-c", bundle=same_onnx, model="chest-resnet50",
                                      status="error")]) == 1
    night = read_csv(ledger.publish("run2", "n1"))
    assert sorted((r["model"], r["relative_path"], r["status"]) for r in night) == [
        ("chest-cnn", "ct/a.png", "ok"), ("chest-cnn", "ct/b.png", "ok"), ("chest-cnn", "ct/c.png", "ok"),
        ("chest-resnet50", "ct/a.png", "ok"), ("chest-resnet50", "ct/b.png", "ok"),
        ("chest-resnet50", "ct/c.png", "error")]
    assert ledger.record("run3", [row("ct/a.png", "sha-a", bundle=same_onnx, model="chest-cnn")]) == 0  # still once


def test_schema_1_ledger_is_migrated_to_the_model_aware_done_key(tmp_path):
    out = tmp_path / "out"
    with Ledger(out) as led:  # make it look like a ledger written by schema 1 (done key without the model)
        led._db._conn.executescript(
            "DROP INDEX rows_done_key; DROP INDEX rows_attempt; "
            "CREATE UNIQUE INDEX rows_done_key ON rows(relative_path, file_sha256, bundle_sha256) WHERE done = 1; "
            "CREATE INDEX rows_attempt ON rows(relative_path, bundle_sha256, model); PRAGMA user_version = 1;")
        led.record("run1", [row("a.png", model="m1")])
    with Ledger(out) as led:
        assert led._db.execute("PRAGMA user_version").fetchone()[0] == ledger_mod._SCHEMA_VERSION
        assert led.record("run2", [row("a.png", model="m2"), row("a.png", model="m1")]) == 1
        assert led.done("m2", "b1", [("a.png", "sha-a.png")]) == {("a.png", "sha-a.png")}


def test_record_rejects_malformed_rows(ledger):
    with pytest.raises(ValueError, match="lacks"):
        ledger.record("r", [{"relative_path": "a.png"}])
    with pytest.raises(ValueError, match="status"):
        ledger.record("r", [row("a.png", status="maybe")])
    with pytest.raises(ValueError, match="file_sha256"):
        ledger.record("r", [row("a.png", "")])  # an ok row needs the content hash
    assert ledger.record("r", []) == 0
    assert ledger.counts().get("ok", 0) == 0  # nothing half-recorded


def test_record_batch_is_one_transaction(ledger):
    """A failure after part of a batch is inserted (as a kill -9 would be) leaves none of it."""

    real = ledger._db.executemany

    def five_then_fail(sql, params):  # inserts 5 rows of the batch, then fails inside the transaction
        for k, p in enumerate(params):
            if k == 5:
                raise KeyboardInterrupt("killed")
            real(sql, [p])

    ledger._db.executemany = five_then_fail
    with pytest.raises(KeyboardInterrupt):
        ledger.record("run1", [row(f"a{i}.png") for i in range(10)])
    ledger._db.executemany = real
    assert ledger.counts().get("ok", 0) == 0
    assert ledger.record("run2", [row(f"a{i}.png") for i in range(10)]) == 10


# ------------------------------------------------------------------------------------------ reports
def test_publish_columns_cumulative_and_pandas(ledger):
    """Every CSV has the one fixed header, whatever the models, classes or extra keys of its rows."""
    out = ledger.output_dir
    hist = [row(f"tiles/h{i}.jpeg", item_kind="histology_tile", zeta_note="z") for i in range(3)]
    ct = [row(f"ct/c{i}.png", model="ct", bundle="b-ct", classes=CT, item_kind="ct_slice", alpha_extra=i)
          for i in range(2)]
    series = [row("dicom/series1", model="ct", bundle="b-ct", classes=CT, item_kind="dicom_series",
                  series_uid_hash="abc123")]
    assert ledger.record("run1", hist) == 3
    assert ledger.record("run1", ct + series) == 3
    night1 = ledger.publish("run1", "20260101")
    assert night1 == out / "scores-20260101.csv"
    assert header(night1) == list(COLUMNS)
    rows1 = read_csv(night1)
    assert len(rows1) == 6 and {r["run_id"] for r in rows1} == {"run1"}

    df = pd.read_csv(night1)
    assert list(df.columns) == list(COLUMNS) and len(df) == 6
    assert df.loc[df["relative_path"] == "dicom/series1", "series_uid_hash"].item() == "abc123"
    tile = df[df["relative_path"] == "tiles/h0.jpeg"].iloc[0]
    assert json.loads(tile.probabilities) == pytest.approx({"aca": 0.5, "n": 1 / 3, "scc": 0.25})
    assert tile.predicted_class == "aca" and tile.probability == pytest.approx(0.5)
    assert set(json.loads(df[df["model"] == "ct"].probabilities.iloc[0])) == set(CT)

    # nothing new: a header-only CSV with the same header; the same stamp gets a suffix
    night2 = ledger.publish("run2", "20260101")
    assert night2 == out / "scores-20260101-2.csv"
    assert read_csv(night2) == [] and header(night2) == list(COLUMNS)
    assert len(pd.read_csv(night2)) == 0

    # a third night with a new file: only that row
    ledger.record("run3", [row("tiles/new.jpeg")])
    night3 = ledger.publish("run3", "20260103")
    assert [r["relative_path"] for r in read_csv(night3)] == ["tiles/new.jpeg"]
    assert header(night3) == list(COLUMNS)

    cumulative = ledger.write_cumulative()
    assert cumulative == out / CUMULATIVE_NAME
    assert header(cumulative) == list(COLUMNS)
    cum = read_csv(cumulative)
    assert [r["relative_path"] for r in cum] == [r["relative_path"] for r in rows1] + ["tiles/new.jpeg"]
    assert len(pd.read_csv(cumulative)) == 7
    assert not list(out.glob(".*.tmp"))


def test_rows_of_an_older_ledger_keep_their_probabilities_under_the_fixed_header(ledger):
    """Schema 2 stored one prob_<class> column per class: they are written out as the JSON cells."""
    old = {"relative_path": "a.png", "file_sha256": "s", "model": "m", "model_version": "1", "bundle_sha256": "b",
           "status": "ok", "predicted_class": "x", "prob_x": 0.75, "prob_y": 0.25}
    ledger.record("run1", [old])
    (got,) = read_csv(ledger.publish("run1", "n1"))
    assert json.loads(got["probabilities"]) == {"x": 0.75, "y": 0.25} and float(got["probability"]) == 0.75
    assert "prob_x" not in got and got["n_inputs"] == "1"


def test_the_hash_cache_answers_only_for_the_same_stat_key(ledger, tmp_path):
    ledger.remember_facts([("a.png", (10, 1, 1, 7), {"sha256": "s1", "kind": "ct_slice", "source": "image"})])
    assert ledger.lookup("a.png", (10, 1, 1, 7)) == {"sha256": "s1", "kind": "ct_slice", "source": "image"}
    assert ledger.lookup("a.png", (10, 2, 1, 7)) is None and ledger.lookup("b.png", (10, 1, 1, 7)) is None
    ledger.remember_facts([("a.png", (11, 2, 2, 7), {"sha256": "s2", "kind": "ct_slice", "source": "image"})])
    assert ledger.lookup("a.png", (10, 1, 1, 7)) is None and ledger.lookup("a.png", (11, 2, 2, 7))["sha256"] == "s2"


def test_the_cumulative_csv_keeps_only_the_current_row_of_a_changed_file(ledger):
    """A file modified after it was scored is scored again: its old row stays in the night CSV that
    published it, and the cumulative CSV holds only the new one (issue 16, defect 10)."""
    ledger.record("run1", [row("a.png", "old"), row("a.png", "old", model="ct", bundle="b-ct", classes=CT),
                           row("b.png")])
    first = read_csv(ledger.publish("run1", "n1"))
    ledger.record("run2", [row("a.png", "new"), row("a.png", "new", model="ct", bundle="b-ct", classes=CT)])
    ledger.publish("run2", "n2")
    cumulative = read_csv(ledger.write_cumulative())
    assert sorted((r["relative_path"], r["model"], r["file_sha256"]) for r in cumulative) == [
        ("a.png", "ct", "new"), ("a.png", "hist", "new"), ("b.png", "hist", "sha-b.png")]
    assert {r["file_sha256"] for r in first if r["relative_path"] == "a.png"} == {"old"}  # history kept


def test_an_error_row_never_hides_the_last_result_in_the_cumulative_csv(ledger):
    """A refused new model version (error rows for every scan) and a file that could not be read one
    night (an error row without content hash) leave the last good result current; an error for new
    content shows until that content has a result."""
    ledger.record("run1", [row("a.png", "x"), row("b.png", "y")])
    ledger.publish("run1", "n1")
    ledger.record("run2", [row("a.png", "x", bundle="b2", version="2", status="error"),
                           row("b.png", "", bundle="b1", status="error")])
    ledger.publish("run2", "n2")
    current = {r["relative_path"]: (r["file_sha256"], r["status"]) for r in read_csv(ledger.write_cumulative())}
    assert current == {"a.png": ("x", "ok"), "b.png": ("y", "ok")}
    ledger.record("run3", [row("a.png", "x2", bundle="b1", status="error")])  # changed, and failed
    ledger.publish("run3", "n3")
    current = {r["relative_path"]: (r["file_sha256"], r["status"]) for r in read_csv(ledger.write_cumulative())}
    assert current == {"a.png": ("x2", "error"), "b.png": ("y", "ok")}
    ledger.record("run4", [row("a.png", "x2", bundle="b1")])
    ledger.publish("run4", "n4")
    current = {r["relative_path"]: (r["file_sha256"], r["status"]) for r in read_csv(ledger.write_cumulative())}
    assert current == {"a.png": ("x2", "ok"), "b.png": ("y", "ok")}


def test_text_cells_that_a_spreadsheet_would_run_are_neutralised(ledger):
    """OWASP CSV injection: a name starting with = + - @, tab or CR is written with a ' in front, in
    every CSV; the ledger keeps the true name, and dropping one leading ' gives it back (issue 16, defect 1)."""
    names = ["=1+1.png", "+1+1.png", "@SUM(1+1).png", "-2+3.png", "\tx.png", "\rx.png", "'quoted.png", "ok.png"]
    ledger.record("run1", [row(n, status="rejected", error=f"{n}: not a readable image; re-export it") for n in names])
    for path in (ledger.publish("run1", "n1"), ledger.write_cumulative()):
        got = {r["relative_path"]: r for r in read_csv(path)}
        assert set(got) == {"'" + n for n in names[:-1]} | {"ok.png"}
        for cell in (c for r in got.values() for c in r.values()):
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
        assert {k[1:] if k.startswith("'") else k for k in got} == set(names)
    stored = {json.loads(j)["relative_path"] for (j,) in ledger._db.execute("SELECT row_json FROM rows")}
    assert stored == set(names)


def test_unpublished_rows_are_not_in_cumulative(ledger):
    ledger.record("run1", [row("a.png")])
    ledger.publish("run1", "n1")
    ledger.record("run2", [row("b.png")])
    assert [r["relative_path"] for r in read_csv(ledger.write_cumulative())] == ["a.png"]


def test_publish_rejects_unsafe_stamps(ledger):
    for stamp in ["../x", "a/b", "", "cumulative", " x"]:
        with pytest.raises(ValueError):
            ledger.publish("run", stamp)


# ----------------------------------------------------------------------------------- crash recovery
def test_crash_between_claim_and_csv_is_recovered(tmp_path, ledger_url):
    out = tmp_path / "out"
    with Ledger(out, url=ledger_url) as first:
        first.record("run1", [row(f"a{i}.png") for i in range(4)])
        name = first._claim("run1", "n1")  # ... and the process dies before writing the CSV
    assert not (out / name).exists()

    with Ledger(out, url=ledger_url) as second:  # the rerun: scores what is not done, then publishes
        items = [(f"a{i}.png", f"sha-a{i}.png") for i in range(6)]
        todo = [it for it in items if it not in second.done("hist", "b1", items)]
        assert todo == items[4:]
        second.record("run2", [row(p, s) for p, s in todo])
        night2 = second.publish("run2", "n2")
        second.write_cumulative()
    recovered = read_csv(out / "scores-n1.csv")
    assert [(r["relative_path"], r["run_id"]) for r in recovered] == [(f"a{i}.png", "run1") for i in range(4)]
    assert [r["relative_path"] for r in read_csv(night2)] == ["a4.png", "a5.png"]
    union = Counter(r["relative_path"] for p in night_csvs(out) for r in read_csv(p))
    assert union == Counter({f"a{i}.png": 1 for i in range(6)})
    assert Counter(r["relative_path"] for r in read_csv(out / CUMULATIVE_NAME)) == union


def test_crash_after_csv_before_mark_is_rewritten(tmp_path, ledger_url):
    out = tmp_path / "out"
    with Ledger(out, url=ledger_url) as first:
        first.record("run1", [row("a.png"), row("b.png")])
        name = first._claim("run1", "n1")
        (out / name).write_text("relative_path\nstale\n")  # whatever is there is replaced
    with Ledger(out, url=ledger_url) as second:
        night = second.publish("run2", "n2")
    assert [r["relative_path"] for r in read_csv(out / name)] == ["a.png", "b.png"]
    assert read_csv(night) == []


def test_killed_process_then_rerun_scores_each_file_once(tmp_path, ledger_url):
    """A real kill -9 in the middle of a run (between batches), then a full rerun. With PostgreSQL
    there is no output folder lock: the database alone keeps the rows exactly once."""
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import sys, time
        from contextlib import nullcontext
        from lung_models.scoring import Ledger, scoring_lock
        out, run, url = sys.argv[1], sys.argv[2], (sys.argv[4] or None)
        items = [(f"f{i:03d}.png", f"sha{i}") for i in range(60)]
        lock = scoring_lock(out, timeout=30, poll=0.05) if url is None else nullcontext()
        with lock, Ledger(out, url=url) as led:
            done = led.done("m", "b1", items)
            todo = [it for it in items if it not in done]
            for start in range(0, len(todo), 10):
                led.record(run, [{"relative_path": p, "file_sha256": s, "model": "m", "model_version": "1",
                                  "bundle_sha256": "b1", "status": "ok", "prob_x": 0.5}
                                  for p, s in todo[start:start + 10]])
                print("batch", flush=True)
                time.sleep(float(sys.argv[3]))
            led.publish(run, "night")
            led.write_cumulative()
        print("finished", len(todo), flush=True)
    """)
    victim = subprocess.Popen([sys.executable, "-c", script, str(out), "run1", "0.3", ledger_url or ""],
                              stdout=subprocess.PIPE,
                              text=True, env=subprocess_env())
    try:
        for _ in range(2):
            assert victim.stdout.readline().strip() == "batch"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        victim.stdout.close()
    done = subprocess.run([sys.executable, "-c", script, str(out), "run2", "0", ledger_url or ""],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    scored_again = int(done.stdout.split()[-1])
    assert 0 < scored_again <= 40  # at least the two committed batches were not redone
    union = Counter(r["relative_path"] for p in night_csvs(out) for r in read_csv(p))
    assert union == Counter({f"f{i:03d}.png": 1 for i in range(60)})
    assert Counter(r["relative_path"] for r in read_csv(out / CUMULATIVE_NAME)) == union


# -------------------------------------------------------------------------------------- atomicity
def test_atomic_writer_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "report.csv"
    target.write_text("old,complete\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(target) as fh:
            fh.write("new,partial\n" * 1000)
            raise RuntimeError("boom")
    assert target.read_text() == "old,complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]
    with atomic_writer(target) as fh:
        fh.write("new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o666 & ~fileutil.current_umask()  # not mkstemp's 0600


def test_csv_never_observed_partial(ledger, monkeypatch):
    out = ledger.output_dir
    ledger.record("run1", [row(f"a{i}.png") for i in range(5)])
    ledger.publish("run1", "n1")
    cumulative = ledger.write_cumulative()
    before = cumulative.read_bytes()

    class DiskFull(csv.DictWriter):
        def writerow(self, rowdict):
            self.written = getattr(self, "written", 0) + 1
            if self.written > 3:
                raise OSError(28, "No space left on device")
            return super().writerow(rowdict)

    ledger.record("run2", [row(f"b{i}.png") for i in range(10)])
    monkeypatch.setattr(report_mod.csv, "DictWriter", DiskFull)
    with pytest.raises(OSError, match="No space"):
        ledger.publish("run2", "n2")
    assert not (out / "scores-n2.csv").exists()
    with pytest.raises(OSError, match="No space"):
        ledger.write_cumulative()
    assert cumulative.read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()

    night3 = ledger.publish("run3", "n3")  # recovers n2 first
    assert [r["relative_path"] for r in read_csv(out / "scores-n2.csv")] == [f"b{i}.png" for i in range(10)]
    assert read_csv(night3) == []
    assert len(read_csv(ledger.write_cumulative())) == 15


def test_publish_removes_temp_files_left_by_a_killed_writer(ledger):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = ledger.output_dir / f".scores-n1.csv.{int(gone.stdout)}.abc123.tmp"
    live = ledger.output_dir / f".scores-n1.csv.{os.getpid()}.def456.tmp"  # a writer still at work
    page = ledger.output_dir / f".report-n0.html.{int(gone.stdout)}.ghi789.tmp"  # a page writer killed mid-page
    live_page = ledger.output_dir / f".report-n0.html.{os.getpid()}.jkl012.tmp"
    heat = ledger.output_dir / "heatmaps" / "m" / "v1"
    heat.mkdir(parents=True)
    dead_map = heat / f".a.png-0123.png.{int(gone.stdout)}.mno345.tmp"  # a heat map writer killed mid-file
    theirs = ledger.output_dir / f".photo.png.{int(gone.stdout)}.pqr678.tmp"  # not ours: only heatmaps/ holds ours
    stale.write_text("relative_path\npartial")
    live.write_text("relative_path\n")
    for path in (page, live_page, dead_map, theirs):
        path.write_text("x")
    ledger.publish("run1", "n1")
    assert not stale.exists() and live.exists()
    assert not page.exists() and live_page.exists()
    assert not dead_map.exists() and theirs.exists()


def test_a_temp_file_of_another_host_is_judged_by_its_age_alone(ledger):
    """A pid means nothing across hosts: another host's CSV temp file may be a live write in progress."""
    out = ledger.output_dir
    out.mkdir(parents=True, exist_ok=True)
    young = out / ".scores-n1.csv.999999@other-host.abc123.tmp"  # pid 999999 is dead here, maybe not there
    old = out / ".scores-n0.csv.999999@other-host.def456.tmp"
    young.write_text("x")
    old.write_text("x")
    stale = time.time() - ledger_mod.STALE_TEMP_SECONDS - 60
    os.utime(old, (stale, stale))
    ledger.publish("run1", "n2")
    assert young.exists() and not old.exists()


def test_publish_removes_old_temp_files_even_if_their_pid_is_reused(ledger):
    """In a container PIDs restart: a writer killed an hour ago may have had the pid of a process alive
    now (here our own). Under the scoring lock an hour-old temp file is stale whatever its pid says."""
    out = ledger.output_dir
    reused = out / f".scores-n1.csv.{os.getpid()}.abc123.tmp"
    reused_cumulative = out / f".{CUMULATIVE_NAME}.1.xyz789.tmp"  # pid 1: always alive in a container
    fresh = out / f".scores-n1.csv.{os.getpid()}.def456.tmp"  # a writer still at work
    unrelated = out / ".notes.txt.1.abc.tmp"  # not a temp file of ours, whatever its age
    hour_ago = time.time() - 3700
    for path in (reused, reused_cumulative, fresh, unrelated):
        path.write_text("relative_path\npartial")
    for path in (reused, reused_cumulative, unrelated):
        os.utime(path, (hour_ago, hour_ago))
    with scoring_lock(out):
        ledger.publish("run1", "n1")
    assert not reused.exists() and not reused_cumulative.exists()
    assert fresh.exists() and unrelated.exists()


# ------------------------------------------------------------------------------------------ scale
def test_100k_rows_stream_through(tmp_path, ledger_url):
    out = tmp_path / "out"
    n, batch = 100_000, 1000
    with Ledger(out, url=ledger_url) as led:
        for start in range(0, n, batch):
            rows = [{"relative_path": f"d{i // 1000}/f{i}.png", "file_sha256": f"{i:064x}", "model": "m",
                     "model_version": "1", "bundle_sha256": "b1", "status": "ok", "predicted_class": "x",
                     "prob_x": 0.75, "prob_y": 0.25} for i in range(start, start + batch)]
            assert led.record("run1", rows) == batch
        items = ((f"d{i // 1000}/f{i}.png", f"{i:064x}") for i in range(n))
        assert len(led.done("m", "b1", items)) == n
        night = led.publish("run1", "big")
        tracemalloc.start()
        try:
            cumulative = led.write_cumulative()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    for path in (night, cumulative):
        with open(path, newline="") as fh:
            assert sum(1 for _ in fh) == n + 1
    assert peak < 16 * 2**20, f"write_cumulative peaked at {peak / 2**20:.1f} MiB: rows are not streamed"


# ------------------------------------------------------------------------------------------- lock
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from lung_models.scoring.lock import scoring_lock
    with scoring_lock(sys.argv[1], timeout=10, label="flow-run holder"):
        print("locked", flush=True)
        time.sleep(120)
""")
TRY_LOCK = textwrap.dedent("""
    import sys
    from lung_models.scoring.lock import ScoringLockTimeout, scoring_lock
    try:
        with scoring_lock(sys.argv[1], timeout=1, poll=0.1):
            print("acquired")
    except ScoringLockTimeout as exc:
        print("TIMEOUT", exc)
""")


def test_lock_times_out_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with scoring_lock(out, label="run-A") as lock_path:
        assert lock_path == out / LOCK_NAME
        assert f"pid={os.getpid()}" in lock_path.read_text()
        result = subprocess.run([sys.executable, "-c", TRY_LOCK, str(out)], capture_output=True, text=True,
                                timeout=60, env=subprocess_env())
        assert result.returncode == 0, result.stderr
        message = result.stdout
        assert message.startswith("TIMEOUT another scoring run holds the lock")
        assert f"pid {os.getpid()}" in message and str(lock_path) in message and "run-A" in message
        assert "started 20" in message and "do not delete the lock file" in message
    result = subprocess.run([sys.executable, "-c", TRY_LOCK, str(out)], capture_output=True, text=True,
                            timeout=60, env=subprocess_env())
    assert result.stdout.strip() == "acquired"


def test_lock_is_free_at_once_after_holder_is_killed(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ScoringLockTimeout, match=f"pid {holder.pid}"):
            with scoring_lock(out, timeout=0.3, poll=0.05):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    started = time.monotonic()
    with scoring_lock(out, timeout=0):  # one attempt: the kernel released it with the process
        pass
    assert time.monotonic() - started < 1


# ------------------------------------------------------------------------------------ concurrency
CONCURRENT_RUN = textwrap.dedent("""
    import sys, time
    from contextlib import nullcontext
    from lung_models.scoring import Ledger, scoring_lock
    out, run, use_lock = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    items = [(f"scan_{i:03d}.png", f"sha{i}") for i in range(200)]
    with Ledger(out) as led, (scoring_lock(out, timeout=60, poll=0.05) if use_lock else nullcontext()):
        todo = [it for it in items if it not in led.done("m", "b1", items)]
        for start in range(0, len(todo), 25):
            led.record(run, [{"relative_path": p, "file_sha256": s, "model": "m", "model_version": "1",
                              "bundle_sha256": "b1", "status": "ok", "prob_x": 0.5}
                             for p, s in todo[start:start + 25]])
            time.sleep(0.01)
        led.publish(run, "20260101")
        if use_lock:
            led.write_cumulative()
    print(len(todo))
""")


@pytest.mark.parametrize("use_lock", [True, False], ids=["locked", "no-lock-still-exactly-once"])
def test_two_concurrent_runs_neither_lose_nor_duplicate(tmp_path, use_lock):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, str(out), f"run{k}", str(int(use_lock))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for k in (1, 2)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
    scored = sorted(int(stdout) for stdout, _ in results)
    if use_lock:
        assert scored == [0, 200]  # the second run found everything done
    nights = night_csvs(out)
    assert [p.name for p in nights] == ["scores-20260101-2.csv", "scores-20260101.csv"]
    union = Counter(r["relative_path"] for p in nights for r in read_csv(p))
    assert len(union) == 200 and set(union.values()) == {1}
    if not use_lock:  # unlocked, the two cumulative rewrites may finish in either order: redo it
        with Ledger(out) as led:
            led.write_cumulative()
    assert Counter(r["relative_path"] for r in read_csv(out / CUMULATIVE_NAME)) == union


SHARING_RUN = textwrap.dedent("""
    import os, sys, time
    from contextlib import nullcontext
    from lung_models.scoring import Ledger, scoring_lock
    out, run, url, go = sys.argv[1], sys.argv[2], (sys.argv[3] or None), sys.argv[4]
    items = [(f"scan_{i:03d}.png", f"sha{i}") for i in range(200)]
    scored = 0
    print("ready", flush=True)
    while not os.path.exists(go):  # both runs start together, whatever their import times
        time.sleep(0.01)
    with Ledger(out, url=url) as led:
        for start in range(0, len(items), 20):  # one shard of 20 items at a time, as a worker takes them
            shard = f"{run}-{start}"
            chunk = [it for it in items[start:start + 20] if it not in led.done("m", "b1", items[start:start + 20])]
            held = led.claim(run, shard, [(p, s, "b1", "m") for p, s in chunk])
            mine = [(p, s) for p, s in chunk if (p, s, "b1", "m") in held]
            time.sleep(0.1 * len(mine) / 20)  # scoring takes time: the other run gets its turn
            led.record(run, [{"relative_path": p, "file_sha256": s, "model": "m", "model_version": "1",
                              "bundle_sha256": "b1", "status": "ok", "prob_x": 0.5} for p, s in mine], shard=shard)
            led.release(run, shard)
            scored += len(mine)
        with scoring_lock(out, timeout=60) if url is None else nullcontext():  # SQLite publishes under the lock
            led.publish(run, "20260102")
    print(scored)
""")


def test_two_runs_share_a_night_through_claims(tmp_path, ledger_url):
    """Two runs at once, no output folder lock: each scores the keys it claimed, none twice, and
    together they score everything once; their two night CSVs hold every row exactly once."""
    out = tmp_path / "out"
    Ledger(out, url=ledger_url).close()  # schema in place before both start (they would race to create it)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SHARING_RUN, str(out), f"run{k}", ledger_url or "", str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for k in (1, 2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
    scored = [int(stdout) for stdout, _ in results]
    assert sum(scored) == 200, f"claims should split the work, not repeat it: {scored}"
    assert min(scored) > 0, f"both runs should have done part of the night: {scored}"
    union = Counter(r["relative_path"] for p in night_csvs(out) for r in read_csv(p))
    assert len(union) == 200 and set(union.values()) == {1}
    with Ledger(out, url=ledger_url) as led:
        assert led.claims() == []  # every claim ended with its rows


def test_a_dead_runs_claims_lapse_and_its_own_redone_shard_takes_them_over(ledger):
    keys = [(f"a{i}.png", f"sha{i}", "b1", "m") for i in range(4)]
    assert ledger.claim("run1", "s1", keys) == set(keys)
    assert ledger.claim("run2", "s9", keys) == set()  # held by a live run
    assert ledger.claim("run1", "s1-again", keys[:2]) == set(keys[:2])  # the same run redoing its shard
    assert ledger.claim("run2", "s9", keys, lease=60) == set()
    ledger._db.execute("UPDATE claims SET expires = expires - 10000")  # run1 died long ago
    assert ledger.claim("run2", "s9", keys) == set(keys)
    ledger.record("run2", [row(p, s, bundle=b, model=m) for p, s, b, m in keys[:3]], shard="s9")
    assert [c["relative_path"] for c in ledger.claims()] == ["a3.png"]
    assert ledger.release("run2", "s9") == 1 and ledger.claims() == []


def test_a_postgres_ledger_belongs_to_one_output_folder(tmp_path, postgres_url):
    with Ledger(tmp_path / "ward7", url=postgres_url):
        pass
    with Ledger(tmp_path / "ward7", url=postgres_url):  # the same folder again: fine
        pass
    from lung_models.scoring.database import LedgerUnavailable
    with pytest.raises(LedgerUnavailable, match="belongs to another output folder"):
        Ledger(tmp_path / "ward8", url=postgres_url)


def test_an_unreachable_postgres_ledger_says_where_and_what_to_check(tmp_path):
    from lung_models.scoring.database import LedgerUnavailable
    with pytest.raises(LedgerUnavailable) as raised:
        Ledger(tmp_path / "out", url="postgresql://scorer:s3cret@127.0.0.1:9/ledger?connect_timeout=2")
    message = str(raised.value)
    assert "127.0.0.1:9/ledger" in message and "s3cret" not in message and "check that the server runs" in message


def test_claims_of_a_killed_postgres_client_are_free_at_once(tmp_path, postgres_url):
    """The server ends a killed process's connection, and with it the claims it took: a rerun started
    right after a crash scores those scans instead of waiting for the lease to lapse."""
    out = tmp_path / "out"
    Ledger(out, url=postgres_url).close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from lung_models.scoring import Ledger
        led = Ledger(sys.argv[1], url=sys.argv[2])
        led.claim("run1", "s1", [("a.png", "sha-a", "b1", "m")])
        print("claimed", flush=True)
        time.sleep(120)
    """), str(out), postgres_url], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with Ledger(out, url=postgres_url) as led:
            assert led.claim("run2", "s9", [("a.png", "sha-a", "b1", "m")]) == set()  # alive: left to it
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            deadline = time.time() + 10
            while not (got := led.claim("run2", "s9", [("a.png", "sha-a", "b1", "m")])) and time.time() < deadline:
                time.sleep(0.1)
            assert got == {("a.png", "sha-a", "b1", "m")}
    finally:
        holder.kill()
        holder.stdout.close()


def test_a_run_holding_the_sqlite_lock_ends_dead_runs_claims(tmp_path):
    out = tmp_path / "out"
    with Ledger(out) as led:
        led.claim("dead-run", "s1", [("a.png", "sha-a", "b1", "m")])
        with scoring_lock(out, timeout=0):
            led.start_night("run2", [], exclusive=True)
        assert led.claim("run2", "s2", [("a.png", "sha-a", "b1", "m")]) == {("a.png", "sha-a", "b1", "m")}


def test_one_output_folder_keeps_one_kind_of_ledger(tmp_path, postgres_url):
    """A run with the other kind of ledger would find none of the folder's rows and publish them all again."""
    from lung_models.scoring.database import LedgerUnavailable
    sqlite_folder, pg_folder = tmp_path / "one-host", tmp_path / "cluster"
    Ledger(sqlite_folder).close()
    with pytest.raises(LedgerUnavailable, match="already has a SQLite ledger"):
        Ledger(sqlite_folder, url=postgres_url)
    Ledger(pg_folder, url=postgres_url).close()
    with pytest.raises(LedgerUnavailable, match="keeps its ledger in a PostgreSQL database"):
        Ledger(pg_folder)


def test_redacted_urls_and_messages_never_hold_the_password(tmp_path):
    from lung_models.scoring.database import LedgerUnavailable, redact
    assert redact("postgresql://scorer:s3cret@db:5432/ledger") == "postgresql://scorer:***@db:5432/ledger"
    assert "s3cret" not in redact("postgresql://scorer@db/ledger?sslmode=require&password=s3cret")
    assert "s3cret" not in redact("postgresql://scorer:s3cret@db:notaport/ledger")
    for url in ("postgresql://scorer:pa%zzs3cret@127.0.0.1:9/ledger?connect_timeout=2",
                "postgresql://scorer:s3cret@with@127.0.0.1:9/ledger?connect_timeout=2"):
        with pytest.raises(LedgerUnavailable) as raised:
            Ledger(tmp_path / "out", url=url)
        assert "s3cret" not in str(raised.value), str(raised.value)
