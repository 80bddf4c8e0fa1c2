"""ONNX Runtime sessions: a bundle's graph is verified before it is opened."""

from __future__ import annotations

import shutil

import pytest

from lung_models.bundle import BundleError, load_bundle


def test_a_tampered_onnx_file_is_refused(factory, tmp_path):
    from lung_models import scoring

    bundle_dir = tmp_path / "b"
    shutil.copytree(factory["bundles"]["mosmed-3dcnn"], bundle_dir)
    with open(bundle_dir / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match"):
        scoring.open_model(load_bundle(bundle_dir))
