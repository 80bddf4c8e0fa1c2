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
  rerun's retry do not both appear in one night), and the cumulative CSV shows only the latest
  published attempt for each (path, content, model, bundle). The content (file_sha256) is part of
  it because two DICOM series in one folder share their path (the folder): one series' row is no
  attempt at the other. An error row with an empty file_sha256 (the file could not even be read to
  hash it) is an attempt at whatever the path holds, so any later row for the path replaces it.
  Each night CSV reports that night's attempts, including retried errors.
* ``Ledger.write_cumulative`` rewrites ``scores-cumulative.csv`` from the published rows, so it is
  current after every publish and never contains a row twice.

No reader ever sees a partial CSV: every CSV is streamed to a temporary file in the same directory
and renamed over the target. Memory does not grow with the number of rows: rows are streamed from
SQLite cursors, and the CSV header is computed from a small table of the column sets seen.

Runs are serialised by :func:`scoring_lock` (an ``flock`` on ``<output_dir>/.scoring.lock``,
released by the kernel even when its holder is killed -9); take it around ``done``/scoring/
``record``/``publish``/``write_cumulative``. ``publish`` relies on it: it deletes leftover CSV temp
files it takes for a dead writer's (see ``Ledger._remove_stale_temps``).

Pure library code: no Prefect imports.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lung_models.fileutil import atomic_writer, report_text

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.sqlite3"
LOCK_NAME = ".scoring.lock"
CUMULATIVE_NAME = "scores-cumulative.csv"
# How long a run waits for another run on the same output folder (a long night's run) before failing.
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0
DONE_STATUSES = frozenset({"ok", "rejected"})
STATUSES = frozenset({"ok", "rejected", "error"})
KEY_COLUMNS = ("relative_path", "file_sha256", "bundle_sha256", "model")
REQUIRED_COLUMNS = ("relative_path", "file_sha256", "model", "model_version", "bundle_sha256", "status")
# Every CSV: LEAD_COLUMNS, the prob_* columns (by first appearance in the ledger), TAIL_COLUMNS, then
# any other column alphabetically. LEAD and TAIL columns are always present, blank when unset.
LEAD_COLUMNS = ("relative_path", "file_sha256", "model", "model_version", "predicted_class")
TAIL_COLUMNS = ("status", "error", "provider", "scored_utc", "bundle_sha256", "item_kind", "series_uid_hash",
                "run_id")
FIXED_COLUMNS = frozenset(LEAD_COLUMNS + TAIL_COLUMNS)
PROB_PREFIX = "prob_"

# 2: the done key and the attempt index include the model (1 had no model in the done key, no file_sha256 in
# rows_attempt). 1 -> 2 only recreates those two indexes: the new unique index is looser, so it always builds.
_SCHEMA_VERSION = 2
_REBUILT_INDEXES = {1: ("rows_done_key", "rows_attempt")}  # by the version they are rebuilt from
_DONE_CHUNK = 400  # (path, sha) pairs per query: 802 parameters, far below SQLite's limit
STALE_TEMP_SECONDS = 3600  # a CSV temp file untouched this long is a dead writer's (writers rewrite it within seconds)
# fileutil.atomic_writer's temp names for our CSVs: .<name>.csv.<pid>.<mkstemp's random part>.tmp
_TEMP_RE = re.compile(r"^\.scores-.+\.csv\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
_STAMP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keysets (
    id INTEGER PRIMARY KEY,
    keys TEXT NOT NULL UNIQUE            -- JSON list of a row's non-fixed column names, sorted
);
CREATE TABLE IF NOT EXISTS columns (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL                 -- first appearance in the ledger: orders the prob_ columns
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
    keyset INTEGER NOT NULL REFERENCES keysets(id),
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ScoringLockTimeout(RuntimeError):
    """Another scoring run held the output folder's lock for longer than the timeout."""


# --------------------------------------------------------------------------------------------- lock
def _read_holder(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _lock_timeout_message(path: Path, timeout: float) -> str:
    info = _read_holder(path)
    if info.get("pid"):
        holder = (f"pid {info['pid']} on host {info.get('host', '?')}, started {info.get('started_utc', '?')}"
                  + (f", {info['label']}" if info.get("label") else ""))
        advice = (f"Let it finish, or, if that process is hung, stop it (`kill {info['pid']}` on "
                  f"{info.get('host', 'its host')}) and rerun")
    else:
        holder = "holder unknown: it has not written its pid yet"
        advice = "Let it finish, or find and stop it (`fuser -v <lock>` lists it) and rerun"
    return (f"another scoring run holds the lock {path} ({holder}); gave up after waiting {timeout:g} s. "
            f"{advice}. The lock is released automatically when its holder exits, even if killed; "
            "do not delete the lock file.")


@contextmanager
def scoring_lock(output_dir: str | os.PathLike, timeout: float = DEFAULT_LOCK_TIMEOUT, poll: float = 0.5, *,
                 label: str = "") -> Iterator[Path]:
    """Hold the exclusive scoring lock of ``output_dir`` (``flock`` on ``.scoring.lock``).

    Non-blocking attempts are polled every ``poll`` seconds until ``timeout`` (``0``: one attempt);
    then :class:`ScoringLockTimeout` names the holder. Once acquired, the holder's pid, host, start
    time (UTC) and ``label`` (e.g. the flow run id) are written into the lock file. The kernel drops
    the lock when the holding process exits, even on kill -9, so a crash never leaves a stale lock.
    Not re-entrant: taking it again in the same process (or thread) waits for itself.
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    # os.open fds are non-inheritable (PEP 446): a child the holder exec()s does not keep the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScoringLockTimeout(_lock_timeout_message(path, timeout))
            time.sleep(min(max(poll, 0.01), remaining))
        details = (f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted_utc={_now()}\n"
                   + (f"label={' '.join(label.split())}\n" if label else ""))
        os.ftruncate(fd, 0)
        os.pwrite(fd, details.encode("utf-8"), 0)
        try:
            yield path
        finally:
            try:
                os.ftruncate(fd, 0)  # the details describe the current holder only
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / LEDGER_NAME
        self._mutex = threading.RLock()
        self._keysets: dict[tuple[str, ...], int] = {}
        # isolation_level=None: no implicit transactions; every write below is an explicit
        # BEGIN IMMEDIATE ... COMMIT, and reads run in autocommit.
        self._conn = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                     check_same_thread=False)
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
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

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
        recorded = _now()
        prepared = [self._validate(r) for r in rows]
        new_keysets: dict[tuple[str, ...], int] = {}
        with self._transaction() as conn:
            seq_by_name = None
            params = []
            for row in prepared:
                extras = tuple(sorted(k for k in row if k not in FIXED_COLUMNS))
                keyset = self._keysets.get(extras) or new_keysets.get(extras)
                if keyset is None:
                    if seq_by_name is None:
                        seq_by_name = dict(conn.execute("SELECT name, seq FROM columns"))
                    for name in row:  # first appearance order, as the row lists its columns
                        if name not in FIXED_COLUMNS and name not in seq_by_name:
                            seq_by_name[name] = max(seq_by_name.values(), default=0) + 1
                            conn.execute("INSERT INTO columns (name, seq) VALUES (?, ?)", (name, seq_by_name[name]))
                    keys = json.dumps(list(extras))
                    conn.execute("INSERT OR IGNORE INTO keysets (keys) VALUES (?)", (keys,))
                    keyset = conn.execute("SELECT id FROM keysets WHERE keys = ?", (keys,)).fetchone()[0]
                    new_keysets[extras] = keyset
                stored = {**row, "run_id": run_id}
                params.append({
                    "relative_path": row["relative_path"], "file_sha256": row["file_sha256"],
                    "bundle_sha256": row["bundle_sha256"], "model": row["model"],
                    "model_version": row["model_version"], "status": row["status"],
                    "done": int(row["status"] in DONE_STATUSES), "run_id": run_id, "recorded_utc": recorded,
                    "keyset": keyset,
                    "row_json": json.dumps(stored, separators=(",", ":"), default=_json_default),
                })
            cursor = conn.executemany(_INSERT_ROW, params)
            inserted = cursor.rowcount
        self._keysets.update(new_keysets)  # only ids that are committed
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
        return {k: report_text(v) if isinstance(v, str) else v for k, v in row.items()}

    # -- columns
    def _header(self, extras: Iterable[str]) -> list[str]:
        extras = set(extras) - FIXED_COLUMNS
        with self._mutex:
            seq = dict(self._conn.execute("SELECT name, seq FROM columns"))
        probs = sorted((c for c in extras if c.startswith(PROB_PREFIX)), key=lambda c: (seq.get(c, 1 << 62), c))
        others = sorted(c for c in extras if not c.startswith(PROB_PREFIX))
        return [*LEAD_COLUMNS, *probs, *TAIL_COLUMNS, *others]

    def _extras_of_keysets(self, keyset_ids: Iterable[int]) -> set[str]:
        extras: set[str] = set()
        for (keys,) in self._conn.execute(
                f"SELECT keys FROM keysets WHERE id IN ({','.join(str(int(k)) for k in keyset_ids) or 'NULL'})"):
            extras.update(json.loads(keys))
        return extras

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
            keysets = [k for (k,) in conn.execute("SELECT DISTINCT keyset FROM rows WHERE report = ?", (name,))]
            header = self._header(self._extras_of_keysets(keysets))
            conn.execute("INSERT INTO reports (name, run_id, claimed_utc, n_rows, header) VALUES (?, ?, ?, ?, ?)",
                         (name, run_id, _now(), claimed, json.dumps(header)))
        log.info("ledger: run %s claimed %d rows for %s", run_id, claimed, name)
        return name

    def _write_and_mark(self, name: str) -> Path:
        (header_json,) = self._conn.execute("SELECT header FROM reports WHERE name = ?", (name,)).fetchone()
        path = self.output_dir / name
        rows = self._conn.execute("SELECT run_id, row_json FROM rows WHERE report = ? ORDER BY id", (name,))
        self._write_csv(path, json.loads(header_json), rows)
        with self._transaction() as conn:
            conn.execute("UPDATE reports SET published_utc = ? WHERE name = ?", (_now(), name))
        return path

    def write_cumulative(self) -> Path:
        """Rewrite ``scores-cumulative.csv`` atomically from every published row, oldest first: each
        done row once, and for error rows only the latest published attempt per (path, content,
        model, bundle) that no later published row replaced. Streamed: memory does not grow with the rows."""
        with self._mutex:
            extras: set[str] = set()
            for (header,) in self._conn.execute("SELECT header FROM reports WHERE published_utc IS NOT NULL"):
                extras.update(json.loads(header))
            rows = self._conn.execute(
                "SELECT r.run_id, r.row_json FROM rows AS r JOIN reports AS p ON p.name = r.report "
                "WHERE p.published_utc IS NOT NULL AND (r.done = 1 OR NOT EXISTS ("
                "  SELECT 1 FROM rows AS later JOIN reports AS lp ON lp.name = later.report "
                "  WHERE later.relative_path = r.relative_path AND later.bundle_sha256 = r.bundle_sha256 "
                f"  AND later.model = r.model AND {_SAME_CONTENT.format(row='r')} AND later.id > r.id "
                "  AND lp.published_utc IS NOT NULL)) "
                "ORDER BY r.id")
            return self._write_csv(self.output_dir / CUMULATIVE_NAME, self._header(extras), rows)

    @staticmethod
    def _write_csv(path: Path, header: list[str], rows: sqlite3.Cursor) -> Path:
        with closing(rows), atomic_writer(path) as handle:  # closing: never leave a read open
            writer = csv.DictWriter(handle, fieldnames=header, restval="", extrasaction="ignore")
            writer.writeheader()
            for run_id, row_json in rows:
                row = json.loads(row_json)
                row["run_id"] = run_id
                writer.writerow(row)
        return path

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
            if age > STALE_TEMP_SECONDS or (pid != os.getpid() and not _pid_alive(pid)):
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
