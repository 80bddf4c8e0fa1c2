"""Promotion: the gate an export must pass to become LATEST, and promote / roll back / prune."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from lung_models import promotion
from lung_models.bundle import BundleError, latest_bundles, load_bundle

PARITY_OK = {"passed": True}


def _metrics(low: float, supports: tuple[int, ...], accuracy: float | None = None) -> dict:
    return {"n": sum(supports), "accuracy": accuracy if accuracy is not None else low + 0.05,
            "accuracy_ci95_wilson": [low, low + 0.1],
            "per_class": {f"c{i}": {"support": s} for i, s in enumerate(supports)}}


def _export(exports, model: str, version: str, passed: bool) -> str:
    """A bundle folder as the export writes it (the scorer's files are placeholders here)."""
    folder = exports / model / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    metrics = _metrics(0.9 if passed else 0.4, (50, 50))
    card = {"version": version, "model": {"name": model, "class_names": ["a", "b"], "modality": "ct_slice"},
            "preprocessing": {}, "onnx_sha256": "0" * 64, "metrics": metrics,
            "promotion": promotion.gate(metrics, PARITY_OK)}
    (folder / "model_card.json").write_text(json.dumps(card))
    promotion.promote_if_passed(exports / model, version, card)
    return version


def test_the_gate_is_better_than_chance_by_the_wilson_interval_and_parity():
    passed = promotion.gate(_metrics(0.61, (60, 40)), PARITY_OK)
    assert passed["passed"] and passed["chance"] == 0.6 and passed["reason"].startswith("passed")
    # Chance is the largest class's share, not 1/k: 0.55 beats 1/2 but not always answering "c0".
    at_chance = promotion.gate(_metrics(0.55, (60, 40)), PARITY_OK)
    assert not at_chance["passed"] and "not better than chance 0.600" in at_chance["reason"]
    assert not promotion.gate(_metrics(0.6, (60, 40)), PARITY_OK)["passed"]  # equal is not better
    no_parity = promotion.gate(_metrics(0.9, (50, 50)), {"passed": False})
    assert not no_parity["passed"] and "parity" in no_parity["reason"]
    assert not promotion.gate({}, PARITY_OK)["passed"]


def test_only_a_passing_export_moves_latest_and_never_backwards(tmp_path):
    _export(tmp_path, "m", "20260101T000000Z", passed=True)
    _export(tmp_path, "m", "20260102T000000Z", passed=False)
    assert promotion.promoted_version(tmp_path / "m") == "20260101T000000Z"
    assert latest_bundles(tmp_path)["m"].version == "20260101T000000Z"
    newest = latest_bundles(tmp_path, include_unpromoted=True)["m"]
    assert newest.version == "20260102T000000Z" and not newest.promoted
    # Two exports finishing out of order: the older one does not take LATEST back.
    _export(tmp_path, "m", "20260104T000000Z", passed=True)
    card = load_bundle(tmp_path / "m" / "20260104T000000Z").card
    _export(tmp_path, "m", "20260103T000000Z", passed=True)
    assert promotion.promoted_version(tmp_path / "m") == "20260104T000000Z"
    assert card["promotion"]["passed"]


def test_a_model_with_no_promoted_version_is_skipped_at_night_and_named_when_asked_for(tmp_path):
    _export(tmp_path, "weak", "20260101T000000Z", passed=False)
    _export(tmp_path, "good", "20260101T000000Z", passed=True)
    assert set(latest_bundles(tmp_path)) == {"good"}
    with pytest.raises(BundleError, match="no promoted version of model 'weak'.*bundles list weak"):
        latest_bundles(tmp_path, ["weak"])


def test_promote_refuses_a_failed_gate_without_force_and_a_reason(tmp_path):
    _export(tmp_path, "m", "20260101T000000Z", passed=True)
    _export(tmp_path, "m", "20260102T000000Z", passed=False)
    with pytest.raises(promotion.PromotionError, match="did not pass its promotion gate"):
        promotion.promote(tmp_path, "m", "20260102T000000Z")
    with pytest.raises(promotion.PromotionError, match="needs --reason"):
        promotion.promote(tmp_path, "m", "20260102T000000Z", force=True)
    with pytest.raises(promotion.PromotionError, match="no exported version '2027'"):
        promotion.promote(tmp_path, "m", "2027")
    entry = promotion.promote(tmp_path, "m", "20260102T000000Z", force=True, reason="reader study")
    assert entry["previous"] == "20260101T000000Z" and entry["reason"] == "reader study"
    assert load_bundle(tmp_path / "m" / "20260102T000000Z").promoted


def test_rollback_walks_back_through_the_history_and_prune_spares_what_it_needs(tmp_path):
    versions = [_export(tmp_path, "m", f"2026010{d}T000000Z", passed=True) for d in range(1, 6)]
    model_dir = tmp_path / "m"
    assert promotion.promoted_version(model_dir) == versions[4]
    assert promotion.rollback(tmp_path, "m", reason="drift")["version"] == versions[3]
    assert promotion.rollback(tmp_path, "m")["version"] == versions[2]  # two steps back, not a toggle
    assert [e["action"] for e in promotion.history(model_dir)][-2:] == ["rollback", "rollback"]
    # Keep the newest one: the promoted version (2) and its roll-back target (1) stay too.
    assert promotion.prune(tmp_path, "m", keep=1, dry_run=True) == [versions[0], versions[3]]
    assert promotion.exported_versions(model_dir) == versions
    assert promotion.prune(tmp_path, "m", keep=1) == [versions[0], versions[3]]
    assert promotion.exported_versions(model_dir) == [versions[1], versions[2], versions[4]]
    assert promotion.rollback(tmp_path, "m")["version"] == versions[1]
    with pytest.raises(promotion.PromotionError, match=f"previous version {versions[0]} is no longer exported"):
        promotion.rollback(tmp_path, "m")
    first = tmp_path / "first"
    _export(tmp_path, "first", "20260101T000000Z", passed=True)
    with pytest.raises(promotion.PromotionError, match="nothing to roll back to"):
        promotion.rollback(tmp_path, first.name)


def test_a_torn_history_line_is_skipped(tmp_path):
    _export(tmp_path, "m", "20260101T000000Z", passed=True)
    with open(tmp_path / "m" / promotion.HISTORY, "a") as handle:
        handle.write('{"action": "prom')
    assert [e["version"] for e in promotion.history(tmp_path / "m")] == ["20260101T000000Z"]


def test_the_bundles_commands(tmp_path):
    _export(tmp_path, "m", "20260101T000000Z", passed=True)
    _export(tmp_path, "m", "20260102T000000Z", passed=False)
    runner = CliRunner()
    listed = runner.invoke(app, ["bundles", "list", "--exports-dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if line.startswith("m ")]
    assert len(lines) == 2 and " * passed" in lines[0]
    assert "   failed" in lines[1] and "not better than chance" in lines[1]

    refused = runner.invoke(app, ["bundles", "promote", "m", "20260102T000000Z", "--exports-dir", str(tmp_path)])
    assert refused.exit_code == 1 and "did not pass its promotion gate" in refused.output
    assert "Traceback" not in refused.output
    forced = runner.invoke(app, ["bundles", "promote", "m", "20260102T000000Z", "--force", "--reason", "checked",
                                 "--exports-dir", str(tmp_path)])
    assert forced.exit_code == 0 and "20260101T000000Z -> 20260102T000000Z" in forced.output
    back = runner.invoke(app, ["bundles", "rollback", "m", "--exports-dir", str(tmp_path)])
    assert back.exit_code == 0 and "-> 20260101T000000Z" in back.output
    pruned = runner.invoke(app, ["bundles", "prune", "m", "--keep", "1", "--exports-dir", str(tmp_path)])
    assert pruned.exit_code == 0 and "removed 0 version(s)" in pruned.output  # promoted + its roll-back target


def test_promoting_the_current_version_again_changes_nothing_and_rollback_still_works(tmp_path):
    a = _export(tmp_path, "m", "20260101T000000Z", passed=True)
    b = _export(tmp_path, "m", "20260102T000000Z", passed=True)
    with pytest.raises(promotion.PromotionError, match="already the promoted version"):
        promotion.promote(tmp_path, "m", b)
    assert promotion.prune(tmp_path, "m", keep=1, dry_run=True) == []  # a, the roll-back target, is kept
    assert promotion.rollback(tmp_path, "m")["version"] == a
    with pytest.raises(promotion.PromotionError, match="no such model folder"):
        promotion.rollback(tmp_path, "typo")


def test_an_append_after_a_torn_history_line_is_read(tmp_path):
    _export(tmp_path, "m", "20260101T000000Z", passed=True)
    with open(tmp_path / "m" / promotion.HISTORY, "a") as handle:
        handle.write('{"action": "prom')  # a crash mid-append
    _export(tmp_path, "m", "20260102T000000Z", passed=True)
    assert [e["version"] for e in promotion.history(tmp_path / "m")] == ["20260101T000000Z", "20260102T000000Z"]
    assert promotion.rollback(tmp_path, "m")["version"] == "20260101T000000Z"
