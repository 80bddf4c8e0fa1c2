"""Which exported version of a model is scored: the promotion gate, and the commands behind
``lung-factory bundles list|promote|rollback|prune``.

``exports/<model>/LATEST`` names the promoted version, the one the nightly deployment scores. A
new export moves it only when the bundle passed its gate (recorded in the card as ``promotion``):
ONNX parity with Keras, and test accuracy better than chance by its 95% Wilson interval, chance
being the share of the test split's most frequent class (what always answering that class
scores). Every move of ``LATEST`` is appended to ``exports/<model>/promotions.jsonl``, which is
what a roll-back reads.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lung_models.bundle import CARD, LATEST, BundleError, exported_versions, load_bundle
from lung_models.fileutil import atomic_write_text, utc_now

log = logging.getLogger(__name__)

HISTORY = "promotions.jsonl"
LOCK = ".latest.lock"


class PromotionError(RuntimeError):
    pass


def gate(metrics: dict[str, Any], parity: dict[str, Any]) -> dict[str, Any]:
    """The promotion gate of an export, from its test metrics and parity check: what the card records."""
    per_class = metrics.get("per_class") or {}
    n = int(metrics.get("n") or 0)
    support = [int(c.get("support") or 0) for c in per_class.values()]
    chance = max(support) / n if n and support else None
    low = (metrics.get("accuracy_ci95_wilson") or [None])[0]
    reasons = []
    if not parity.get("passed"):
        reasons.append("ONNX parity with Keras failed")
    if chance is None or low is None:
        reasons.append("no test metrics to judge it by")
    elif low <= chance:
        reasons.append(f"test accuracy {metrics.get('accuracy', float('nan')):.3f} (95% Wilson lower bound "
                       f"{low:.3f}, n={n}) is not better than chance {chance:.3f} (always the most frequent class)")
    passed = not reasons
    return {"passed": passed,
            "rule": "ONNX parity passed, and the 95% Wilson lower bound of test accuracy above the share of "
                    "the test split's most frequent class",
            "accuracy_ci95_low": low, "chance": chance, "n": n, "parity_passed": bool(parity.get("passed")),
            "reason": (f"passed: lower bound {low:.3f} > chance {chance:.3f}" if passed
                       else "; ".join(reasons))}


def promoted_version(model_dir: Path) -> str | None:
    pointer = model_dir / LATEST
    return pointer.read_text().strip() or None if pointer.is_file() else None


def history(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / HISTORY
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:  # a torn last line of an interrupted append: skip it, keep the rest
                log.warning("%s line %d is not JSON; ignored", path, number)
    return entries


@contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    if not model_dir.is_dir():
        raise PromotionError(f"{model_dir}: no such model folder (lung-factory bundles list shows the exported ones)")
    with open(model_dir / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _move(model_dir: Path, version: str, action: str, reason: str) -> dict[str, Any]:
    """Point LATEST at ``version`` and log it (callers hold the lock). The history line is written
    first: a crash between the two leaves a logged move that did not happen (harmless: roll-back
    reads the entry of the version LATEST names), never a move the history does not know."""
    previous = promoted_version(model_dir)
    if previous == version:
        raise PromotionError(f"{model_dir.name}: {version} is already the promoted version")
    entry = {"utc": utc_now(), "action": action, "version": version, "previous": previous, "by": _user(),
             "reason": reason}
    path = model_dir / HISTORY
    with open(path, "a+b") as handle:
        torn = False
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"  # an interrupted append: keep the fragment on a line of its own
        handle.write((("\n" if torn else "") + json.dumps(entry) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())
    atomic_write_text(model_dir / LATEST, version + "\n")
    return entry


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def promote_if_passed(model_dir: Path, version: str, card: dict[str, Any]) -> bool:
    """After an export: move LATEST to the new version when its gate passed, unless a newer version
    is already promoted (two exports finishing out of order). Returns whether it was promoted."""
    if not card.get("promotion", {}).get("passed"):
        return False
    with _locked(model_dir):
        current = promoted_version(model_dir) or ""
        if version <= current:
            return False
        _move(model_dir, version, "export", card["promotion"]["reason"])
    return True


def promote(exports_root: str | Path, model: str, version: str, *, force: bool = False,
            reason: str = "") -> dict[str, Any]:
    """Make ``version`` the one scored. A version that failed its gate needs ``force`` and a reason."""
    model_dir = Path(exports_root) / model
    if version not in exported_versions(model_dir):
        raise PromotionError(f"{model_dir}: no exported version {version!r} (has: "
                             f"{', '.join(exported_versions(model_dir)) or 'none'})")
    card = load_bundle(model_dir / version).card
    verdict = card.get("promotion") or {}
    if not verdict.get("passed") and not force:
        raise PromotionError(f"{model} {version} did not pass its promotion gate "
                             f"({verdict.get('reason', 'exported before gates were recorded')}); "
                             "pass --force with --reason to promote it anyway")
    if force and not verdict.get("passed") and not reason:
        raise PromotionError("promoting a version that failed its gate needs --reason, kept in the history")
    with _locked(model_dir):
        if not (model_dir / version / CARD).is_file():  # pruned meanwhile
            raise PromotionError(f"{model_dir}: version {version} was removed meanwhile")
        return _move(model_dir, version, "promote", reason or verdict.get("reason", ""))


def _rollback_target(model_dir: Path, current: str | None) -> str | None:
    """The version promoted before ``current`` first was: roll-backs are skipped, so rolling back twice
    goes two steps back rather than toggling between two versions."""
    entries = [e for e in history(model_dir) if e.get("version") == current and e.get("action") != "rollback"
               and e.get("previous") != current]
    return entries[-1].get("previous") if entries else None


def rollback(exports_root: str | Path, model: str, reason: str = "") -> dict[str, Any]:
    """Point LATEST back at the version promoted before the current one (by the history)."""
    model_dir = Path(exports_root) / model
    with _locked(model_dir):
        current = promoted_version(model_dir)
        previous = _rollback_target(model_dir, current)
        if not previous:
            raise PromotionError(f"{model}: nothing to roll back to (the history in {model_dir / HISTORY} has no "
                                 f"version promoted before {current}); use promote MODEL VERSION")
        if not (model_dir / previous / CARD).is_file():
            raise PromotionError(f"{model}: the previous version {previous} is no longer exported (pruned?); "
                                 "use promote MODEL VERSION")
        return _move(model_dir, previous, "rollback", reason)


def listing(exports_root: str | Path, model: str) -> list[dict[str, Any]]:
    """Every exported version of a model with its gate, test accuracy and whether it is promoted."""
    model_dir = Path(exports_root) / model
    current = promoted_version(model_dir)
    rows = []
    for version in exported_versions(model_dir):
        try:
            card = load_bundle(model_dir / version).card
        except BundleError as exc:
            rows.append({"version": version, "promoted": version == current, "gate": f"unreadable: {exc}"})
            continue
        metrics = card.get("metrics") or {}
        verdict = card.get("promotion") or {}
        rows.append({"version": version, "promoted": version == current,
                     "gate": "passed" if verdict.get("passed") else "failed" if verdict else "not recorded",
                     "accuracy": metrics.get("accuracy"), "n": metrics.get("n"), "reason": verdict.get("reason", ""),
                     "ci95_low": (metrics.get("accuracy_ci95_wilson") or [None])[0]})
    return rows


def prune(exports_root: str | Path, model: str, keep: int, dry_run: bool = False) -> list[str]:
    """Remove all but the newest ``keep`` versions, never the promoted one nor the one a roll-back
    would return to. Returns the versions removed (or that would be, with ``dry_run``)."""
    if keep < 1:
        raise PromotionError("keep at least one version")
    model_dir = Path(exports_root) / model
    with _locked(model_dir):
        current = promoted_version(model_dir)
        protected = {current, _rollback_target(model_dir, current)}
        versions = exported_versions(model_dir)
        doomed = [v for v in versions[:-keep] if v not in protected]
        if not dry_run:
            for version in doomed:
                shutil.rmtree(model_dir / version)
    return doomed
