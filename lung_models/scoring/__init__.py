"""Nightly scoring of incoming scans with exported bundles on ONNX Runtime, exactly once.

One module a job:

- ``items``: the vocabulary (Item with its file and input kinds, statuses, which modality takes
  which item);
- ``discovery``: the input folder's items, hashed once (the ledger caches hashes by stat key);
- ``decode``: each item decoded once, prepared once per preprocessing signature;
- ``runtime``: ONNX Runtime sessions with explicit options, and the provider that runs;
- ``rows``: the one row schema (fixed columns) and the per-scan aggregation;
- ``pipeline``: decoding workers feeding batched inference through a bounded window;
- ``ledger``, ``lock``, ``report``: exactly-once bookkeeping, the output folder's lock, the CSVs;
- ``night``: one night as plain functions (what the Prefect flow runs as tasks).

Rows name files by their path relative to the input folder and their sha256, never by anything
read from inside them (no patient data). Pure library code: no Prefect imports.
"""

from lung_models.scoring.discovery import discover, input_kind
from lung_models.scoring.items import (
    DEFAULT_SETTLE_SECONDS,
    DONE_STATUSES,
    ERROR,
    MODALITY_INPUTS,
    OK,
    REJECTED,
    STATUSES,
    Incoming,
    Item,
)
from lung_models.scoring.ledger import Ledger
from lung_models.scoring.lock import DEFAULT_LOCK_TIMEOUT, OutputNotWritable, ScoringLockTimeout, scoring_lock
from lung_models.scoring.runtime import LoadedModel, open_model, predict

__all__ = ["DEFAULT_LOCK_TIMEOUT", "DEFAULT_SETTLE_SECONDS", "DONE_STATUSES", "ERROR", "MODALITY_INPUTS", "OK",
           "REJECTED", "STATUSES", "Incoming", "Item", "Ledger", "LoadedModel", "OutputNotWritable",
           "ScoringLockTimeout", "discover", "input_kind", "open_model", "predict", "scoring_lock"]
