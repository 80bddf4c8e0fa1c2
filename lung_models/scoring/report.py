"""Writing the report CSVs: streamed from the ledger, atomically (readers never see a partial file).

Every text cell goes through :func:`fileutil.csv_cell`: a file named ``=1+1.png`` must not become a
formula when ops staff open the report in a spreadsheet. The ledger keeps the true text."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

from lung_models.fileutil import atomic_writer, csv_cell
from lung_models.scoring.rows import upgrade


def write_csv(path: Path, header: list[str], rows: Iterable[tuple[str, str]]) -> Path:
    """Write ``(run_id, row_json)`` pairs from ``rows`` as a CSV with ``header`` (temp file, fsync,
    rename); rows stored by an older ledger are brought to today's columns first."""
    with closing(rows), atomic_writer(path) as handle:  # closing: never leave a read open
        writer = csv.DictWriter(handle, fieldnames=header, restval="", extrasaction="ignore")
        writer.writeheader()
        for run_id, row_json in rows:
            row = upgrade(json.loads(row_json))
            row["run_id"] = run_id
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return path
