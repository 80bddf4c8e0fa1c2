"""Nightly scoring tasks: find and hash what arrived, pin the model versions, score shards of the
night (on Dask workers or in this process), publish the CSVs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lung_models.scoring import Item, night
from lung_models.scoring.ledger import Ledger
from lung_models.scoring.runtime import cpu_cores
from tasks.common import run_logger, say


@task(name="find-incoming-files", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def find_incoming(input_dir: str, output_dir: str, settle_seconds: float, ledger: str | None = None) -> dict[str, Any]:
    found = night.find_incoming(input_dir, output_dir, settle_seconds, ledger)
    for rel, why in found.skipped:
        run_logger().warning("skipped %s: %s", rel, why)
    say(f"found {len(found.items)} items under {input_dir} ({len(found.skipped)} skipped for now; "
        f"{found.hashed} files hashed, {found.cached} known from earlier nights)")
    return {"items": [i.as_dict() for i in found.items], "skipped": [list(s) for s in found.skipped]}


@task(name="pin-models", cache_policy=NO_CACHE)  # reads the exports folder and writes the ledger
def pin_models(incoming: dict[str, Any], output_dir: str, exports_dir: str, models: list[str] | None,
               precision: str, ledger: str | None, run_id: str) -> dict[str, Any]:
    """Fix the model versions of the night (by sha256) and note them in the ledger; a refused bundle
    gets its error rows here, once, rather than on every worker."""
    pins, refused = night.pin_models(night.find_bundles(exports_dir, models), precision)
    items = [Item.from_dict(d) for d in incoming["items"]]
    with Ledger(output_dir, url=ledger) as led:
        led.start_night(run_id, pins, exclusive=not led.shared)  # SQLite: the caller holds the folder lock
        counts = night.refused_rows(led, run_id, items, refused)
    for pin in pins:
        say(f"pinned {pin['model']} {pin['version']} ({pin['precision']}, sha256 {pin['onnx_sha256'][:12]}...) "
            f"from {pin['bundle']}")
    return {"pins": pins, "refused": [c.as_dict() for c in counts]}


def _worker_threads(settings: dict[str, Any]) -> int | None:
    """ONNX Runtime threads for a shard on a Dask worker: this host's cores shared by the task slots the
    cluster runs on it (two workers on a 2-core host: one thread each). None outside Dask (all cores)."""
    try:
        from distributed import get_worker

        address = get_worker().address
    except (ImportError, ValueError):
        return settings.get("intra_op_threads")
    host = address.split("://")[-1].rsplit(":", 1)[0]
    slots = (settings.get("slots_by_host") or {}).get(host, 1)
    return max(1, cpu_cores() // max(1, slots))


@task(name="score-shard", cache_policy=NO_CACHE)  # writes the ledger
def score_shard(shard_id: str, items: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """One shard: file paths and small dicts in, counts out. Its worker opens each pinned model once
    and keeps the session for the shards after it."""
    config = {k: v for k, v in settings.items() if k != "slots_by_host"}
    config["intra_op_threads"] = _worker_threads(settings)
    result = night.score_shard(shard_id, [Item.from_dict(d) for d in items], night.ShardSettings(**config))
    done = sum(c["ok"] + c["rejected"] + c["error"] for c in result["counts"])
    say(f"{shard_id}: {len(items)} items, {done} rows on {result['host']} (pid {result['pid']}) in "
        f"{result['seconds']:.1f} s")
    return result


@task(name="publish-reports", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def publish_reports(output_dir: str, input_dir: str, run_id: str, stamp: str, scored: dict[str, Any],
                    skipped: list[list[str]], ledger: str | None = None,
                    lock_timeout_seconds: float = night.DEFAULT_LOCK_TIMEOUT) -> dict[str, str]:
    """The night's CSV and the cumulative one, and a summary artifact linking them. ``scored``: the
    refused models' counts and every shard's result."""
    night_csv, cumulative = night.publish(output_dir, run_id, stamp, ledger, lock_timeout_seconds)
    totals: dict[str, night.ModelCounts] = {}
    for c in [*scored["refused"], *(c for s in scored["shards"] for c in s["counts"])]:
        totals.setdefault(c["model"], night.ModelCounts(c["model"], c["version"])).add(c)
    counts = [c.as_dict() for c in totals.values()]
    shards = scored["shards"]
    skipped_all = sorted({tuple(s) for s in skipped} | {tuple(x) for s in shards for x in s["skipped"]})
    hosts = Counter(s["host"] for s in shards)
    lines = ["# Scoring report", "", f"- input: `{input_dir}`",
             f"- this run's CSV: [{night_csv.name}]({night_csv.resolve().as_uri()})",
             f"- cumulative CSV: [{cumulative.name}]({cumulative.resolve().as_uri()})",
             f"- ledger: {Ledger.describe(output_dir, ledger)}",
             f"- {len(shards)} shards on {len(hosts)} host(s): " + ", ".join(f"{h} {n}" for h, n in hosts.items()), "",
             "| model | version | runtime | new ok | rejected | error | already scored | held by another run |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['version']} | {c['provider']} {c['precision']} | {c['ok']} | {c['rejected']} | "
              f"{c['error']} | {c['already_scored']} | {c['claimed_elsewhere']} |" for c in counts]
    if scored.get("failed"):
        lines += ["", f"**{len(scored['failed'])} shard(s) failed twice** (their rows are scored by the next run):",
                  ""] + [f"- {f}" for f in scored["failed"][:50]]
    if skipped_all:  # every entry discovery or decoding passed over without a row, with the reason
        lines += ["", f"Not scored this run, no row ({len(skipped_all)}; each reason says whether a later run "
                      "scores it or what to fix):", ""]
        lines += [f"- `{rel.replace('`', chr(39))}`: {why}" for rel, why in skipped_all[:200]]
        if len(skipped_all) > 200:
            lines.append(f"- ... and {len(skipped_all) - 200} more (the flow run's log lists every one)")
    create_markdown_artifact(key="nightly-scoring-report", markdown="\n".join(lines),
                             description=f"scores written to {night_csv}")
    say(f"report: {night_csv} (cumulative: {cumulative}); {len(skipped_all)} entries not scored this run "
        "(listed in the nightly-scoring-report artifact)")
    return {"night": str(night_csv), "cumulative": str(cumulative)}
