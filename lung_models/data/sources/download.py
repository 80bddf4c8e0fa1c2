"""HTTP(S) downloads: resumable, retried on transient failures, verified against a pinned sha256."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import requests

from lung_models.data.sources.base import CHUNK, MANUAL_FIX, DataSourceError, Progress, say
from lung_models.data.sources.build_once import exclusive_lock
from lung_models.fileutil import sha256_file

_REPORT_EVERY_BYTES = 16 << 20  # progress cadence when the server sends no Content-Length
_RETRY_STATUSES = frozenset({408, 429})  # the only 4xx worth retrying: the server asked us to come back
_MAX_RETRY_AFTER = 60.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class TransientDownloadError(Exception):
    """A failure worth retrying (5xx, 408/429, cut connection, timeout)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def download_url(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: Progress | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resumably, and verify its sha256; return ``dest``.

    Bytes go to ``<dest>.part``; an existing ``.part`` is resumed with a ``Range`` request (a
    server that answers 200 instead of 206 restarts it from zero). Transient failures (5xx, 408,
    429, connection errors, timeouts) are retried ``retries`` times with exponential backoff
    (``backoff * 2**n`` seconds); other 4xx fail at once. ``timeout`` bounds each connect and
    each read, not the whole download. ``dest`` appears, atomically, only once its sha256
    matches; on a mismatch the ``.part`` is deleted too. An existing ``dest`` whose sha256
    matches is kept without any request. With ``sha256=None`` the hash is computed and reported
    through ``progress`` as unverified.
    """
    return download_and_hash(
        url, Path(dest), sha256, retries=retries, backoff=backoff, timeout=timeout, progress=progress
    )[0]


def download_and_hash(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    progress: Progress | None,
) -> tuple[Path, str]:
    """:func:`download_url`, also returning the file's sha256 (so callers need not hash it twice)."""
    expected = normalise_sha256(sha256, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    with exclusive_lock(dest.parent / f".{dest.name}.lock"):
        if dest.exists():
            actual = sha256_file(dest)
            if expected is None:
                say(
                    progress,
                    f"{dest.name}: already downloaded; no sha256 pinned for {url}; recorded {actual}",
                )
                return dest, actual
            if actual == expected:
                say(progress, f"{dest.name}: already downloaded and verified; skipping {url}")
                return dest, actual
            say(progress, f"{dest}: sha256 {actual} is not the pinned {expected}; downloading again")
            dest.unlink()

        _download_to_part(url, part, retries=retries, backoff=backoff, timeout=timeout, progress=progress)

        actual = sha256_file(part)
        if expected is not None and actual != expected:
            part.unlink(missing_ok=True)
            raise DataSourceError(
                f"{url}: sha256 mismatch: expected {expected}, got {actual}; the download was deleted. "
                "If the file changed upstream on purpose, update the pinned sha256 in the data set's "
                f"sources config; otherwise retry later (a server or proxy served a different file), {MANUAL_FIX}"
            )
        if expected is None:
            say(progress, f"no sha256 pinned for {url}; recorded {actual}")
        else:
            say(progress, f"{dest.name}: sha256 verified")
        os.replace(part, dest)
    return dest, actual


def _download_to_part(
    url: str, part: Path, *, retries: int, backoff: float, timeout: float, progress: Progress | None
) -> None:
    attempts = max(0, retries) + 1
    last: Exception | None = None
    with requests.Session() as session:
        for attempt in range(1, attempts + 1):
            try:
                _download_attempt(session, url, part, timeout=timeout, progress=progress)
                return
            except (
                TransientDownloadError,
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                last = exc
                if attempt == attempts:
                    break
                delay = backoff * 2 ** (attempt - 1)
                if isinstance(exc, TransientDownloadError) and exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, _MAX_RETRY_AFTER))
                say(progress, f"{url}: {_reason(exc)}; retry {attempt} of {attempts - 1} in {delay:.1f} s")
                time.sleep(delay)
            except requests.RequestException as exc:  # invalid URL, too many redirects, ...
                raise DataSourceError(
                    f"{url}: cannot download ({type(exc).__name__}: {exc}); fix the url in the data set's "
                    f"sources config, {MANUAL_FIX}"
                ) from exc
    kept = part.stat().st_size if part.exists() else 0
    raise DataSourceError(
        f"{url}: download failed after {attempts} attempts (last error: {_reason(last)}); "
        f"{part} keeps the {_size(kept)} received so the next run resumes. Check the network "
        f"connection or proxy and retry, {MANUAL_FIX}"
    ) from last


def _download_attempt(
    session: requests.Session, url: str, part: Path, *, timeout: float, progress: Progress | None
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    # identity: with gzip transfer-encoding the Range offsets would not match the bytes on disk.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 416 and offset:
            total = _content_range_total(response.headers.get("Content-Range"))
            if total == offset:  # the .part was already complete; only the rename was missing
                return
            part.unlink()
            raise TransientDownloadError(f"server refused to resume at byte {offset}; restarting from zero")
        if status in _RETRY_STATUSES or status >= 500:
            raise TransientDownloadError(f"HTTP {status} {response.reason}", _retry_after(response))
        if status not in (200, 206):
            raise DataSourceError(f"{url}: HTTP {status} {response.reason}; {_http_fix(status)}")

        length = response.headers.get("Content-Length")
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise TransientDownloadError(f"server resumed at byte {start}, not {offset}; restarting from zero")
            mode = "ab"
            say(progress, f"{url}: resuming at {_size(offset)}")
        else:
            if offset:
                say(progress, f"{url}: server does not support resuming; restarting from zero")
            mode, offset = "wb", 0
        total = offset + int(length) if length and length.isdigit() else None

        written = offset
        step = max(total // 10, 1) if total else _REPORT_EVERY_BYTES
        next_report = (written // step + 1) * step
        with open(part, mode) as handle:
            try:
                for chunk in response.iter_content(chunk_size=CHUNK):
                    handle.write(chunk)
                    written += len(chunk)
                    if written >= next_report:
                        next_report = (written // step + 1) * step
                        done = (
                            f"{100 * written // total}% ({_size(written)} of {_size(total)})"
                            if total
                            else _size(written)
                        )
                        say(progress, f"downloading {url}: {done}")
            finally:
                # Keep whatever arrived, durably, so the next attempt can resume after it.
                handle.flush()
                os.fsync(handle.fileno())
        if total is not None and written < total:
            raise TransientDownloadError(f"connection closed after {_size(written)} of {_size(total)}")


def _http_fix(status: int) -> str:
    if status in (404, 410):
        return f"the file is not at that address; fix the url in the data set's sources config, {MANUAL_FIX}"
    if status in (401, 403):
        return (
            "the server refused access (it may need a login or accepted terms); "
            f"download it in a browser, {MANUAL_FIX}"
        )
    return f"the server rejected the request; check the url in the data set's sources config, {MANUAL_FIX}"


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    return int(match.group(1)) if match else None


def _content_range_total(header: str | None) -> int | None:
    match = re.match(r"bytes [^/]+/(\d+)", header or "")
    return int(match.group(1)) if match else None


def _reason(exc: Exception | None) -> str:
    if isinstance(exc, TransientDownloadError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def normalise_sha256(sha256: str | None, url: str) -> str | None:
    if sha256 is None or sha256 == "":
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.match(value):
        raise DataSourceError(
            f"{url}: pinned sha256 {sha256!r} is not 64 hex digits; copy it from `sha256sum <file>`"
        )
    return value


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"
