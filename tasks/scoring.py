"""Nightly scoring tasks: find and hash what arrived, score it with every model, publish the CSVs."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lung_models.scoring import Item, night
from lung_models.scoring.items import Incoming
from tasks.common import run_logger, say


@task(name="find-incoming-files", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def find_incoming(input_dir: str, output_dir: str, settle_seconds: float) -> dict[str, Any]:
    found = night.find_incoming(input_dir, output_dir, settle_seconds)
    for rel, why in found.skipped:
        run_logger().warning("skipped %s: %s", rel, why)
    say(f"found {len(found.items)} items under {input_dir} ({len(found.skipped)} skipped for now; "
        f"{found.hashed} files hashed, {found.cached} known from earlier nights)")
    return {"items": [i.as_dict() for i in found.items], "skipped": [list(s) for s in found.skipped]}


@task(name="score-incoming", cache_policy=NO_CACHE)  # writes the ledger
def score_incoming(incoming: dict[str, Any], input_dir: str, output_dir: str, exports_dir: str,
                   models: list[str] | None, run_id: str, batch_size: int = 8, workers: int | None = None,
                   precision: str = "fp32") -> dict[str, Any]:
    found = Incoming(items=[Item.from_dict(d) for d in incoming["items"]])
    result = night.score_incoming(found, input_dir, output_dir, night.find_bundles(exports_dir, models), run_id,
                                  batch_size=batch_size, workers=workers, precision=precision, progress=say)
    return {"counts": [c.as_dict() for c in result.counts], "skipped": [list(s) for s in result.skipped]}


@task(name="publish-reports", cache_policy=NO_CACHE)  # side effects / fresh listing every run
def publish_reports(output_dir: str, input_dir: str, run_id: str, stamp: str, scored: dict[str, Any],
                    skipped: list[list[str]]) -> dict[str, str]:
    """The night's CSV and the cumulative one, and a summary artifact linking them."""
    night_csv, cumulative = night.publish(output_dir, run_id, stamp)
    counts = scored["counts"]
    skipped_all = sorted({tuple(s) for s in skipped} | {tuple(s) for s in scored["skipped"]})
    lines = ["# Scoring report", "", f"- input: `{input_dir}`",
             f"- this run's CSV: [{night_csv.name}]({night_csv.resolve().as_uri()})",
             f"- cumulative CSV: [{cumulative.name}]({cumulative.resolve().as_uri()})", "",
             "| model | version | runtime | new ok | rejected | error | already scored |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['version']} | {c['provider']} {c['precision']} | {c['ok']} | {c['rejected']} | "
              f"{c['error']} | {c['already_scored']} |" for c in counts]
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
