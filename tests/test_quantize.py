"""int8 variants: the gate, a graceful refusal, and the variants of the exported test models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lung_models import quantize, registry
from lung_models.bundle import load_bundle
from lung_models.data import phantoms
from lung_models.fileutil import sha256_file
from lung_models.scoring.runtime import choose_graph


def test_the_gate_refuses_a_variant_that_loses_accuracy_or_is_not_faster():
    assert quantize.gate(0.90, 0.89, 1.5)[0]  # one point lost: still usable
    usable, why = quantize.gate(0.90, 0.88, 3.0)
    assert not usable and "2.0 points" in why
    usable, why = quantize.gate(0.90, 0.91, 0.8)
    assert not usable and "not faster" in why
    assert not quantize.gate(0.90, 0.90, 1.0)[0]


def test_calibration_items_are_capped_by_their_input_values():
    # 224x224x3 images keep all 64 items (larger ones fewer: 256x256x3 49, 299x299x3 35); a
    # documented MosMed volume (1 Mi voxels, whose 64 items took 22 GiB to calibrate) gets 9.
    assert quantize.calibration_count(900, (224, 224, 3)) == 64
    assert quantize.calibration_count(10, (299, 299, 3)) == 10
    assert quantize.calibration_count(900, (299, 299, 3)) == 35
    assert quantize.calibration_count(300, (128, 128, 64, 1)) == 9
    assert quantize.calibration_count(300, (64, 64, 48, 1)) == 49
    assert quantize.calibration_count(300, (1024, 1024, 512, 1)) == 1


def test_a_graph_the_quantizer_cannot_read_leaves_the_bundle_fp32_only(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx graph")
    entry = quantize.int8_variant(bad, tmp_path / quantize.INT8_ONNX, calib_x=np.zeros((4, 8, 8, 3), np.uint8),
                                  test_x=np.zeros((4, 8, 8, 3), np.uint8), test_y=np.zeros(4),
                                  params={"kind": "rgb_image", "scale": 1.0}, open_session=lambda p: 1 / 0)
    assert entry["usable"] is False and entry["file"] is None and "quantization failed" in entry["reason"]
    assert not (tmp_path / quantize.INT8_ONNX).exists()


@pytest.mark.parametrize("name", registry.names())
def test_every_export_has_a_gated_int8_variant(factory, name):
    bundle = load_bundle(factory["bundles"][name])
    int8 = bundle.card["int8"]
    assert int8["file"], int8["reason"]  # every registered architecture quantizes
    assert sha256_file(bundle.path / int8["file"]) == int8["sha256"]
    assert int8["calibration"]["split"] == "train" and int8["calibration"]["items"] > 0
    assert (int8["usable"], int8["reason"]) == quantize.gate(int8["fp32_accuracy"], int8["int8_accuracy"],
                                                              int8["speedup"])
    path, sha, precision = choose_graph(bundle, "auto")
    assert precision == ("int8" if int8["usable"] else "fp32") and sha256_file(path) == sha


def test_scoring_with_int8_names_the_precision_and_the_graph_on_every_row(factory, tmp_path):
    from flows.score import score_folder

    bundle = load_bundle(factory["bundles"]["lc25000-cnn"])
    folder = tmp_path / "in"
    phantoms.write_incoming(folder, seed=4, n_tiles=3, n_volumes=0, corrupt=False, tile_size=96)
    kw = dict(input_dir=str(folder), exports_dir=str(factory["exports"]), models=["lc25000-cnn"], settle_seconds=0)
    fp32 = pd.read_csv(score_folder(output_dir=str(tmp_path / "out"), **kw), keep_default_na=False)
    int8 = pd.read_csv(score_folder(output_dir=str(tmp_path / "out"), precision="int8", **kw), keep_default_na=False)
    assert set(fp32.precision) == {"fp32"} and set(fp32.bundle_sha256) == {bundle.card["onnx_sha256"]}
    # Another graph: scored once more, exactly once, its rows saying so.
    assert len(int8) == 3 and set(int8.precision) == {"int8"}
    assert set(int8.bundle_sha256) == {bundle.card["int8"]["sha256"]}
    for a, b in zip(fp32.sort_values("relative_path").probabilities, int8.sort_values("relative_path").probabilities):
        pa, pb = json.loads(a), json.loads(b)
        assert max(abs(pa[c] - pb[c]) for c in pa) < 0.2  # the same model, quantized
    with pytest.raises(ValueError, match="precision"):
        score_folder(output_dir=str(tmp_path / "out2"), precision="fp16", **kw)
