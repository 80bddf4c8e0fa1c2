"""The model bundle: ``exports/<model>/<version>/`` with ``model.onnx`` and ``model_card.json``.

A bundle describes itself: the scorer needs nothing but the folder. Versions are never
overwritten; ``exports/<model>/LATEST`` names the promoted one, the version the nightly scorer uses
(``lung_models.promotion``: a new export moves it only when it passes its gate).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lung_models.fileutil import sha256_file

log = logging.getLogger(__name__)

CARD = "model_card.json"
ONNX = "model.onnx"
LATEST = "LATEST"


class BundleError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelBundle:
    path: Path
    card: dict[str, Any]
    promoted: bool = False  # LATEST named this version when it was loaded

    @property
    def name(self) -> str:
        return self.card["model"]["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX

    @property
    def class_names(self) -> list[str]:
        return list(self.card["model"]["class_names"])

    @property
    def modality(self) -> str:
        return self.card["model"]["modality"]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.card["preprocessing"]

    def verify(self, path: Path | None = None, expected: str | None = None) -> str:
        """Check an ONNX file of the bundle (default: the fp32 graph) against the sha256 recorded at
        export; return the hash."""
        path = path or self.onnx_path
        expected = expected or self.card["onnx_sha256"]
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 {actual} does not match {expected} recorded in {self.path / CARD}; "
                "the file was changed after export: re-export the model or restore the file")
        return actual


def load_bundle(path: str | Path) -> ModelBundle:
    path = Path(path)
    card_path = path / CARD
    if not card_path.is_file() or not (path / ONNX).is_file():
        raise BundleError(f"{path}: not a model bundle (needs {CARD} and {ONNX}); run the train flow")
    try:
        card = json.loads(card_path.read_text())
        missing = [k for k in ("version", "model", "preprocessing", "onnx_sha256") if k not in card]
    except (ValueError, OSError) as exc:
        raise BundleError(f"{card_path}: unreadable model card ({exc}); re-export the model") from None
    if missing:
        raise BundleError(f"{card_path}: model card lacks {', '.join(missing)}; re-export the model")
    pointer = path.parent / LATEST
    try:
        promoted = pointer.read_text().strip() == card["version"]
    except OSError:
        promoted = False
    return ModelBundle(path=path, card=card, promoted=promoted)


def latest_version(exports_root: str | Path, model_name: str) -> Path | None:
    pointer = Path(exports_root) / model_name / LATEST
    if not pointer.is_file():
        return None
    version = pointer.read_text().strip()
    path = pointer.parent / version
    if not path.is_dir():
        raise BundleError(f"{pointer} names version {version!r}, which does not exist; "
                          "re-run the train flow or fix the pointer")
    return path


def exported_versions(model_dir: str | Path) -> list[str]:
    """Complete bundles of a model, oldest first (versions are UTC times and sort as such; a staging
    folder starts with '.', and a folder without a card is not a bundle)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / CARD).is_file())


def newest_version(exports_root: str | Path, model_name: str) -> Path | None:
    """The most recent complete export of a model, promoted or not."""
    versions = exported_versions(Path(exports_root) / model_name)
    return Path(exports_root) / model_name / versions[-1] if versions else None


def latest_bundles(exports_root: str | Path, names: list[str] | None = None,
                   include_unpromoted: bool = False) -> dict[str, ModelBundle]:
    """The promoted bundle of each model found under ``exports_root`` (or of the named ones); with
    ``include_unpromoted``, each model's newest export instead, promoted or not (the demo's choice)."""
    root = Path(exports_root)
    found: dict[str, ModelBundle] = {}
    candidates = names if names else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for name in candidates:
        try:
            path = newest_version(root, name) if include_unpromoted else latest_version(root, name)
            if path is None:
                if newest_version(root, name) is not None:
                    raise BundleError(f"{root / name}: no promoted version of model {name!r}: its exports did not "
                                      f"pass their gate (lung-factory bundles list {name}); promote one by hand "
                                      "(lung-factory bundles promote) or train a better one")
                raise BundleError(f"{root / name}: no exported version of model {name!r}; "
                                  "train it first (lung-factory train --models ...)")
            found[name] = load_bundle(path)
        except (BundleError, ValueError, KeyError) as exc:
            if names:  # asked for by name: its absence is an error
                raise
            log.error("skipping %s: %s", root / name, exc)  # scanning everything: one bad folder is skipped
    return found
