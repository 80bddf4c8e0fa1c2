"""Exactly-once scoring ledger: which (file content, model bundle) pairs are scored, and their CSV reports.

Every scoring result is a row keyed by ``(relative_path, file_sha256, bundle_sha256, model)``: the
item's path, the sha256 of its content, the sha256 of the model's ONNX file and the model's name (two
models may ship byte-identical ONNX files, e.g. the same graph under two names). ``ok`` and ``rejected``
rows are *done* (``rejected`` means the content itself is bad, so it would be bad again); an
``error`` row (unreadable file, refused bundle, inference crash) is reported but not done, so the
next run retries it. The ledger is one SQLite file, ``<output_dir>/ledger.sqlite3``.

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

Runs are serialised by :func:`lock.scoring_lock` (an ``flock`` on ``<output_dir>/.scoring.lock``,
released by the kernel even when its holder is killed -9); take it around ``done``/scoring/
``record``/``publish``/``write_cumulative``. ``publish`` relies on it: it deletes leftover CSV temp
files it takes for a dead writer's (see ``Ledger._remove_stale_temps``).

Pure library code: no Prefect imports.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lung_models.fileutil import utc_now, utf8_text
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
_SCHEMA_VERSION = 3
_REBUILT_INDEXES = {1: ("rows_done_key", "rows_attempt")}  # by the version they are rebuilt from
_DONE_CHUNK = 400  # (path, sha) pairs per query: 802 parameters, far below SQLite's limit
STALE_TEMP_SECONDS = 3600  # a CSV temp file untouched this long is a dead writer's (writers rewrite it within seconds)
# fileutil.atomic_writer's temp names for our CSVs: .<name>.csv.<pid>.<mkstemp's random part>.tmp
_TEMP_RE = re.compile(r"^\.scores-.+\.csv\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
_READ_ONLY = re.compile(r"readonly|read-only|unable to open|permission", re.IGNORECASE)
_STAMP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_hashes (
    relative_path TEXT PRIMARY KEY,
    stat_key TEXT NOT NULL,              -- JSON [size, mtime_ns, ctime_ns, inode] when it was hashed
    facts TEXT NOT NULL,                 -- JSON {"sha256", "kind", "source"[, "series"]}
    seen_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,           -- CSV file name in output_dir
    run_id TEXT NOT NULL,
    claimed_utc TEXT NOT NULL,
    n_rows INTEGER NOT NULL,
    header TEXT NOT NULL,                -- JSON list: the CSV header, fixed at claim time
    published_utc TEXT                   -- NULL until the CSV is durably in place
);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
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
"""

# A later row is another attempt at the same item when it has the same content; an error row without
# content hash (the file could not be read) is an attempt at whatever the path holds.
_SAME_CONTENT = "(later.file_sha256 = {row}.file_sha256 OR {row}.file_sha256 = '')"

# The cumulative CSV's rows (see Ledger.write_cumulative).
_CURRENT_ROWS = """
WITH pub AS (
    SELECT r.id, r.run_id, r.row_json, r.relative_path, r.file_sha256, r.model, r.done,
           json_extract(r.row_json, '$.series_uid_hash') AS series
    FROM rows AS r JOIN reports AS p ON p.name = r.report WHERE p.published_utc IS NOT NULL),
content AS (
    SELECT relative_path, series, model, file_sha256 FROM (
        SELECT relative_path, series, model, file_sha256, ROW_NUMBER() OVER (
            PARTITION BY relative_path, series, model ORDER BY file_sha256 != '' DESC, id DESC) AS n
        FROM pub)
    WHERE n = 1)
SELECT run_id, row_json FROM (
    SELECT pub.id, pub.run_id, pub.row_json, ROW_NUMBER() OVER (
        PARTITION BY pub.relative_path, pub.series, pub.model ORDER BY pub.done DESC, pub.id DESC) AS n
    FROM pub JOIN content AS c ON c.relative_path = pub.relative_path AND c.series IS pub.series
        AND c.model = pub.model AND c.file_sha256 = pub.file_sha256)
WHERE n = 1 ORDER BY id
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


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return item()
    return str(value)


# ----------------------------------------------------------------------------------------- ledger
class Ledger:
    """The scoring ledger of one output folder (``<output_dir>/ledger.sqlite3``)."""

    def __init__(self, output_dir: str | os.PathLike, busy_timeout: float = 120.0):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LEDGER_NAME
        self._mutex = threading.RLock()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write below is an explicit
            # BEGIN IMMEDIATE ... COMMIT, and reads run in autocommit.
            self._conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                         check_same_thread=False)
        except (PermissionError, sqlite3.OperationalError) as exc:
            raise OutputNotWritable(self.output_dir, f"{LEDGER_NAME}: {exc}") from None
        try:
            # Rollback journal (DELETE), not WAL: writers are serialised by scoring_lock anyway, so
            # WAL's concurrent readers buy nothing; the ledger stays one self-contained file (no -wal
            # / -shm sidecars for a backup or copy to miss), and it works on filesystems without
            # shared memory (network shares), where WAL cannot. With synchronous=FULL a commit is
            # durable and atomic across kill -9 and power loss.
            self._conn.execute("PRAGMA journal_mode=DELETE")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            self._init_schema()
        except sqlite3.OperationalError as exc:
            self._conn.close()
            if _READ_ONLY.search(str(exc)):
                raise OutputNotWritable(self.output_dir, f"{LEDGER_NAME}: {exc}") from None
            raise
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing
    def _init_schema(self) -> None:
        with self._transaction():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has ledger schema {version}, newer than this code "
                                   f"({_SCHEMA_VERSION}); upgrade lung_models")
            for old in range(version, _SCHEMA_VERSION):  # a new ledger (0) has nothing to drop
                for index in _REBUILT_INDEXES.get(old, ()):
                    self._conn.execute(f"DROP INDEX IF EXISTS {index}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:  # the folder or the file turned read-only
                if _READ_ONLY.search(str(exc)):
                    raise OutputNotWritable(self.output_dir, f"{LEDGER_NAME}: {exc}") from None
                raise

    def close(self) -> None:
        with self._mutex:
            self._conn.close()

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
                found.update(self._conn.execute(sql, params))
        return found

    def record(self, run_id: str, rows: Sequence[dict[str, Any]]) -> int:
        """Insert a batch of result rows in ONE transaction; return how many were inserted.

        A row whose key (KEY_COLUMNS: path, content, bundle, model) is already done is ignored (also a
        duplicate within the batch), and so is an ``error`` row for a key that is already done. A
        kill -9 before the commit loses the whole batch, never part of it. ``run_id`` is stored with
        each row (it overrides a ``run_id`` key).
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
        with self._transaction() as conn:
            inserted = conn.executemany(_INSERT_ROW, params).rowcount
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

    # -- the hash cache (discovery.HashCache)
    def lookup(self, relative_path: str, stat_key: tuple[int, ...]) -> dict[str, Any] | None:
        """What was learnt about the file at ``relative_path`` when it had this stat key, or None."""
        with self._mutex:
            found = self._conn.execute("SELECT stat_key, facts FROM file_hashes WHERE relative_path = ?",
                                       (relative_path,)).fetchone()
        if found is None or json.loads(found[0]) != list(stat_key):
            return None
        return json.loads(found[1])

    def remember_facts(self, entries: Iterable[tuple[str, tuple[int, ...], dict[str, Any]]]) -> None:
        """Store what discovery learnt, in one transaction (a kill before it only costs re-hashing)."""
        now = utc_now()
        params = [(rel, json.dumps(list(key)), json.dumps(facts, sort_keys=True), now) for rel, key, facts in entries]
        with self._transaction() as conn:
            conn.executemany("INSERT INTO file_hashes (relative_path, stat_key, facts, seen_utc) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (relative_path) DO UPDATE SET stat_key = excluded.stat_key, "
                             "facts = excluded.facts, seen_utc = excluded.seen_utc", params)

    # -- reports
    def publish(self, run_id: str, stamp: str) -> Path:
        """Publish every unreported row as the night CSV ``scores-<stamp>.csv`` (``-2``, ``-3``... if
        taken) and return its path; header-only when nothing is new. First rewrites any report a
        crashed run claimed but did not finish.

        Must run under :func:`scoring_lock`: it first deletes CSV temp files left by interrupted
        writers (an hour old, or whose writer pid is gone), which is only safe when no other run
        can be writing one."""
        if not _STAMP_RE.match(stamp) or stamp.startswith("cumulative"):
            raise ValueError(f"report stamp {stamp!r} must be letters, digits, '.', '_' or '-' "
                             "and must not start with 'cumulative'")
        with self._mutex:
            self._remove_stale_temps()
            self.recover()
            name = self._claim(run_id, stamp)
            return self._write_and_mark(name)

    def recover(self) -> list[Path]:
        """Rewrite from the ledger every report that was claimed but not marked published (a run
        died between claim and publish) and mark it published. ``publish`` calls this first."""
        with self._mutex:
            pending = self._conn.execute(
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
        with self._transaction() as conn:
            conn.execute(
                "UPDATE rows SET superseded = 1 WHERE report IS NULL AND superseded = 0 AND done = 0 "
                "AND EXISTS (SELECT 1 FROM rows AS later WHERE later.relative_path = rows.relative_path "
                "AND later.bundle_sha256 = rows.bundle_sha256 AND later.model = rows.model "
                f"AND {_SAME_CONTENT.format(row='rows')} AND later.id > rows.id)")
            for n in itertools.count(1):
                name = f"scores-{stamp}.csv" if n == 1 else f"scores-{stamp}-{n}.csv"
                taken = conn.execute("SELECT 1 FROM reports WHERE name = ?", (name,)).fetchone()
                if not taken and not (self.output_dir / name).exists():
                    break
            claimed = conn.execute("UPDATE rows SET report = ? WHERE report IS NULL AND superseded = 0",
                                   (name,)).rowcount
            header = list(COLUMNS)
            conn.execute("INSERT INTO reports (name, run_id, claimed_utc, n_rows, header) VALUES (?, ?, ?, ?, ?)",
                         (name, run_id, utc_now(), claimed, json.dumps(header)))
        log.info("ledger: run %s claimed %d rows for %s", run_id, claimed, name)
        return name

    def _write_and_mark(self, name: str) -> Path:
        (header_json,) = self._conn.execute("SELECT header FROM reports WHERE name = ?", (name,)).fetchone()
        path = self.output_dir / name
        rows = self._conn.execute("SELECT run_id, row_json FROM rows WHERE report = ? ORDER BY id", (name,))
        write_csv(path, json.loads(header_json), rows)
        with self._transaction() as conn:
            conn.execute("UPDATE reports SET published_utc = ? WHERE name = ?", (utc_now(), name))
        return path

    def write_cumulative(self) -> Path:
        """Rewrite ``scores-cumulative.csv`` atomically: one current row for every scan and model. A
        scan is its path and, for a DICOM series, its series hash (two series in one folder share
        the path). Its current content is that of its newest published row with a content hash (an
        error row without one, a file that could not be read, does not make the known content
        unknown); of the rows for that content, the newest result (ok or rejected) wins over any
        error row, and an error row shows only while no result exists. So a changed file's old row
        and an older model version's row are replaced, while a refused new model version cannot
        hide the last good result. The night CSVs and the ledger keep the history. Streamed: memory
        does not grow with the rows."""
        with self._mutex:
            rows = self._conn.execute(_CURRENT_ROWS)
            return write_csv(self.output_dir / CUMULATIVE_NAME, list(COLUMNS), rows)

    def _remove_stale_temps(self) -> None:
        """Remove CSV temp files left by interrupted writers: those untouched for STALE_TEMP_SECONDS,
        or whose writer pid is gone. The pid alone cannot tell: where PIDs restart (containers), a
        dead writer's pid may belong to a live process, even this one. Callers hold the scoring
        lock, so no other run is writing a report; our own writes are serialised by ``_mutex``."""
        now = time.time()
        for tmp in self.output_dir.glob(".scores-*.tmp"):
            match = _TEMP_RE.match(tmp.name)
            if not match:
                continue
            try:
                age = now - tmp.stat().st_mtime
            except OSError:  # already gone
                continue
            pid = int(match.group(1))
            if age > STALE_TEMP_SECONDS or (pid != os.getpid() and not pid_alive(pid)):
                log.info("ledger: removing %s left by an interrupted write (%.0f s old)", tmp, age)
                tmp.unlink(missing_ok=True)

    # -- introspection
    def counts(self) -> dict[str, int]:
        """Row counts by state, for logs: ok / rejected / error / unreported / superseded."""
        with self._mutex:
            out = dict(self._conn.execute("SELECT status, count(*) FROM rows GROUP BY status"))
            out["unreported"] = self._conn.execute(
                "SELECT count(*) FROM rows WHERE report IS NULL AND superseded = 0").fetchone()[0]
            out["superseded"] = self._conn.execute("SELECT count(*) FROM rows WHERE superseded = 1").fetchone()[0]
        return out
