"""The night's page for people: ``OUT/report-<UTC time>.html``, one self-contained file (styles and
thumbnails inline, nothing fetched), written after the night's CSV.

It shows the counts per model and status, the scans each model flagged (a prediction other than its
data set's "no finding" class, with a thumbnail, the class, its probability and the CSV row it
came from), the rejected and error rows and the skipped files with their reasons, and links to
the CSVs. It is read from the night's CSV, so it shows exactly what the CSV holds.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lung_models.data.catalog import negative_class
from lung_models.explain import HEATMAP_DIR
from lung_models.fileutil import CSV_ESCAPE, atomic_write_text

log = logging.getLogger(__name__)

THUMBNAIL = 160  # pixels, the longer side
MAX_THUMBNAILS = 400  # a page a person reads; the rest of the flagged scans are counted and in the CSV
MAX_HEATMAP_BYTES = 4 * 2**20  # a heat map PNG larger than this is not one the scorer wrote
LUNG_WINDOW = (-600.0, 1500.0)  # centre and width in HU, how a reader looks at lung parenchyma
STATUSES = ("ok", "rejected", "error")


def _png(grey_or_rgb: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(grey_or_rgb))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _axial(volume_hu: np.ndarray, index: int | None) -> np.ndarray:
    """An axial slice of a RAS volume as a viewer shows it (anterior up, patient right on the left)."""
    from lung_models.data import dicom

    k = volume_hu.shape[2] // 2 if index is None else min(max(int(index), 0), volume_hu.shape[2] - 1)
    return dicom.window_to_uint8(volume_hu[::-1, ::-1, k].T, *LUNG_WINDOW)


def thumbnail(input_dir: Path, row: dict[str, str]) -> bytes:
    """A small PNG of the scan a row scored: the image, the DICOM slice, or the axial slice that
    gave the predicted class its highest probability (the middle one for a 3-D model's single input).
    Read again from the input folder; raises on a file that can no longer be read."""
    from lung_models.data import dicom, readers

    path = input_dir / row["relative_path"]
    kind = row.get("item_kind", "")
    slices = json.loads(row.get("max_slice") or "{}")
    index = slices.get(row.get("predicted_class", "")) if int(row.get("n_inputs") or 1) > 1 else None
    if kind == "image":
        return _png(readers.read_rgb_image(path))
    if kind == "dicom":
        return _png(dicom.window_to_uint8(dicom.read_slice_hu(path), *LUNG_WINDOW))
    if kind == "nifti":
        volume, _ = readers.read_nifti_hu(path)
        return _png(_axial(volume, index))
    if kind == "dicom_series":
        series, _ = dicom.group_series(sorted(p for p in path.iterdir() if p.is_file()))
        match = [s for s in series if s.uid_hash == row.get("series_uid_hash")]
        if not match:
            raise FileNotFoundError(f"{path}: series {row.get('series_uid_hash')} is no longer there")
        try:
            volume, _, _ = dicom.read_series_hu(match[0])
            return _png(_axial(volume, index))
        except readers.InputError:  # scored as separate slices: show the one that counted
            files = match[0].files
            pick = files[min(int(len(files) // 2 if index is None else index), len(files) - 1)]
            return _png(dicom.window_to_uint8(dicom.read_slice_hu(pick), *LUNG_WINDOW))
    raise ValueError(f"no thumbnail for item kind {kind!r}")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _class_names(row: dict[str, str]) -> list[str]:
    return list(json.loads(row.get("probabilities") or "{}"))


def summarise(night_csv: Path) -> dict[str, Any]:
    """Counts per model and status, the flagged rows and the refused rows of a night CSV (row numbers
    as a spreadsheet shows them: the header is row 1)."""
    counts: dict[str, Counter] = {}
    flagged: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    negatives: dict[str, str | None] = {}
    with open(night_csv, newline="", encoding="utf-8") as handle:
        for number, cells in enumerate(csv.DictReader(handle), start=2):
            # The CSV's text cells are spreadsheet-safe (fileutil.csv_cell: a leading ' before = + - @ ');
            # dropping one leading ' gives the true text back (a file named "-scan.png" must be found).
            row = {k: v[1:] if isinstance(v, str) and v.startswith(CSV_ESCAPE) else v for k, v in cells.items()}
            model = row["model"]
            counts.setdefault(model, Counter())[row["status"]] += 1
            if row["status"] != "ok":
                refused.append({**row, "row_number": number})
                continue
            if model not in negatives:
                negatives[model] = negative_class(_class_names(row))
            if row["predicted_class"] != negatives[model]:
                flagged.append({**row, "row_number": number})
    return {"counts": counts, "flagged": flagged, "refused": refused, "negatives": negatives}


def write_night_report(output_dir: str | Path, input_dir: str | Path, night_csv: str | Path, stamp: str,
                       skipped: list[tuple[str, str]] | None = None, cumulative: str | Path | None = None,
                       max_thumbnails: int = MAX_THUMBNAILS, summary: dict[str, Any] | None = None,
                       drift: dict[str, Any] | None = None) -> Path:
    """Write the night's page beside its CSV (``page_name``); returns its path. ``summary``: the CSV's
    ``summarise`` when the caller has it already; ``drift``: the night's drift report (``drift.json``)."""
    out, inp, night_csv = Path(output_dir), Path(input_dir), Path(night_csv)
    summary = summary if summary is not None else summarise(night_csv)
    thumbs: dict[tuple[str, str, str], str] = {}  # one picture per scan and slice, shared by the models
    shown = 0
    for row in summary["flagged"]:
        if shown >= max_thumbnails:
            break
        key = (row["relative_path"], row.get("series_uid_hash", ""), row.get("max_slice", ""))
        if key not in thumbs:
            try:
                thumbs[key] = _data_uri(thumbnail(inp, row))
            except Exception as exc:  # noqa: BLE001 - a file gone since scoring costs its picture, not the page
                log.warning("report: no thumbnail of %s (%s)", row["relative_path"], exc)
                thumbs[key] = ""
        row["thumbnail"] = thumbs[key]
        row["heatmap_uri"], row["heatmap_method"] = _heatmap(out, row.get("heatmap", ""))
        shown += 1
    page = _render(summary, night_csv, stamp, inp, skipped or [], Path(cumulative) if cumulative else None,
                   max_thumbnails, drift)
    path = out / page_name(night_csv)
    atomic_write_text(path, page)
    return path


def _heatmap(output_dir: Path, rel: str) -> tuple[str, str]:
    """The row's heat map (a PNG the scorer wrote under ``OUT/heatmaps``) as a data URI and what drew
    it (the PNG's ``Description``), ("", "") without one. Only a PNG of at most ``MAX_HEATMAP_BYTES``
    inside the heat maps' folder is embedded: a cell naming anything else (a crafted row in a shared
    ledger) is not followed."""
    from PIL import Image

    if not rel:
        return "", ""
    folder = (output_dir / HEATMAP_DIR).resolve()
    path = (output_dir / rel).resolve()
    try:
        if path.suffix != ".png" or not path.is_relative_to(folder) or not path.is_file() \
                or path.stat().st_size > MAX_HEATMAP_BYTES:
            raise ValueError("not a heat map the scorer wrote")
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG"):
            raise ValueError("not a PNG")
        with Image.open(io.BytesIO(data)) as picture:
            method = str(getattr(picture, "text", {}).get("Description", ""))[:300]
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # its picture is lost, not the page
        log.warning("report: heat map %s not shown (%s)", rel, exc)
        return "", ""
    return _data_uri(data), method


def page_name(night_csv: str | Path) -> str:
    """``scores-<stamp>[-n].csv`` -> ``report-<stamp>[-n].html``: one page per night CSV, even when two
    runs publish in the same second."""
    name = Path(night_csv).name
    return "report-" + name.removeprefix("scores-").removesuffix(".csv") + ".html"


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#1d2330}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccd;padding:.25em .6em;text-align:left}
th{background:#eef0f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{border:1px solid #ccd;border-radius:6px;padding:.5em;width:180px}
.card img{display:block;max-width:160px;max-height:160px;margin:0 auto .3em;background:#000}
.card .path{font-size:.8em;word-break:break-all}.cls{font-weight:600;overflow-wrap:anywhere}.warn{color:#9a3412}
.note{color:#555;font-size:.9em}
"""


def _drift_section(drift: dict[str, Any] | None) -> list[str]:
    """Per model: drift, no drift, too few inputs or no reference, with each feature's KS statistic."""
    e = html.escape
    if not drift:
        return ["<h2>Drift</h2><p>Not computed tonight (see the log).</p>"]
    parts = [f"<h2>Drift</h2><p class='note'>Are tonight's scans like the training data? {e(drift['test'])} test per "
             f"feature against each bundle's reference: {e(drift['rule'])}.</p>",
             "<table id='drift'><tr><th>model</th><th>verdict</th><th>inputs</th><th>KS statistic per feature "
             "(drifting ones in bold)</th></tr>"]
    for model, v in sorted(drift["models"].items()):
        cells = ", ".join((f"<b>{e(f)} {r['statistic']:.2f}</b>" if r["drift"] else f"{e(f)} {r['statistic']:.2f}")
                          for f, r in (v.get("features") or {}).items()) or e(v.get("note", ""))
        css = " class='warn'" if v["flagged"] else ""
        parts.append(f"<tr data-model='{e(model)}' data-drift='{e(v['status'])}'><td>{e(model)}</td>"
                     f"<td{css}>{e(v['status'])}</td><td class='n'>{v['n']}</td><td>{cells}</td></tr>")
    return parts + ["</table>"]


def _render(summary: dict[str, Any], night_csv: Path, stamp: str, input_dir: Path, skipped: list[tuple[str, str]],
            cumulative: Path | None, max_thumbnails: int, drift: dict[str, Any] | None = None) -> str:
    e = html.escape
    counts: dict[str, Counter] = summary["counts"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Night report {e(stamp)}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Night report {e(stamp)}</h1>",
             f"<p>Input folder <code>{e(str(input_dir))}</code>. "
             f"Rows: <a href='{e(night_csv.name)}'>{e(night_csv.name)}</a>"
             + (f"; every scan's current row: <a href='{e(cumulative.name)}'>{e(cumulative.name)}</a>" if cumulative
                else "") + ".</p>",
             "<p class='note'>Research use only, not for clinical decisions.</p>",
             "<h2>Counts per model and status</h2><table id='counts'><tr><th>model</th>"
             + "".join(f"<th>{s}</th>" for s in STATUSES) + "<th>flagged</th></tr>"]
    flagged_by_model = Counter(r["model"] for r in summary["flagged"])
    for model in sorted(counts):
        c = counts[model]
        parts.append(f"<tr data-model='{e(model)}'><td>{e(model)}</td>"
                     + "".join(f"<td class='n' data-status='{s}'>{c.get(s, 0)}</td>" for s in STATUSES)
                     + f"<td class='n' data-status='flagged'>{flagged_by_model.get(model, 0)}</td></tr>")
    total = Counter()
    for c in counts.values():
        total.update(c)
    parts.append("<tr><th>all</th>" + "".join(f"<th class='n'>{total.get(s, 0)}</th>" for s in STATUSES)
                 + f"<th class='n'>{len(summary['flagged'])}</th></tr></table>")

    parts += _drift_section(drift)
    parts.append("<h2>Flagged scans</h2>")
    if not summary["flagged"]:
        parts.append("<p>No model flagged a scan tonight.</p>")
    for model in sorted(flagged_by_model):
        negative = summary["negatives"].get(model)
        rows = [r for r in summary["flagged"] if r["model"] == model]
        why = (f"predicted other than <i>{e(negative)}</i>" if negative
               else "this model has no 'no finding' class: every scan it scored is shown")
        parts.append(f"<h3>{e(model)}: {len(rows)} ({why})</h3><div class='cards'>")
        for r in rows:
            if "thumbnail" not in r:
                continue
            img = (f"<img class='thumb' alt='{e(r['relative_path'])}' src='{r['thumbnail']}'>" if r["thumbnail"]
                   else "<p class='warn'>no picture: the file could not be read again</p>")
            if r.get("heatmap_uri"):
                img += (f"<img class='heat' alt='heat map of {e(r['relative_path'])}' src='{r['heatmap_uri']}'"
                        f" title='{e(r.get('heatmap_method') or 'heat map')}'>"
                        f"<div class='note'>{e((r.get('heatmap_method') or '').split(':')[0])}</div>")
            parts.append(f"<div class='card'>{img}<div class='cls'>{e(r['predicted_class'])} "
                         f"{float(r['probability'] or 0):.3f}</div><div class='path'>{e(r['relative_path'])}</div>"
                         f"<div class='note'><a href='{e(night_csv.name)}'>row {r['row_number']}</a>"
                         f"{' · unpromoted' if r.get('promoted') == 'no' else ''}</div></div>")
        parts.append("</div>")
    hidden = sum(1 for r in summary["flagged"] if "thumbnail" not in r)
    if hidden:
        parts.append(f"<p class='warn'>{hidden} more flagged rows are not shown (at most {max_thumbnails} a page); "
                     f"they are in {e(night_csv.name)}.</p>")

    parts.append("<h2>Rejected and error rows</h2>")
    if summary["refused"]:
        parts.append("<table id='refused'><tr><th>file</th><th>model</th><th>status</th><th>reason</th>"
                     "<th>row</th></tr>")
        for r in summary["refused"]:
            parts.append(f"<tr><td>{e(r['relative_path'])}</td><td>{e(r['model'])}</td><td>{e(r['status'])}</td>"
                         f"<td>{e(r['error'])}</td><td class='n'>{r['row_number']}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")
    parts.append("<h2>Skipped files</h2>"
                 "<p class='note'>Left for a later run (still arriving, or changed while read).</p>")
    if skipped:
        parts.append("<table id='skipped'><tr><th>file</th><th>reason</th></tr>"
                     + "".join(f"<tr><td>{e(p)}</td><td>{e(why)}</td></tr>" for p, why in skipped) + "</table>")
    else:
        parts.append("<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
