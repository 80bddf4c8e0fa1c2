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
from urllib.parse import unquote, urlsplit, urlunsplit

from lung_models.scoring.lock import OutputNotWritable, ScoringLockTimeout

log = logging.getLogger(__name__)

_READ_ONLY = re.compile(r"readonly|read-only|unable to open|permission", re.IGNORECASE)
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
# One ledger per PostgreSQL database (or schema): the key of its publication lock and of its schema set-up.
_PUBLISH_LOCK_KEY = 0x4C554E47  # "LUNG"
_SCHEMA_LOCK_KEY = 0x4C554E48


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0] in ("postgresql", "postgres", "postgresql+psycopg")


def redact(url: str) -> str:
    """The URL without its password (in the user part or the query), for messages and logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, host = netloc.rsplit("@", 1)
            netloc = f"{user.split(':', 1)[0]}{':***' if ':' in user else ''}@{host}"
        query = "&".join("password=***" if q.lower().startswith("password=") else q
                         for q in parts.query.split("&")) if parts.query else ""
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return f"{url.split(':', 1)[0]}://(a URL that does not parse)"


def _secrets(url: str) -> list[str]:
    """The password of a URL, raw and decoded, wherever it is, to scrub from driver messages."""
    found = []
    try:
        parts = urlsplit(url)
        user = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
        if ":" in user:
            found.append(user.split(":", 1)[1])
        found += [q.split("=", 1)[1] for q in parts.query.split("&") if q.lower().startswith("password=")]
    except ValueError:
        pass
    return [v for s in found if s for v in {s, unquote(s)}]


class LedgerUnavailable(RuntimeError):
    """The ledger's database cannot be reached or used."""


class SQLiteDatabase:
    kind = "sqlite"
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    now_epoch = "((julianday('now') - 2440587.5) * 86400.0)"
    holder = "''"  # one host: a claim's holder is judged by its lease and the output folder's lock
    same = "IS"  # NULL-safe equality (IS NOT DISTINCT FROM needs SQLite 3.39, newer than some LTS systems)

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

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        return False  # BEGIN IMMEDIATE serialises writers: no deadlocks, and busy_timeout waits

    @contextmanager
    def transaction(self, snapshot: bool = False) -> Iterator[None]:
        # BEGIN IMMEDIATE: one writer at a time, so every transaction already sees one state.
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
    same = "IS NOT DISTINCT FROM"

    @staticmethod
    def holder_alive(column: str) -> str:
        """Whether the connection that took a claim is still open. The server ends the connection of a
        killed process (its socket closes), so its claims are free at once. Another role's
        backend_start is hidden without pg_read_all_stats: then the pid alone says it. Direct
        connections only: a pooler in transaction mode would hand one server connection to many clients."""
        return (f"EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid::text = split_part({column}, '@', 1) "
                f"AND (a.backend_start IS NULL OR {_BACKEND.format(a='a')} = {column}))")

    def __init__(self, url: str, connect_timeout: float = 30.0):
        try:
            import psycopg
        except ImportError:  # pragma: no cover - psycopg is a dependency
            raise LedgerUnavailable("the PostgreSQL ledger needs psycopg: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        self.where = redact(url)
        self._mutex = threading.RLock()
        self.publish_key = _PUBLISH_LOCK_KEY  # the ledger sets its folder's once it knows it
        try:
            # autocommit: reads see every committed write at once; writes are explicit transactions.
            self._conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql", 1), autocommit=True,
                                         connect_timeout=max(1, int(connect_timeout)),
                                         application_name="lung-factory-ledger")
        except psycopg.Error as exc:
            detail = str(exc).strip()
            for secret in _secrets(url):  # a driver message may quote the URL, or a part of it it could not parse
                detail = detail.replace(secret, "***")
            raise LedgerUnavailable(
                f"cannot connect to the PostgreSQL ledger {self.where}: {detail}; check that the server "
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
        """SQLite's placeholders as psycopg's. The ledger's SQL keeps '?', ':name' and '%' out of its
        string literals (this rewrite does not parse them); parameters are always passed, so psycopg
        always turns '%%' back into '%'."""
        return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%")).replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        with self._mutex:
            return self._conn.execute(self._sql(sql), params)

    def executemany(self, sql: str, params: Sequence[Any]) -> int:
        with self._mutex, self._conn.cursor() as cur:
            cur.executemany(self._sql(sql), params)
            return cur.rowcount

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple]:
        """Rows one by one from a server-side cursor: psycopg's ordinary cursor would load the whole
        result (a cumulative CSV of millions of rows) into this process first."""
        with self._mutex, self._conn.transaction(), self._conn.cursor(name="lung_factory_stream") as cur:
            cur.itersize = 2000
            cur.execute(self._sql(sql), params)
            yield from cur

    @contextmanager
    def transaction(self, snapshot: bool = False) -> Iterator[None]:
        """``snapshot``: every statement sees the same snapshot (REPEATABLE READ), for a transaction
        whose statements must agree on which rows exist while other runs insert."""
        with self._mutex, self._conn.transaction():
            if snapshot:
                self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield

    def retryable(self, exc: BaseException) -> bool:
        """A transaction the server aborted to resolve a conflict between runs: run it again."""
        errors = self._psycopg.errors
        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure))

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
        server when this connection ends, even if its process is killed. Its key is the output
        folder's (``publish_key``): ledgers in several schemas of one database do not wait on each other."""
        deadline = time.monotonic() + max(timeout, 0.0)
        key = self.publish_key
        with self._mutex:
            while not self._conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                if time.monotonic() >= deadline:
                    raise ScoringLockTimeout(f"another run has been publishing reports from the ledger {self.where} "
                                             f"for more than {timeout:g} s; let it finish, or stop it and rerun")
                time.sleep(0.2)
            try:
                yield
            finally:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

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
