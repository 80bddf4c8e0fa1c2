"""A scoring-only host: the core and the [score] extra in a venv of its own, with no TensorFlow,
scores the bundles the training install exported, with the rows this install gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from lung_models.data import phantoms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINING_ONLY = ("tensorflow", "keras", "tf2onnx", "tensorflow_hub", "matplotlib", "sklearn", "kagglehub", "pandas")


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, (f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.mark.slow
def test_a_scoring_only_install_scores_the_exported_bundles_without_tensorflow(factory, tmp_path):
    from flows.score import score_folder

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 120)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{REPO}[score]"], 1200)

    # None of the training stack came with it.
    present = _run([python, "-c", "import importlib.util as u; "
                    f"print(' '.join(m for m in {TRAINING_ONLY!r} if u.find_spec(m)))"], 60).stdout.split()
    assert present == [], f"a scoring install pulled in {present}"
    # The operator's listing commands work there too.
    listed = _run([str(venv / "bin" / "lung-factory"), "models"], 120).stdout
    assert all(name in listed for name in factory["bundles"])
    versions = _run([str(venv / "bin" / "lung-factory"), "bundles", "list", "--exports-dir",
                     str(factory["exports"])], 120).stdout
    assert all(name in versions for name in factory["bundles"])

    folder = tmp_path / "incoming"
    phantoms.write_incoming(folder, seed=23, n_tiles=2, n_volumes=1, n_slices=2, corrupt=True, tile_size=256,
                            in_plane=64, slices=30)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    out = tmp_path / "scoring-host"
    csv = _run([str(venv / "bin" / "lung-factory"), "score", str(folder), str(out), "--exports-dir",
                str(factory["exports"]), "--settle-seconds", "0"], 900, env=env, cwd=tmp_path).stdout.strip()
    theirs = pd.read_csv(csv.splitlines()[-1], keep_default_na=False)
    # The same night without Prefect (no temporary server): the same rows, and its HTML page.
    plain = _run([str(venv / "bin" / "lung-factory"), "score", str(folder), str(tmp_path / "plain"), "--exports-dir",
                  str(factory["exports"]), "--settle-seconds", "0", "--no-prefect"], 900, env=env, cwd=tmp_path)
    without = pd.read_csv(plain.stdout.strip().splitlines()[-1], keep_default_na=False)
    columns = ["model", "relative_path", "status", "predicted_class", "probabilities"]
    assert without.sort_values(columns[:2])[columns].values.tolist() == \
        theirs.sort_values(columns[:2])[columns].values.tolist()
    assert len(list((tmp_path / "plain").glob("report-*.html"))) == 1
    ours = pd.read_csv(score_folder(input_dir=str(folder), output_dir=str(tmp_path / "training-host"),
                                    exports_dir=str(factory["exports"]), settle_seconds=0), keep_default_na=False)

    key = ["model", "relative_path"]
    assert len(theirs) == len(ours) > 0
    assert set(theirs.model) == set(factory["bundles"])  # every exported model scored there too
    merged = theirs.merge(ours, on=key, suffixes=("_score", "_train"))
    assert len(merged) == len(ours)
    assert (merged.status_score == merged.status_train).all()
    broken = merged[merged.relative_path.str.contains("broken_scan")]
    assert len(broken) > 0 and "ok" not in set(broken.status_score)  # the corrupt file is refused on both
    ok = merged[merged.status_score == "ok"]
    assert len(ok) >= len(merged) - len(broken)
    # Same graphs; the two installs may carry different ONNX Runtime builds (onnxruntime vs -gpu).
    for a, b in zip(ok.probabilities_score, ok.probabilities_train):
        pa, pb = json.loads(a), json.loads(b)
        assert pa.keys() == pb.keys() and max(abs(pa[c] - pb[c]) for c in pa) < 1e-5
