"""The two databases a ledger can live in: SQLite in the output folder (one host, the embedded
default) or PostgreSQL chosen by URL (many workers on many hosts).

The ledger's SQL is written once, in SQLite's parameter style (``?`` and ``:name``); the PostgreSQL
connection rewrites it to psycopg's (``%s`` and ``%(name)s``). The few places where the dialects
differ (an auto-increment key, reading a JSON field, the database's clock, a lock that outlives one
transaction) are attributes of the connection classes below. Both run every write as one explicit
transaction, and reads in autocommit.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lung_models.scoring.lock import OutputNotWritable

log = logging.getLogger(__name__)

_READ_ONLY = re.compile(r"readonly|read-only|unable to open|permission", re.IGNORECASE)
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
# One ledger per PostgreSQL database (or schema): the key of its publication lock and of its schema set-up.
_PUBLISH_LOCK_KEY = 0x4C554E47  # "LUNG"
_SCHEMA_LOCK_KEY = 0x4C554E48


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0] in ("postgresql", "postgres", "postgresql+psycopg")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class LedgerUnavailable(RuntimeError):
    """The ledger's database cannot be reached or used."""


class SQLiteDatabase:
    kind = "sqlite"
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    now_epoch = "((julianday('now') - 2440587.5) * 86400.0)"
    holder = "''"  # one host: a claim's holder is judged by its lease and the output folder's lock

    @staticmethod
    def holder_alive(column: str) -> str:
        return "1"

    def __init__(self, path: Path, busy_timeout: float = 120.0):
        self.path = path
        self.where = str(path)
        self._mutex = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write below is an explicit
            # BEGIN IMMEDIATE ... COMMIT, and reads run in autocommit.
            self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except (PermissionError, sqlite3.OperationalError) as exc:
            raise OutputNotWritable(path.parent, f"{path.name}: {exc}") from None
        try:
            # Rollback journal (DELETE), not WAL: the ledger stays one self-contained file (no -wal /
            # -shm sidecars for a backup or copy to miss), and it works on filesystems without shared
            # memory, where WAL cannot. With synchronous=FULL a commit is durable and atomic across
            # kill -9 and power loss. Several processes of one host (Dask workers) may write: each
            # transaction takes the file's write lock, waiting up to busy_timeout for it.
            self._conn.execute("PRAGMA journal_mode=DELETE")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        except sqlite3.OperationalError as exc:
            self._conn.close()
            self._raise(exc)

    def _raise(self, exc: sqlite3.OperationalError):
        if _READ_ONLY.search(str(exc)):
            raise OutputNotWritable(self.path.parent, f"{self.path.name}: {exc}") from None
        raise exc

    @staticmethod
    def json_field(column: str, field: str) -> str:
        return f"json_extract({column}, '$.{field}')"

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            self._raise(exc)

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        with self._mutex:
            return self._conn.execute(sql, params)

    def executemany(self, sql: str, params: Sequence[Any]) -> int:
        with self._mutex:
            return self._conn.executemany(sql, params).rowcount

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple]:
        """Rows one by one (SQLite's cursor already steps through the result)."""
        with self._mutex:
            yield from self._conn.execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._mutex:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:  # the folder or the file turned read-only
                self._raise(exc)

    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        self._conn.execute(f"PRAGMA user_version={int(version)}")

    @contextmanager
    def schema_lock(self) -> Iterator[None]:
        yield  # BEGIN IMMEDIATE already serialises schema set-up

    @contextmanager
    def publication_lock(self, timeout: float) -> Iterator[None]:
        # One host: the caller holds the output folder's scoring_lock around the whole run.
        yield

    def close(self) -> None:
        with self._mutex:
            self._conn.close()


# A server connection, named so that a reused backend pid is not mistaken for it: pid@start time.
_BACKEND = "{a}.pid::text || '@' || extract(epoch from {a}.backend_start)::text"


class PostgresDatabase:
    kind = "postgresql"
    serial = "BIGSERIAL PRIMARY KEY"
    now_epoch = "extract(epoch from clock_timestamp())::double precision"
    holder = f"(SELECT {_BACKEND.format(a='a')} FROM pg_stat_activity AS a WHERE a.pid = pg_backend_pid())"

    @staticmethod
    def holder_alive(column: str) -> str:
        """Whether the connection that took a claim is still open. The server ends the connection of a
        killed process (its socket closes), so its claims are free at once. Direct connections only: a
        pooler in transaction mode would hand one server connection to many clients."""
        return f"EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE {_BACKEND.format(a='a')} = {column})"

    def __init__(self, url: str, connect_timeout: float = 30.0):
        try:
            import psycopg
        except ImportError:  # pragma: no cover - psycopg is a dependency
            raise LedgerUnavailable("the PostgreSQL ledger needs psycopg: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        self.where = redact(url)
        self._mutex = threading.RLock()
        try:
            # autocommit: reads see every committed write at once; writes are explicit transactions.
            self._conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql", 1), autocommit=True,
                                         connect_timeout=max(1, int(connect_timeout)),
                                         application_name="lung-factory-ledger")
        except psycopg.Error as exc:
            raise LedgerUnavailable(
                f"cannot connect to the PostgreSQL ledger {self.where}: {str(exc).strip()}; check that the server "
                "runs and is reachable from this host, and the URL's user, password and database") from None

    @staticmethod
    def json_field(column: str, field: str) -> str:
        return f"({column}::json ->> '{field}')"

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        try:
            yield
        except self._psycopg.OperationalError as exc:
            raise LedgerUnavailable(f"the PostgreSQL ledger {self.where} failed: {str(exc).strip()}") from exc

    @staticmethod
    def _sql(sql: str) -> str:
        return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%")).replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        with self._mutex:
            return self._conn.execute(self._sql(sql), params or None)

    def executemany(self, sql: str, params: Sequence[Any]) -> int:
        with self._mutex, self._conn.cursor() as cur:
            cur.executemany(self._sql(sql), params)
            return cur.rowcount

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple]:
        """Rows one by one from a server-side cursor: psycopg's ordinary cursor would load the whole
        result (a cumulative CSV of millions of rows) into this process first."""
        with self._mutex, self._conn.transaction(), self._conn.cursor(name="lung_factory_stream") as cur:
            cur.itersize = 2000
            cur.execute(self._sql(sql), params or None)
            yield from cur

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._mutex, self._conn.transaction():
            yield

    def schema_version(self) -> int:
        found = self._conn.execute("SELECT to_regclass('ledger_meta')").fetchone()[0]
        if found is None:
            return 0
        row = self._conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def set_schema_version(self, version: int) -> None:
        self._conn.execute("INSERT INTO ledger_meta (key, value) VALUES ('schema_version', %s) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(int(version)),))

    @contextmanager
    def schema_lock(self) -> Iterator[None]:
        # Two workers opening a new database at once would race on CREATE TABLE IF NOT EXISTS.
        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        yield

    @contextmanager
    def publication_lock(self, timeout: float) -> Iterator[None]:
        """Runs on many hosts publish one at a time: a session-level advisory lock, released by the
        server when this connection ends, even if its process is killed."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._mutex:
            while not self._conn.execute("SELECT pg_try_advisory_lock(%s)", (_PUBLISH_LOCK_KEY,)).fetchone()[0]:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another run has been publishing reports from the ledger {self.where} for "
                                       f"more than {timeout:g} s; let it finish, or stop it and rerun")
                time.sleep(0.2)
            try:
                yield
            finally:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (_PUBLISH_LOCK_KEY,))

    def close(self) -> None:
        with self._mutex:
            self._conn.close()


def connect(output_dir: Path, url: str | None, name: str, busy_timeout: float = 120.0):
    """The ledger's database: PostgreSQL for a ``postgresql://`` URL, else SQLite ``<output_dir>/<name>``."""
    if url and not is_postgres_url(url) and url != "sqlite":
        raise ValueError(f"ledger must be 'sqlite' (a file in the output folder) or a postgresql:// URL, "
                         f"not {redact(url)!r}")
    if is_postgres_url(url):
        return PostgresDatabase(url)
    return SQLiteDatabase(output_dir / name, busy_timeout)
