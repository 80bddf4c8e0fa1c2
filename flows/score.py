"""Score flow (the nightly job): every incoming file, with every exported model of its kind."""

from __future__ import annotations

from prefect import flow

from tasks.scoring import find_bundles, find_incoming, score_with_model, write_report


@flow(name="score-folder", log_prints=True)
def score_folder(input_dir: str, output_dir: str, models: list[str] | None = None,
                 exports_dir: str = "exports", batch_size: int = 8) -> str:
    """Write one CSV with a row per (file, model) to ``output_dir``; returns its path."""
    incoming = find_incoming(input_dir)
    rows = []
    for bundle in find_bundles(exports_dir, models):
        rows += score_with_model(bundle, input_dir, incoming, batch_size)
    return write_report(rows, output_dir, input_dir)
