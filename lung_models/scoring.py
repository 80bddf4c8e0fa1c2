"""Score files with exported bundles on ONNX Runtime, in batches, one result row per (file, model).

Preprocessing is rebuilt from the bundle's card alone. A file that cannot be read or
preprocessed becomes an ``error`` row with the reason, and scoring goes on.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import preprocess
from lung_models.bundle import ModelBundle
from lung_models.data.datasets import reader_for
from lung_models.data.readers import InputError, file_kind
from lung_models.export import ort_session
from lung_models.fileutil import atomic_write_text, sha256_file
from lung_models.registry import CT_SLICE, CT_VOLUME, HISTOLOGY_TILE

log = logging.getLogger(__name__)

# Which kinds of incoming file each modality scores. An image whose kind cannot be told (it does
# not even open) goes to every image model, so each reports the error on its row.
MODALITY_INPUTS = {HISTOLOGY_TILE: {HISTOLOGY_TILE, "image"}, CT_SLICE: {CT_SLICE, "image"},
                   CT_VOLUME: {CT_VOLUME}}
VOLUME_BATCH = 2
BASE_COLUMNS = ["relative_path", "file_sha256", "model", "model_version", "predicted_class",
                "status", "error", "provider", "scored_utc"]


@dataclass
class LoadedModel:
    bundle: ModelBundle
    session: Any
    provider: str
    input_name: str


def open_model(bundle: ModelBundle) -> LoadedModel:
    """Verify the ONNX file against the bundle, open a session, note the provider that runs."""
    bundle.verify()
    session = ort_session(bundle.onnx_path)
    provider = session.get_providers()[0]
    log.info("%s %s runs on ONNX Runtime %s", bundle.name, bundle.version, provider)
    return LoadedModel(bundle, session, provider, session.get_inputs()[0].name)


def predict(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    return model.session.run(None, {model.input_name: batch.astype(np.float32, copy=False)})[0]


def discover(input_dir: Path) -> list[Path]:
    """Scoreable files under ``input_dir`` (recursive, hidden files skipped), sorted."""
    input_dir = Path(input_dir)
    return sorted(
        p for p in input_dir.rglob("*")
        if p.is_file() and file_kind(p) is not None
        and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def score_files(model: LoadedModel, files: Iterable[Path], root: Path, hashes: dict[str, str],
                batch_size: int = 8) -> Iterator[dict[str, Any]]:
    """Yield one row per file; files are read and preprocessed one at a time and run in batches,
    so memory stays bounded by the batch size."""
    bundle = model.bundle
    params = bundle.preprocessing
    read = reader_for(params)
    if params["kind"] == "ct_volume":  # a batch of 3-D volumes costs gigabytes: keep it small
        batch_size = min(batch_size, VOLUME_BATCH)
    classes = bundle.class_names
    pending: list[tuple[Path, np.ndarray]] = []

    def row(path: Path, **values: Any) -> dict[str, Any]:
        return result_row(bundle, path, root, hashes, provider=model.provider, **values)

    def flush() -> Iterator[dict[str, Any]]:
        paths = [p for p, _ in pending]
        try:
            probs = predict(model, np.stack([x for _, x in pending]))
        except Exception as exc:  # a runtime failure fails this batch's rows, not the night
            for path in paths:
                yield row(path, status="error", error=f"inference failed: {type(exc).__name__}: {exc}")
        else:
            for path, p in zip(paths, probs):
                yield row(path, status="ok", predicted_class=classes[int(np.argmax(p))],
                          **{f"prob_{c}": float(v) for c, v in zip(classes, p)})
        pending.clear()

    for path in files:
        try:
            pending.append((path, preprocess.model_input(read(path), params)))
        except InputError as exc:
            yield row(path, status="error", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one unreadable file must never end the night
            yield row(path, status="error", error=f"{path.name}: cannot be read or preprocessed "
                      f"({type(exc).__name__}: {exc}); check the file")
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


def input_kind(path: Path) -> str:
    """``ct_volume``, ``ct_slice`` (grey image), ``histology_tile`` (colour image) or ``image``
    (an image that does not open: its error is reported by the models that would score it)."""
    if file_kind(path) == "volume":
        return CT_VOLUME
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
                return CT_SLICE
            img.draft("RGB", (128, 128))  # JPEG: decode at reduced size, it is only a colour check
            thumb = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int16)
    except Exception:  # noqa: BLE001 - any failure: let the readers name the problem on the row
        return "image"
    # Stained tissue is colourful; a CT slice saved as RGB has (nearly) equal channels.
    spread = np.abs(thumb - thumb.mean(axis=2, keepdims=True)).mean()
    return CT_SLICE if spread < 2.0 else HISTOLOGY_TILE


def files_for(bundle: ModelBundle, files: list[Path], kinds: dict[str, str], root: Path) -> list[Path]:
    wanted = MODALITY_INPUTS[bundle.modality]
    return [f for f in files if kinds.get(f.relative_to(root).as_posix()) in wanted]


def result_row(bundle: ModelBundle, path: Path, root: Path, hashes: dict[str, str], **values: Any) -> dict[str, Any]:
    """One report row; ``values`` fill status, error, predicted class, probabilities, provider."""
    rel = path.relative_to(root).as_posix()
    return {"relative_path": rel, "file_sha256": hashes.get(rel, ""), "model": bundle.name,
            "model_version": bundle.version, "provider": "", "scored_utc": _now(),
            "predicted_class": "", "error": "", **values}


def refused_rows(bundle: ModelBundle, files: Iterable[Path], root: Path, hashes: dict[str, str],
                 reason: str) -> list[dict[str, Any]]:
    """Rows for files a model could not score at all (its bundle was refused), so the report
    still lists every (file, model) pair and says why."""
    return [result_row(bundle, path, root, hashes, status="error", error=reason) for path in files]


def hash_files(files: list[Path], root: Path) -> dict[str, str]:
    hashes = {}
    for f in files:
        try:
            hashes[f.relative_to(root).as_posix()] = sha256_file(f)
        except OSError:  # unreadable: the reader will report it on its row
            hashes[f.relative_to(root).as_posix()] = ""
    return hashes


def report_columns(rows: list[dict[str, Any]]) -> list[str]:
    prob_cols: list[str] = []
    for r in rows:
        prob_cols.extend(k for k in r if k.startswith("prob_") and k not in prob_cols)
    return BASE_COLUMNS[:5] + prob_cols + BASE_COLUMNS[5:]


def write_report(rows: list[dict[str, Any]], path: Path) -> Path:
    """One CSV, written atomically: readers see the old file or the whole new one."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=report_columns(rows), extrasaction="raise", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
