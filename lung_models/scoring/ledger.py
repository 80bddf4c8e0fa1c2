"""Exactly-once scoring ledger: which (file content, model bundle) pairs are scored, and their CSV reports.

Every scoring result is a row keyed by ``(relative_path, file_sha256, bundle_sha256, model)``: the
item's path, the sha256 of its content, the sha256 of the model's ONNX file and the model's name (two
models may ship byte-identical ONNX files, e.g. the same graph under two names). ``ok`` and ``rejected``
rows are *done* (``rejected`` means the content itself is bad, so it would be bad again); an
``error`` row (unreadable file, refused bundle, inference crash) is reported but not done, so the
next run retries it. The ledger is one SQLite file, ``<output_dir>/ledger.sqlite3`` (one host, the
embedded default), or a PostgreSQL database chosen by URL (``Ledger(output_dir, url=...)``) that
runs on many hosts share: the same tables, the same rules, enforced by the database either way
(see ``database``).

Why every (file, model version) appears exactly once in the outputs, whatever crashes:

* A row exists only once its batch's transaction has committed (``Ledger.record`` writes a batch
  in one transaction, ``synchronous=FULL``). A kill -9 before the commit loses the whole batch and
  the rerun scores those items again; after the commit they are done and the rerun skips them.
  A unique index over the key of done rows means a done item can never be recorded twice, even by
  two runs racing without the lock.
* ``Ledger.publish`` first *claims* every unreported row for a named night CSV in one transaction,
  then writes that CSV atomically (temp file, flush, fsync, rename, directory fsync), then marks the
  report published. A crash before the claim leaves the rows unreported: the next night's CSV takes
  them. A crash after the claim leaves an unpublished report: the next ``publish`` rewrites that CSV
  from the ledger (same name, same rows, same header) before claiming anything new. A row is
  claimed by exactly one report, so it is in exactly one night CSV.
* Error rows are attempts, not results: when a later row exists for the same (path, content, model,
  bundle), an unreported error row is superseded and never published (a killed run's error and the
  rerun's retry do not both appear in one night). The content (file_sha256) is part of
  it because two DICOM series in one folder share their path (the folder): one series' row is no
  attempt at the other. An error row with an empty file_sha256 (the file could not even be read to
  hash it) is an attempt at whatever the path holds, so any later row for the path replaces it.
  Each night CSV reports that night's attempts, including retried errors.
* ``Ledger.write_cumulative`` rewrites ``scores-cumulative.csv`` from the published rows: the
  current row of every (scan, model), i.e. the newest result for the scan's current content (an
  error row only while there is no result), so it is current after every publish and holds one
  row per scan and model.

No reader ever sees a partial CSV: every CSV is streamed to a temporary file in the same directory
and renamed over the target (``report.write_csv``). Memory does not grow with the number of rows:
rows are streamed from SQLite cursors, and every CSV has the one fixed header of ``rows.COLUMNS``.

The ledger also keeps discovery's hash cache (``file_hashes``): each file's sha256 and what it is,
under its stat key, so an unchanged file is not read again the next night (see ``discovery``).

Work is shared by claims: before scoring, a worker claims the (path, content, bundle, model) keys it
will score (``Ledger.claim``); a key another live run holds is left to it, so two runs on one night
split it instead of waiting for each other or scoring everything twice. A claim is a lease, renewed
as its holder commits rows and ended when they are recorded. A killed holder's claims end at once
where that can be known: with PostgreSQL a claim names the database connection that took it, and
the server ends that connection when its process dies; with SQLite a run that holds the output
folder's lock ends every other run's claims (``start_night(exclusive=True)``). Otherwise (a
holder hung but connected) they lapse after ``CLAIM_SECONDS``. Claims only share work: exactly-once rests on
the unique done key, so a lapsed claim whose holder still writes costs time, never a duplicate.

Publication is serialised: with SQLite by :func:`lock.scoring_lock` (an ``flock`` on
``<output_dir>/.scoring.lock``, released by the kernel even when its holder is killed -9), which the
caller holds around the whole run; with PostgreSQL by an advisory lock that ``publish`` takes itself
(released by the server when its connection ends). Under it, ``publish`` deletes CSV temp files it
takes for a dead writer's (see ``Ledger._remove_stale_temps``).

Every run also notes the model versions it pinned (``Ledger.start_night``): the bundles it scores
with, by sha256, so every worker of the night uses the same ones.

Pure library code: no Prefect imports.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lung_models.explain import HEATMAP_DIR
from lung_models.fileutil import host_tag, utc_now, utf8_text
from lung_models.scoring import database
from lung_models.scoring.items import DONE_STATUSES, STATUSES
from lung_models.scoring.lock import OutputNotWritable, pid_alive
from lung_models.scoring.report import write_csv
from lung_models.scoring.rows import COLUMNS, REQUIRED_COLUMNS

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.sqlite3"
CUMULATIVE_NAME = "scores-cumulative.csv"
# 2: the done key and the attempt index include the model (1 had no model in the done key, no file_sha256 in
# rows_attempt). 1 -> 2 only recreates those two indexes: the new unique index is looser, so it always builds.
# 3: fixed CSV columns (rows.COLUMNS; older rows are upgraded as they are written out, rows.upgrade) and the
# file_hashes table. The keysets and columns tables of 2 are no longer written; rows.keyset is 0 from 3 on.
# 4: claims (leases on work) and nights (the model versions each run pinned); PostgreSQL ledgers start here.
_SCHEMA_VERSION = 4
_REBUILT_INDEXES = {1: ("rows_done_key", "rows_attempt")}  # by the version they are rebuilt from
_DONE_CHUNK = 400  # (path, sha) pairs per query: 802 parameters, far below SQLite's limit
# A CSV or page temp file untouched this long is a dead writer's (writers rewrite it within seconds).
STALE_TEMP_SECONDS = 3600
CLAIM_SECONDS = 900.0  # a claim's lease: renewed at every commit, so only a dead or hung holder lets it lapse
# fileutil.atomic_writer's temp names for our CSVs, pages, drift files and heat maps (under heatmaps/):
# .<name>.<pid>@<host>.<mkstemp's random part>.tmp
# (before schema 4 without "@<host>": taken for this host's).
_TEMP_RE = re.compile(r"^\.(?:scores-.+\.csv|report-.+\.html|drift(?:-.+)?\.json)\.(\d+)(?:@([A-Za-z0-9-]+))?"
                      r"\.[A-Za-z0-9_]+\.tmp$")
_HEATMAP_TEMP_RE = re.compile(r"^\..+\.png\.(\d+)(?:@([A-Za-z0-9-]+))?\.[A-Za-z0-9_]+\.tmp$")  # under heatmaps/ only
FOLDER_ID_NAME = ".ledger-id"
_STAMP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_hashes (
    relative_path TEXT PRIMARY KEY,
    stat_key TEXT NOT NULL,              -- JSON [size, mtime_ns, ctime_ns, inode] when it was hashed
    facts TEXT NOT NULL,                 -- JSON {"sha256", "kind", "source"[, "series"]}
    seen_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    seq {serial},
    name TEXT NOT NULL UNIQUE,           -- CSV file name in output_dir
    run_id TEXT NOT NULL,
    claimed_utc TEXT NOT NULL,
    n_rows INTEGER NOT NULL,
    header TEXT NOT NULL,                -- JSON list: the CSV header, fixed at claim time
    published_utc TEXT                   -- NULL until the CSV is durably in place
);
CREATE TABLE IF NOT EXISTS rows (
    id {serial},
    relative_path TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'rejected', 'error')),
    done INTEGER NOT NULL CHECK (done IN (0, 1)),
    superseded INTEGER NOT NULL DEFAULT 0,   -- an unreported error row with a later attempt
    run_id TEXT NOT NULL,
    recorded_utc TEXT NOT NULL,
    keyset INTEGER NOT NULL DEFAULT 0,       -- schema 2's column sets, unused since 3
    row_json TEXT NOT NULL,
    report TEXT REFERENCES reports(name)     -- NULL until claimed by a night CSV
);
CREATE UNIQUE INDEX IF NOT EXISTS rows_done_key ON rows(relative_path, file_sha256, bundle_sha256, model)
    WHERE done = 1;
CREATE INDEX IF NOT EXISTS rows_attempt ON rows(relative_path, bundle_sha256, model, file_sha256);
CREATE INDEX IF NOT EXISTS rows_report ON rows(report);
CREATE TABLE IF NOT EXISTS claims (
    relative_path TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    model TEXT NOT NULL,
    run_id TEXT NOT NULL,
    shard TEXT NOT NULL,                 -- the claiming shard, so it can renew and release its own
    holder TEXT NOT NULL DEFAULT '',     -- PostgreSQL: the claiming connection (its end frees the claim)
    expires DOUBLE PRECISION NOT NULL,   -- the database's clock (epoch seconds): hosts' clocks may differ
    PRIMARY KEY (relative_path, file_sha256, bundle_sha256, model)
);
CREATE INDEX IF NOT EXISTS claims_holder ON claims(run_id, shard);
CREATE TABLE IF NOT EXISTS nights (
    run_id TEXT PRIMARY KEY,
    started_utc TEXT NOT NULL,
    host TEXT NOT NULL,
    pins TEXT NOT NULL                   -- JSON list: every model version the run scores with, by sha256
);
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# A later row is another attempt at the same item when it has the same content; an error row without
# content hash (the file could not be read) is an attempt at whatever the path holds.
_SAME_CONTENT = "(later.file_sha256 = {row}.file_sha256 OR {row}.file_sha256 = '')"

# The cumulative CSV's rows (see Ledger.write_cumulative).
_CURRENT_ROWS = """
WITH pub AS (
    SELECT r.id, r.run_id, r.row_json, r.relative_path, r.file_sha256, r.model, r.done,
           {series} AS series
    FROM rows AS r JOIN reports AS p ON p.name = r.report WHERE p.published_utc IS NOT NULL),
content AS (
    SELECT relative_path, series, model, file_sha256 FROM (
        SELECT relative_path, series, model, file_sha256, ROW_NUMBER() OVER (
            PARTITION BY relative_path, series, model ORDER BY file_sha256 != '' DESC, id DESC) AS n
        FROM pub) AS ranked
    WHERE n = 1)
SELECT run_id, row_json FROM (
    SELECT pub.id, pub.run_id, pub.row_json, ROW_NUMBER() OVER (
        PARTITION BY pub.relative_path, pub.series, pub.model ORDER BY pub.done DESC, pub.id DESC) AS n
    FROM pub JOIN content AS c ON c.relative_path = pub.relative_path AND c.series {same} pub.series
        AND c.model = pub.model AND c.file_sha256 = pub.file_sha256) AS current
WHERE n = 1 ORDER BY id
"""

_CLAIM = """
INSERT INTO claims (relative_path, file_sha256, bundle_sha256, model, run_id, shard, holder, expires)
VALUES (?, ?, ?, ?, ?, ?, {holder}, {now} + ?)
ON CONFLICT (relative_path, file_sha256, bundle_sha256, model) DO UPDATE
    SET run_id = excluded.run_id, shard = excluded.shard, holder = excluded.holder, expires = excluded.expires
    WHERE claims.run_id = excluded.run_id OR claims.expires < {now} OR NOT {alive}
"""

_INSERT_ROW = """
INSERT INTO rows (relative_path, file_sha256, bundle_sha256, model, model_version, status, done, run_id,
                  recorded_utc, keyset, row_json)
SELECT :relative_path, :file_sha256, :bundle_sha256, :model, :model_version, :status, :done, :run_id,
       :recorded_utc, :keyset, :row_json
WHERE :done = 1 OR NOT EXISTS (
    SELECT 1 FROM rows WHERE done = 1 AND relative_path = :relative_path AND file_sha256 = :file_sha256
                         AND bundle_sha256 = :bundle_sha256 AND model = :model)
ON CONFLICT DO NOTHING
"""


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return item()
    return str(value)


# ----------------------------------------------------------------------------------------- ledger
class Ledger:
    """The scoring ledger of one output folder: ``<output_dir>/ledger.sqlite3``, or the PostgreSQL
    database at ``url`` (``postgresql://user:password@host:port/db``; ``None`` or ``"sqlite"``: the file).

    A PostgreSQL database holds the ledger of one output folder: the folder keeps its id in
    ``.ledger-id`` and the database the same id, so a second folder pointed at the same database is
    refused rather than mixed in (give it its own database, or its own schema with ``?options=-csearch_path%3D...``).
    """

    def __init__(self, output_dir: str | os.PathLike, url: str | None = None, busy_timeout: float = 120.0):
        self.output_dir = Path(output_dir)
        self.url = url
        self._db = database.connect(self.output_dir, url, LEDGER_NAME, busy_timeout)
        self._mutex = self._db._mutex
        self.path = getattr(self._db, "path", None)
        self.where = self._db.where
        try:
            self._check_backend()
            with self._db.translate_errors():
                self._init_schema()
            if self._db.kind != "sqlite":
                self._check_folder()
        except BaseException:
            self._db.close()
            raise

    def _check_backend(self) -> None:
        """One output folder, one ledger: a run with the other kind would find none of the folder's
        rows and score and publish everything again."""
        id_file, sqlite_file = self.output_dir / FOLDER_ID_NAME, self.output_dir / LEDGER_NAME
        if self._db.kind == "sqlite" and id_file.exists():
            raise database.LedgerUnavailable(
                f"{self.output_dir} keeps its ledger in a PostgreSQL database ({id_file} says so): score it with "
                "the same --ledger postgresql://... as its other runs (the deployment's ledger parameter)")
        if self._db.kind != "sqlite" and sqlite_file.exists() and sqlite_file.stat().st_size > 0:
            raise database.LedgerUnavailable(
                f"{self.output_dir} already has a SQLite ledger ({sqlite_file}); a PostgreSQL ledger would not "
                "know what it scored and would score and publish everything again: give the cluster a new "
                "output folder (or score this one without --ledger)")

    @staticmethod
    def describe(output_dir: str | os.PathLike, url: str | None = None) -> str:
        """Where a ledger lives, for reports and logs (never a password)."""
        if database.is_postgres_url(url):
            return f"PostgreSQL {database.redact(url)}"
        return f"SQLite {Path(output_dir) / LEDGER_NAME}"

    @property
    def shared(self) -> bool:
        """Whether runs on other hosts may use this ledger at the same time (PostgreSQL)."""
        return self._db.kind != "sqlite"

    # -- plumbing
    def _init_schema(self) -> None:
        with self._db.transaction(), self._db.schema_lock():
            version = self._db.schema_version()
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{self.where} has ledger schema {version}, newer than this code "
                                   f"({_SCHEMA_VERSION}); upgrade lung_models")
            if version == _SCHEMA_VERSION:  # no DDL on every open: it takes locks that stall other runs' writes
                return
            for old in range(version, _SCHEMA_VERSION):  # a new ledger (0) has nothing to drop
                for index in _REBUILT_INDEXES.get(old, ()) if version else ():
                    self._db.execute(f"DROP INDEX IF EXISTS {index}")
            for statement in _SCHEMA.replace("{serial}", self._db.serial).split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if version != _SCHEMA_VERSION:
                self._db.set_schema_version(_SCHEMA_VERSION)

    def _check_folder(self) -> None:
        """Tie a database ledger to its output folder (see the class docstring)."""
        id_file = self.output_dir / FOLDER_ID_NAME
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(id_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:  # first use: this folder's id, written once (O_EXCL: two hosts cannot both write one)
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"{uuid.uuid4()}\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            folder_id = id_file.read_text().strip()
        except OSError as exc:
            raise OutputNotWritable(self.output_dir, f"{FOLDER_ID_NAME}: {exc}") from None
        for _ in range(20):  # another host is writing it this instant (or its writer died: then say so)
            if folder_id:
                break
            time.sleep(0.25)
            folder_id = id_file.read_text().strip()
        if not folder_id:
            raise database.LedgerUnavailable(f"{id_file} is empty: its writer was interrupted; if this folder's "
                                             "database ledger is new, delete the file and rerun")
        self._db.publish_key = int(uuid.UUID(folder_id).hex[:15], 16) if _is_uuid(folder_id) else self._db.publish_key
        with self._db.transaction():
            self._db.execute("INSERT INTO ledger_meta (key, value) VALUES ('folder_id', ?) ON CONFLICT (key) "
                             "DO NOTHING", (folder_id,))
            (held,) = self._db.execute("SELECT value FROM ledger_meta WHERE key = 'folder_id'").fetchone()
        if held != folder_id:
            raise database.LedgerUnavailable(
                f"the PostgreSQL ledger {self.where} belongs to another output folder (id {held}; {id_file} says "
                f"{folder_id}): give each output folder its own database (or schema), or, if this folder's "
                f"ledger really moved here, copy {FOLDER_ID_NAME} from the folder it was first used with")

    def _transaction(self, snapshot: bool = False):
        return self._db.transaction(snapshot)

    def _retrying(self, fn, attempts: int = 8):
        """Run ``fn`` (one transaction), again when the server aborted it to resolve a conflict with
        another run (a deadlock between two runs' claims and commits, a snapshot that went stale)."""
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt == attempts or not self._db.retryable(exc):
                    raise
                log.info("ledger: transaction conflicted with another run (%s); retrying", type(exc).__name__)
                time.sleep(0.05 * attempt)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries
    def done(self, model: str, bundle_sha256: str, items: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (relative_path, file_sha256) pairs among ``items`` already done (``ok``/``rejected``)
        by this model (the rows' ``model``) with this bundle. Queried in chunks through the unique
        index: works for any number of items."""
        found: set[tuple[str, str]] = set()
        iterator = iter(items)
        with self._mutex:
            while chunk := list(itertools.islice(iterator, _DONE_CHUNK)):
                values = ",".join(["(?, ?)"] * len(chunk))
                sql = (f"WITH q(p, s) AS (VALUES {values}) SELECT p, s FROM q WHERE EXISTS ("
                       "SELECT 1 FROM rows WHERE rows.relative_path = q.p AND rows.file_sha256 = q.s "
                       "AND rows.bundle_sha256 = ? AND rows.model = ? AND rows.done = 1)")
                params = [v for pair in chunk for v in (str(pair[0]), str(pair[1]))] + [bundle_sha256, model]
                found.update(tuple(r) for r in self._db.execute(sql, params))
        return found

    def record(self, run_id: str, rows: Sequence[dict[str, Any]], *, shard: str | None = None) -> int:
        """Insert a batch of result rows in ONE transaction; return how many were inserted.

        A row whose key (KEY_COLUMNS: path, content, bundle, model) is already done is ignored (also a
        duplicate within the batch), and so is an ``error`` row for a key that is already done. A
        kill -9 before the commit loses the whole batch, never part of it. ``run_id`` is stored with
        each row (it overrides a ``run_id`` key). With ``shard``, the same transaction ends the
        claims on these keys and renews the shard's other claims.
        """
        if not rows:
            return 0
        recorded = utc_now()
        params = [{
            "relative_path": row["relative_path"], "file_sha256": row["file_sha256"],
            "bundle_sha256": row["bundle_sha256"], "model": row["model"], "model_version": row["model_version"],
            "status": row["status"], "done": int(row["status"] in DONE_STATUSES), "run_id": run_id,
            "recorded_utc": recorded, "keyset": 0,
            "row_json": json.dumps({**row, "run_id": run_id}, separators=(",", ":"), default=_json_default),
        } for row in map(self._validate, rows)]
        ends = sorted({(p["relative_path"], p["file_sha256"], p["bundle_sha256"], p["model"], run_id)
                       for p in params})  # one lock order for every run's claim rows: fewer deadlocks

        def write() -> int:
            with self._transaction():
                n = self._db.executemany(_INSERT_ROW, params)
                if shard is not None:
                    self._db.executemany("DELETE FROM claims WHERE relative_path = ? AND file_sha256 = ? "
                                         "AND bundle_sha256 = ? AND model = ? AND run_id = ?", ends)
                    self._renew(run_id, shard)
                return n
        inserted = self._retrying(write)
        if inserted < len(rows):
            log.info("ledger: run %s recorded %d rows, ignored %d already done", run_id, inserted,
                     len(rows) - inserted)
        return inserted

    @staticmethod
    def _validate(row: dict[str, Any]) -> dict[str, Any]:
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"ledger row lacks {missing}: {row!r}")
        if row["status"] not in STATUSES:
            raise ValueError(f"ledger row status {row['status']!r} is not one of {sorted(STATUSES)}: {row!r}")
        for column in REQUIRED_COLUMNS:
            if not isinstance(row[column], str):
                raise ValueError(f"ledger row {column} must be a str, not {type(row[column]).__name__}: {row!r}")
        if row["status"] in DONE_STATUSES and not (row["file_sha256"] and row["bundle_sha256"]):
            raise ValueError(f"a {row['status']!r} row needs file_sha256 and bundle_sha256: {row!r}")
        bad = [k for k in row if not isinstance(k, str)]
        if bad:
            raise ValueError(f"ledger row column names must be str: {bad!r}")
        # A text UTF-8 cannot hold (a non-UTF-8 file name quoted in an error) would be stored, then
        # fail every publish of the CSV after it: escape it here, whoever built the row.
        return {k: utf8_text(v) if isinstance(v, str) else v for k, v in row.items()}

    # -- claims: how runs and workers share a night
    def claim(self, run_id: str, shard: str, keys: Iterable[tuple[str, str, str, str]],
              lease: float = CLAIM_SECONDS) -> set[tuple[str, str, str, str]]:
        """Claim (relative_path, file_sha256, bundle_sha256, model) keys for ``shard`` of run ``run_id``;
        return those it now holds and that are not done. A key held by another live run is left to
        it; a key this run already holds (a shard redone after its worker died) is taken over.

        The done check comes after the claim, in the same transaction: another run may record a key
        and end its claim between a caller's ``done`` query and this call, and the claim must not
        then hand the key out again (the row would be ignored, but the scan scored twice)."""
        keys = sorted(set(tuple(map(str, k)) for k in keys))  # one lock order for every run
        if not keys:
            return set()

        def take() -> set[tuple[str, ...]]:
            with self._transaction():
                self._db.executemany(_CLAIM.format(now=self._db.now_epoch, holder=self._db.holder,
                                                   alive=self._db.holder_alive("claims.holder")),
                                     [(*k, run_id, shard, float(lease)) for k in keys])
                self._db.execute("DELETE FROM claims WHERE run_id = ? AND shard = ? AND EXISTS (SELECT 1 FROM rows "
                                 "WHERE rows.relative_path = claims.relative_path AND rows.file_sha256 = "
                                 "claims.file_sha256 AND rows.bundle_sha256 = claims.bundle_sha256 AND rows.model = "
                                 "claims.model AND rows.done = 1)", (run_id, shard))
                return {tuple(r) for r in self._db.execute(
                    "SELECT relative_path, file_sha256, bundle_sha256, model FROM claims WHERE run_id = ? "
                    "AND shard = ?", (run_id, shard))}
        held = self._retrying(take)
        return {k for k in keys if k in held}

    def _renew(self, run_id: str, shard: str, lease: float = CLAIM_SECONDS) -> None:
        self._db.execute(f"UPDATE claims SET expires = {self._db.now_epoch} + ? WHERE run_id = ? AND shard = ?",
                         (float(lease), run_id, shard))

    def release(self, run_id: str, shard: str) -> int:
        """End every claim the shard still holds (keys it skipped: a file that changed while read)."""
        with self._transaction():
            return self._db.execute("DELETE FROM claims WHERE run_id = ? AND shard = ?", (run_id, shard)).rowcount

    def claims(self) -> list[dict[str, Any]]:
        """Every claim in the table (a dead holder's until the next night start removes it), for logs and tests."""
        rows = self._db.execute(f"SELECT relative_path, file_sha256, bundle_sha256, model, run_id, shard, "
                                f"expires - {self._db.now_epoch} FROM claims ORDER BY relative_path").fetchall()
        names = ("relative_path", "file_sha256", "bundle_sha256", "model", "run_id", "shard", "seconds_left")
        return [dict(zip(names, r)) for r in rows]

    # -- nights: the model versions each run pinned
    def start_night(self, run_id: str, pins: list[dict[str, Any]], exclusive: bool = False) -> None:
        """Note the model versions (name, version, sha256 of the graph) run ``run_id`` scores with.
        ``exclusive``: the caller holds the output folder's lock (SQLite), so no other run is alive and
        the claims of any other run are a dead one's: they end now instead of when their lease lapses."""
        with self._transaction():
            if exclusive:
                self._db.execute("DELETE FROM claims WHERE run_id != ?", (run_id,))
            else:  # claims of dead holders are free anyway: keep the table small
                self._db.execute(f"DELETE FROM claims WHERE expires < {self._db.now_epoch} "
                                 f"OR NOT {self._db.holder_alive('claims.holder')}")
            self._db.execute("INSERT INTO nights (run_id, started_utc, host, pins) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (run_id) DO NOTHING",
                             (run_id, utc_now(), socket.gethostname(), json.dumps(pins, sort_keys=True)))

    def night_pins(self, run_id: str) -> list[dict[str, Any]] | None:
        found = self._db.execute("SELECT pins FROM nights WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(found[0]) if found else None

    # -- the hash cache (discovery.HashCache)
    def lookup(self, relative_path: str, stat_key: tuple[int, ...]) -> dict[str, Any] | None:
        """What was learnt about the file at ``relative_path`` when it had this stat key, or None."""
        found = self._db.execute("SELECT stat_key, facts FROM file_hashes WHERE relative_path = ?",
                                 (relative_path,)).fetchone()
        if found is None or json.loads(found[0]) != list(stat_key):
            return None
        return json.loads(found[1])

    def remember_facts(self, entries: Iterable[tuple[str, tuple[int, ...], dict[str, Any]]]) -> None:
        """Store what discovery learnt, in one transaction (a kill before it only costs re-hashing)."""
        now = utc_now()
        params = [(rel, json.dumps(list(key)), json.dumps(facts, sort_keys=True), now) for rel, key, facts in entries]
        if not params:
            return
        with self._transaction():
            self._db.executemany("INSERT INTO file_hashes (relative_path, stat_key, facts, seen_utc) "
                                 "VALUES (?, ?, ?, ?) ON CONFLICT (relative_path) DO UPDATE SET "
                                 "stat_key = excluded.stat_key, facts = excluded.facts, seen_utc = excluded.seen_utc",
                                 params)

    # -- reports
    def publish(self, run_id: str, stamp: str, lock_timeout: float = 6 * 3600.0) -> Path:
        """Publish every unreported row as the night CSV ``scores-<stamp>.csv`` (``-2``, ``-3``... if
        taken) and return its path; header-only when nothing is new. First rewrites any report a
        crashed run claimed but did not finish.

        With SQLite it must run under :func:`scoring_lock`; a PostgreSQL ledger takes its own
        publication lock (waiting up to ``lock_timeout``). Under it, leftover CSV temp files of dead
        writers are deleted first (see ``_remove_stale_temps``)."""
        if not _STAMP_RE.match(stamp) or stamp.startswith("cumulative"):
            raise ValueError(f"report stamp {stamp!r} must be letters, digits, '.', '_' or '-' "
                             "and must not start with 'cumulative'")
        with self._mutex, self._db.publication_lock(lock_timeout):
            self._remove_stale_temps()
            self._recover()
            name = self._retrying(lambda: self._claim(run_id, stamp))
            return self._write_and_mark(name)

    @contextmanager
    def publication(self, lock_timeout: float = 6 * 3600.0) -> Iterator[None]:
        """Hold the publication lock (PostgreSQL) for a sequence of CSV writes."""
        with self._mutex, self._db.publication_lock(lock_timeout):
            yield

    def recover(self) -> list[Path]:
        """Rewrite from the ledger every report that was claimed but not marked published (a run
        died between claim and publish) and mark it published. ``publish`` calls this first."""
        with self.publication():
            return self._recover()

    def _recover(self) -> list[Path]:
        pending = self._db.execute(
            "SELECT name, run_id, claimed_utc FROM reports WHERE published_utc IS NULL ORDER BY seq").fetchall()
        paths = []
        for name, run_id, claimed in pending:
            log.warning("ledger: run %s claimed %s at %s but did not finish publishing it; rewriting it "
                        "from the ledger", run_id, name, claimed)
            paths.append(self._write_and_mark(name))
        return paths

    def _claim(self, run_id: str, stamp: str) -> str:
        """In one transaction: supersede stale unreported error rows, pick a free report name, claim
        every unreported row for it and fix its header."""
        # One snapshot for the whole claim (PostgreSQL's REPEATABLE READ): runs sharing the night insert
        # rows meanwhile, and the rows superseded and the rows claimed must be judged on the same set.
        with self._transaction(snapshot=True):
            self._db.execute(
                "UPDATE rows SET superseded = 1 WHERE report IS NULL AND superseded = 0 AND done = 0 "
                "AND EXISTS (SELECT 1 FROM rows AS later WHERE later.relative_path = rows.relative_path "
                "AND later.bundle_sha256 = rows.bundle_sha256 AND later.model = rows.model "
                f"AND {_SAME_CONTENT.format(row='rows')} AND later.id > rows.id)")
            for n in itertools.count(1):
                name = f"scores-{stamp}.csv" if n == 1 else f"scores-{stamp}-{n}.csv"
                taken = self._db.execute("SELECT 1 FROM reports WHERE name = ?", (name,)).fetchone()
                if not taken and not (self.output_dir / name).exists():
                    break
            # The report first: rows.report references it (PostgreSQL enforces that at once).
            self._db.execute("INSERT INTO reports (name, run_id, claimed_utc, n_rows, header) VALUES (?, ?, ?, 0, ?)",
                             (name, run_id, utc_now(), json.dumps(list(COLUMNS))))
            claimed = self._db.execute("UPDATE rows SET report = ? WHERE report IS NULL AND superseded = 0",
                                       (name,)).rowcount
            self._db.execute("UPDATE reports SET n_rows = ? WHERE name = ?", (claimed, name))
        log.info("ledger: run %s claimed %d rows for %s", run_id, claimed, name)
        return name

    def _write_and_mark(self, name: str) -> Path:
        (header_json,) = self._db.execute("SELECT header FROM reports WHERE name = ?", (name,)).fetchone()
        path = self.output_dir / name
        rows = self._db.stream("SELECT run_id, row_json FROM rows WHERE report = ? ORDER BY id", (name,))
        write_csv(path, json.loads(header_json), rows)
        with self._transaction():
            self._db.execute("UPDATE reports SET published_utc = ? WHERE name = ?", (utc_now(), name))
        return path

    def write_cumulative(self, lock_timeout: float = 6 * 3600.0) -> Path:
        """Rewrite ``scores-cumulative.csv`` atomically: one current row for every scan and model. A
        scan is its path and, for a DICOM series, its series hash (two series in one folder share
        the path). Its current content is that of its newest published row with a content hash (an
        error row without one, a file that could not be read, does not make the known content
        unknown); of the rows for that content, the newest result (ok or rejected) wins over any
        error row, and an error row shows only while no result exists. So a changed file's old row
        and an older model version's row are replaced, while a refused new model version cannot
        hide the last good result. The night CSVs and the ledger keep the history. Streamed: memory
        does not grow with the rows."""
        with self.publication(lock_timeout):
            rows = self._db.stream(_CURRENT_ROWS.format(series=self._db.json_field("r.row_json", "series_uid_hash"),
                                                        same=self._db.same))
            return write_csv(self.output_dir / CUMULATIVE_NAME, list(COLUMNS), rows)

    def _remove_stale_temps(self) -> None:
        """Remove the temp files of interrupted writers (CSVs, pages, drift files, heat maps): those
        untouched for STALE_TEMP_SECONDS, or written on this host by a pid that is gone. The pid alone
        cannot tell: where PIDs restart (containers), a dead writer's pid may belong to a live
        process, even this one; and a pid of another host says nothing here, so another host's temp
        file is judged by its age alone. The CSVs are written under the publication lock the caller
        holds; pages, drift files and heat maps are not, but a live writer on this host keeps its
        temp file by its pid, and one elsewhere by its age (they write within seconds)."""
        now = time.time()
        here = host_tag()
        candidates = [(tmp, _TEMP_RE) for tmp in self.output_dir.glob(".*.tmp")]
        candidates += [(tmp, _HEATMAP_TEMP_RE) for tmp in self.output_dir.glob(f"{HEATMAP_DIR}/*/*/.*.png.*.tmp")]
        for tmp, pattern in candidates:
            match = pattern.match(tmp.name)
            if not match:
                continue
            try:
                age = now - tmp.stat().st_mtime
            except OSError:  # already gone
                continue
            pid, host = int(match.group(1)), match.group(2) or here
            dead_here = host == here and pid != os.getpid() and not pid_alive(pid)
            if age > STALE_TEMP_SECONDS or dead_here:
                log.info("ledger: removing %s left by an interrupted write (%.0f s old)", tmp, age)
                tmp.unlink(missing_ok=True)

    # -- introspection
    def counts(self) -> dict[str, int]:
        """Row counts by state, for logs: ok / rejected / error / unreported / superseded."""
        with self._mutex:
            out = {s: int(n) for s, n in self._db.execute("SELECT status, count(*) FROM rows GROUP BY status")}
            out["unreported"] = self._db.execute(
                "SELECT count(*) FROM rows WHERE report IS NULL AND superseded = 0").fetchone()[0]
            out["superseded"] = self._db.execute("SELECT count(*) FROM rows WHERE superseded = 1").fetchone()[0]
        return out
