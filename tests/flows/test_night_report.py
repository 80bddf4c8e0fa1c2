"""The night's HTML page, rendered in a real browser (headless Chromium), and the night's artifacts
on the flow run of a local Prefect server."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lung_models.data import phantoms
from lung_models.data.catalog import negative_class
from lung_models.scoring import html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("CI must render the night report in Chromium: .ci/run installs Debian's chromium package")
    pytest.skip("headless Chromium not found (Debian: apt-get install chromium); the page is not rendered")


def render(page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after Chromium loaded it, with what the browser measured of its images
    written into it by a probe script added to a copy of the page (the page itself has no script)."""
    probe = ("<script>window.addEventListener('load',()=>{const imgs=[...document.querySelectorAll('img.thumb')];"
             "const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0&&i.getBoundingClientRect().width>0);"
             "document.body.setAttribute('data-thumbs',imgs.length);document.body.setAttribute('data-shown',ok.length);"
             "});</script>")
    copy = tmp_path / f"probe-{page.name}"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _incoming(folder: Path) -> Path:
    """Tiles, CT slices, a NIfTI volume, a DICOM series, a corrupt volume (all settled) and one slice
    still arriving (skipped this run)."""
    phantoms.write_incoming(folder, seed=31, n_tiles=3, n_volumes=1, n_slices=3, n_dicom_series=1, corrupt=True,
                            tile_size=256, in_plane=64, slices=30, slice_size=256)
    old = time.time() - 3600
    for path in folder.rglob("*"):
        os.utime(path, (old, old))
    fresh = folder / "ct-slices" / "arriving.png"
    Image.fromarray(phantoms.ct_slice("normal", np.random.default_rng(5), size=128)).save(fresh)
    return fresh


@pytest.mark.slow
def test_the_night_page_shows_counts_and_every_thumbnail_in_chromium_and_the_artifacts_reach_prefect(
        factory, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    from flows.score import score_folder

    _chromium()
    folder = tmp_path / "incoming"
    fresh = _incoming(folder)
    out = tmp_path / "out"
    state = score_folder(input_dir=str(folder), output_dir=str(out), exports_dir=str(factory["exports"]),
                         settle_seconds=60, explain=True, return_state=True)
    night_csv = Path(state.result())
    pages = list(out.glob("report-*.html"))
    assert len(pages) == 1 and pages[0].name == night_csv.name.replace("scores-", "report-").replace(".csv", ".html")
    rows = _csv_rows(night_csv)
    flagged = [r for r in rows if r["status"] == "ok"
               and r["predicted_class"] != negative_class(list(json.loads(r["probabilities"])))]
    assert flagged and any(r["status"] != "ok" for r in rows)  # lc25000-cnn flags every tile; the broken volume

    dom = render(pages[0], tmp_path)
    counts = Counter((r["model"], r["status"]) for r in rows)
    for model in {r["model"] for r in rows}:
        row = re.search(rf"<tr data-model=\"{re.escape(model)}\">(.*?)</tr>", dom, re.S)
        assert row, model
        for status in ("ok", "rejected", "error"):
            cell = re.search(rf"data-status=\"{status}\">(\d+)<", row.group(1))
            assert int(cell.group(1)) == counts[(model, status)], (model, status)
        cell = re.search(r"data-status=\"flagged\">(\d+)<", row.group(1))
        assert int(cell.group(1)) == sum(1 for r in flagged if r["model"] == model)
    thumbs = int(re.search(r"data-thumbs=\"(\d+)\"", dom).group(1))
    shown = int(re.search(r"data-shown=\"(\d+)\"", dom).group(1))
    assert thumbs == shown == len(flagged)  # every flagged scan has a picture the browser drew
    # Heat maps (--explain): every flagged row names its PNG and the page shows it, saying what drew it:
    # Grad-CAM for a model with a convolution Keras can see, SmoothGrad for one whose convolutions are
    # inside an opaque TF-Hub module (ct-inception-hub with the fixture's tiny SavedModel).
    from PIL import Image

    from lung_models import explain
    from lung_models.bundle import load_bundle

    methods = {}
    for model in {r["model"] for r in flagged}:
        bundle = load_bundle(factory["bundles"][model])
        try:
            zeros = np.zeros((1, *bundle.card["input"]["shape"][1:]), "float32")
            explain.grad_cam(explain.keras_model(bundle), zeros, 0)
            methods[model] = "Grad-CAM on "
        except explain.NoFeatureMap:
            methods[model] = "SmoothGrad on the input pixels"
    for r in flagged:
        assert r["heatmap"], r
        with Image.open(out / r["heatmap"]) as picture:
            assert picture.format == "PNG" and picture.text["Description"].startswith(methods[r["model"]]), r
    assert dom.count("class=\"heat\"") == len(flagged)
    assert dom.count("title=\"Grad-CAM on ") == sum(1 for r in flagged if methods[r["model"]].startswith("Grad"))
    assert all(not r["heatmap"] for r in rows if r not in flagged)  # only flagged scans are explained
    assert "broken_scan.nii.gz" in dom and fresh.name in dom  # the refused file and the skipped one, with reasons
    assert "http://" not in pages[0].read_text() and "https://" not in pages[0].read_text()  # self-contained

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run_id])))
        run = client.read_flow_run(run_id)
        tasks = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[run_id])))}
    # Names that say what ran, not generated ones.
    assert re.fullmatch(r"night \d{4}-\d\d-\d\d \d\d:\d\dZ: incoming -> out", run.name), run.name
    assert f"find new files in {folder}" in tasks and "publish the night's reports" in tasks
    assert any(re.fullmatch(r"shard [0-9a-f]{8}-s\d{4}", t) for t in tasks), tasks
    by_key = {a.key: a for a in artifacts}
    assert {"nightly-scoring-report", "nightly-scoring-counts", "nightly-scoring-problems",
            "nightly-scoring-progress"} <= set(by_key)
    assert float(by_key["nightly-scoring-progress"].data) == 100.0  # every shard ended
    table = by_key["nightly-scoring-counts"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {t["model"]: t["ok"] for t in table} == {m: counts[(m, "ok")] for m in {r["model"] for r in rows}}
    problems = by_key["nightly-scoring-problems"].data
    problems = json.loads(problems) if isinstance(problems, str) else problems
    assert any(p["file"].endswith("broken_scan.nii.gz") for p in problems)
    assert any(p["status"] == "skipped" and p["file"].endswith(fresh.name) for p in problems)
    assert pages[0].name in by_key["nightly-scoring-report"].data


@pytest.mark.parametrize("kind", ["image", "nifti", "dicom_series"])
def test_a_thumbnail_of_each_kind_of_scan(tmp_path, kind):
    phantoms.write_incoming(tmp_path, seed=3, n_tiles=1, n_volumes=1, n_dicom_series=1, corrupt=False,
                            tile_size=256, in_plane=64, slices=30)
    from lung_models.data import dicom

    if kind == "image":
        row = {"relative_path": "slide_001.png", "item_kind": "image"}
    elif kind == "nifti":
        row = {"relative_path": "ct/scan_001.nii.gz", "item_kind": "nifti", "n_inputs": "1"}
    else:
        series, _ = dicom.group_series(sorted((tmp_path / "dicom" / "series_001").iterdir()))
        row = {"relative_path": "dicom/series_001", "item_kind": "dicom_series", "series_uid_hash": series[0].uid_hash,
               "n_inputs": "30", "predicted_class": "abnormal", "max_slice": json.dumps({"abnormal": 12})}
    picture = Image.open(io.BytesIO(html_report.thumbnail(tmp_path, row)))
    assert 16 <= max(picture.size) <= html_report.THUMBNAIL
    pixels = np.asarray(picture)
    assert pixels.std() > 5  # an anatomy, not a blank square


def test_the_page_escapes_hostile_names_and_finds_files_whose_csv_cell_was_escaped(tmp_path):
    """File names and error text are the input's, not ours: never markup. A file whose name starts with
    '-' is written to the CSV as '-scan.png (spreadsheet-safe); the page still finds it."""
    from lung_models.scoring.report import write_csv
    from lung_models.scoring.rows import COLUMNS

    Image.fromarray(phantoms.histology_tile("lung_aca", np.random.default_rng(2), 128)).save(tmp_path / "-scan.png")
    hostile = "'><img src=x onerror=alert(1)>.png"
    rows = [{"relative_path": "-scan.png", "model": "lc25000-cnn", "status": "ok", "item_kind": "image",
             "predicted_class": "lung_aca", "probability": 0.9, "n_inputs": 1,
             "probabilities": json.dumps({"lung_aca": 0.9, "lung_scc": 0.1}), "error": ""},
            {"relative_path": hostile, "model": "lc25000-cnn", "status": "rejected", "item_kind": "refused",
             "predicted_class": "", "error": "<script>alert(2)</script> not an image"}]
    night_csv = write_csv(tmp_path / "scores-20260101T000000Z-2.csv", list(COLUMNS),
                          (("run", json.dumps(r)) for r in rows))  # a generator: write_csv closes it
    page = html_report.write_night_report(tmp_path, tmp_path, night_csv, "20260101T000000Z",
                                          skipped=[("<b>late.png</b>", "still arriving")])
    assert page.name == "report-20260101T000000Z-2.html"  # one page per night CSV
    text = page.read_text()
    assert "<script>alert(2)" not in text and "<img src=x" not in text and "<b>late.png" not in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text and "&lt;b&gt;late.png&lt;/b&gt;" in text
    assert text.count("class='thumb'") == 1 and "data:image/png;base64," in text  # -scan.png was found
    assert ">-scan.png<" in text
