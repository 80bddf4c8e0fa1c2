"""Tests for lung_models.data.sources: downloads against a local HTTP server, archive safety, sources.

No network: every URL points at a ThreadingHTTPServer on 127.0.0.1 that serves bytes from a dict,
honours Range requests, and can be scripted to fail (status codes, cut connections, stalls).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import sys
import tarfile
import threading
import time
import types
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lung_models.data import sources
from lung_models.data.sources import (
    MARKER_NAME,
    DataSourceError,
    GeneratedSource,
    KaggleSource,
    LocalFolderSource,
    UrlArchive,
    UrlSource,
    download_url,
    safe_extract,
    source_from_config,
)

FAST = {"retries": 3, "backoff": 0.01, "timeout": 5}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# A scriptable local HTTP server


@dataclass
class FakeServer:
    files: dict[str, bytes] = field(default_factory=dict)
    # path -> statuses to answer, one per request, before serving normally
    fail_with: dict[str, list[int]] = field(default_factory=dict)
    # path -> byte counts: send full headers, then only that many body bytes, then cut the connection
    cut_after: dict[str, list[int]] = field(default_factory=dict)
    # path -> delays (s) before answering, one per request
    stall: dict[str, list[float]] = field(default_factory=dict)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    base_url: str = ""

    def url(self, path: str) -> str:
        return self.base_url + path

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state = self.server.state
        path, range_header = self.path, self.headers.get("Range")
        with self.server.lock:
            state.requests.append((path, range_header))
            delay = state.stall[path].pop(0) if state.stall.get(path) else 0.0
            fail = state.fail_with[path].pop(0) if state.fail_with.get(path) else None
            cut = state.cut_after[path].pop(0) if state.cut_after.get(path) else None
        if delay:
            time.sleep(delay)
        if fail is not None:
            self.send_error(fail)
            return
        if path not in state.files:
            self.send_error(404)
            return
        body = state.files[path]
        start = 0
        if range_header and not state.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: FakeServer
    lock: threading.Lock

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # broken pipes after deliberate cuts and client timeouts are expected


@pytest.fixture
def server() -> Iterator[FakeServer]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.state = FakeServer(base_url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.lock = threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# download_url


def test_download_verifies_sha256_and_leaves_no_part(server: FakeServer, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    server.files["/a.bin"] = data
    lines: list[str] = []
    dest = download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), progress=lines.append, **FAST)
    assert dest == tmp_path / "a.bin"
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert any("%" in line for line in lines), lines  # progress was reported along the way


def test_existing_verified_file_is_not_downloaded_again(server: FakeServer, tmp_path: Path) -> None:
    data = b"x" * 1000
    server.files["/a.bin"] = data
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), **FAST)
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), **FAST)
    assert server.count("/a.bin") == 1


def test_existing_file_with_wrong_hash_is_replaced(server: FakeServer, tmp_path: Path) -> None:
    data = b"good" * 100
    server.files["/a.bin"] = data
    (tmp_path / "a.bin").write_bytes(b"stale")
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data


def test_retries_after_503_then_succeeds(server: FakeServer, tmp_path: Path) -> None:
    data = os.urandom(5000)
    server.files["/a.bin"] = data
    server.fail_with["/a.bin"] = [503, 503]
    lines: list[str] = []
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), progress=lines.append, **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert server.count("/a.bin") == 3
    assert sum("retry" in line for line in lines) == 2


def test_429_is_retried(server: FakeServer, tmp_path: Path) -> None:
    server.files["/a.bin"] = b"ok"
    server.fail_with["/a.bin"] = [429]
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(b"ok"), **FAST)
    assert server.count("/a.bin") == 2


def test_gives_up_after_retries_with_clear_message(server: FakeServer, tmp_path: Path) -> None:
    server.files["/a.bin"] = b"never"
    server.fail_with["/a.bin"] = [500] * 10
    with pytest.raises(DataSourceError) as err:
        download_url(server.url("/a.bin"), tmp_path / "a.bin", None, retries=2, backoff=0.01, timeout=5)
    assert server.count("/a.bin") == 3
    message = str(err.value)
    assert server.url("/a.bin") in message and "3 attempts" in message and "HTTP 500" in message
    assert not (tmp_path / "a.bin").exists()


def test_timeout_is_retried(server: FakeServer, tmp_path: Path) -> None:
    server.files["/a.bin"] = b"slow"
    server.stall["/a.bin"] = [1.0]
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(b"slow"), retries=2, backoff=0.01, timeout=0.3)
    assert (tmp_path / "a.bin").read_bytes() == b"slow"
    assert server.count("/a.bin") == 2


def test_interrupted_download_resumes_with_range(server: FakeServer, tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    server.files["/big.bin"] = data
    server.cut_after["/big.bin"] = [500_000]
    download_url(server.url("/big.bin"), tmp_path / "big.bin", sha(data), **FAST)
    assert (tmp_path / "big.bin").read_bytes() == data
    ranges = [r for p, r in server.requests if p == "/big.bin"]
    assert ranges[0] is None
    assert len(ranges) == 2 and ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 500_000


def test_existing_part_is_resumed(server: FakeServer, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    server.files["/a.bin"] = data
    (tmp_path / "a.bin.part").write_bytes(data[:20_000])
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), **FAST)
    assert server.requests == [("/a.bin", "bytes=20000-")]
    assert (tmp_path / "a.bin").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server: FakeServer, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    server.files["/a.bin"] = data
    server.ignore_range = True
    (tmp_path / "a.bin.part").write_bytes(b"garbage that must not stay in front")
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), **FAST)
    assert server.requests[0][1] is not None  # a Range was asked for, and answered with 200
    assert (tmp_path / "a.bin").read_bytes() == data


def test_complete_part_answered_416_is_kept(server: FakeServer, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    server.files["/a.bin"] = data
    (tmp_path / "a.bin.part").write_bytes(data)  # an earlier run died between download and rename
    download_url(server.url("/a.bin"), tmp_path / "a.bin", sha(data), **FAST)
    assert server.count("/a.bin") == 1
    assert (tmp_path / "a.bin").read_bytes() == data


def test_checksum_mismatch_raises_and_leaves_nothing(server: FakeServer, tmp_path: Path) -> None:
    data = b"tampered" * 1000
    server.files["/a.bin"] = data
    wrong = "0" * 64
    with pytest.raises(DataSourceError) as err:
        download_url(server.url("/a.bin"), tmp_path / "a.bin", wrong, **FAST)
    message = str(err.value)
    assert server.url("/a.bin") in message
    assert wrong in message and sha(data) in message
    assert "sha256" in message
    assert not (tmp_path / "a.bin").exists()
    assert not (tmp_path / "a.bin.part").exists()


def test_404_fails_fast_with_clear_message(server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(DataSourceError) as err:
        download_url(server.url("/missing.zip"), tmp_path / "missing.zip", None, retries=4, backoff=5)
    assert server.count("/missing.zip") == 1  # no retries (backoff=5 would also make this slow)
    message = str(err.value)
    assert server.url("/missing.zip") in message and "404" in message and "--data-dir" in message
    assert not (tmp_path / "missing.zip").exists()


def test_unpinned_download_reports_recorded_hash(server: FakeServer, tmp_path: Path) -> None:
    data = b"unpinned"
    server.files["/u.bin"] = data
    lines: list[str] = []
    download_url(server.url("/u.bin"), tmp_path / "u.bin", None, progress=lines.append, **FAST)
    assert f"no sha256 pinned for {server.url('/u.bin')}; recorded {sha(data)}" in lines


def test_malformed_pinned_sha256_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="64 hex"):
        download_url("http://127.0.0.1:9/x", tmp_path / "x", "abc")


# --------------------------------------------------------------------------------------------
# safe_extract


def test_zip_extracts(tmp_path: Path) -> None:
    archive = tmp_path / "good.zip"
    archive.write_bytes(make_zip({"set/lung_aca/a.jpeg": b"A", "set/lung_n/b.jpeg": b"B"}))
    target = tmp_path / "out"
    written = safe_extract(archive, target)
    assert sorted(written) == [target / "set/lung_aca/a.jpeg", target / "set/lung_n/b.jpeg"]
    assert (target / "set/lung_n/b.jpeg").read_bytes() == b"B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.zip", "out"]  # no temp folder left


def test_tar_gz_extracts_detected_by_content(tmp_path: Path) -> None:
    archive = tmp_path / "data.bin"  # the name says nothing: detection is by content
    archive.write_bytes(make_tar([("CT-0/study_0001.nii.gz", b"nifti"), ("CT-23/study_0940.nii.gz", b"x")]))
    target = tmp_path / "out"
    safe_extract(archive, target)
    assert (target / "CT-0/study_0001.nii.gz").read_bytes() == b"nifti"
    assert (target / "CT-23/study_0940.nii.gz").read_bytes() == b"x"


def test_extract_merges_into_existing_target(tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(make_zip({"CT-0/one.nii": b"1"}))
    (tmp_path / "b.tar").write_bytes(make_tar([("CT-23/two.nii", b"2")], mode="w"))
    target = tmp_path / "out"
    safe_extract(tmp_path / "a.zip", target)
    safe_extract(tmp_path / "b.tar", target)
    assert (target / "CT-0/one.nii").read_bytes() == b"1"
    assert (target / "CT-23/two.nii").read_bytes() == b"2"


def _assert_refused(archive: Path, target: Path, *words: str) -> None:
    before = sorted(p.relative_to(archive.parent) for p in archive.parent.rglob("*"))
    with pytest.raises(DataSourceError) as err:
        safe_extract(archive, target)
    message = str(err.value)
    assert str(archive) in message
    message = message.replace(str(archive), "")  # tmp_path holds the test's name, which could match a word
    for word in words:
        assert word in message, message
    after = sorted(p.relative_to(archive.parent) for p in archive.parent.rglob("*"))
    assert after == before  # nothing written anywhere: not in target, not beside it, no temp folder


def test_zip_with_parent_traversal_is_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "evil.zip"
    archive.write_bytes(make_zip({"ok.txt": b"fine", "../evil.txt": b"pwned"}))
    _assert_refused(archive, work / "out", "../evil.txt", "..")
    assert not (tmp_path / "evil.txt").exists()


def test_zip_with_absolute_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "abs.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(zipfile.ZipInfo("/tmp/abs.txt"), b"x")
    archive.write_bytes(buffer.getvalue())
    assert zipfile.ZipFile(archive).namelist() == ["/tmp/abs.txt"]  # the test really holds the attack
    _assert_refused(archive, tmp_path / "out", "/tmp/abs.txt", "absolute")


def test_tar_with_absolute_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "abs.tar.gz"
    archive.write_bytes(make_tar([("fine.txt", b"ok"), ("/etc/evil.txt", b"x")]))
    _assert_refused(archive, tmp_path / "out", "/etc/evil.txt", "absolute")


def test_tar_with_parent_traversal_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "dots.tgz"
    archive.write_bytes(make_tar([("a/../../escape.txt", b"x")]))
    _assert_refused(archive, tmp_path / "out", "escape.txt")


def test_tar_with_symlink_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("data/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = tmp_path / "sym.tar.gz"
    archive.write_bytes(make_tar([("data/a.txt", b"a"), link]))
    _assert_refused(archive, tmp_path / "out", "data/link", "symlink")


def test_tar_with_hardlink_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("data/hard")
    link.type = tarfile.LNKTYPE
    link.linkname = "data/a.txt"
    archive = tmp_path / "hard.tar"
    archive.write_bytes(make_tar([("data/a.txt", b"a"), link], mode="w"))
    _assert_refused(archive, tmp_path / "out", "data/hard", "hardlink")


def test_tar_with_device_is_refused(tmp_path: Path) -> None:
    device = tarfile.TarInfo("dev/null")
    device.type = tarfile.CHRTYPE
    archive = tmp_path / "dev.tar"
    archive.write_bytes(make_tar([device], mode="w"))
    _assert_refused(archive, tmp_path / "out", "dev/null", "device")


def test_zip_with_symlink_entry_is_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("data/link")
    info.create_system = 3  # Unix, so external_attr carries a file mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("data/a.txt", b"a")
        zf.writestr(info, "/etc/passwd")
    archive = tmp_path / "sym.zip"
    archive.write_bytes(buffer.getvalue())
    _assert_refused(archive, tmp_path / "out", "data/link", "symlink")


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "page.zip"
    archive.write_bytes(b"<html>Please log in</html>")
    _assert_refused(archive, tmp_path / "out", "not a zip or tar")


def test_corrupt_zip_member_is_reported(tmp_path: Path) -> None:
    data = bytearray(make_zip({"a.txt": b"A" * 1000}))
    data[data.index(b"A" * 100)] ^= 0xFF  # damage the stored bytes; the CRC check must notice
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DataSourceError, match="corrupt"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# UrlSource


def test_url_source_end_to_end_and_second_fetch_is_noop(server: FakeServer, tmp_path: Path) -> None:
    zip_bytes = make_zip(
        {"lung_colon_image_set/lung_aca/a.jpeg": b"A", "lung_colon_image_set/lung_n/b.jpeg": b"B"}
    )
    server.files["/lc25000.zip"] = zip_bytes
    source = source_from_config(
        "url", {"archives": [{"url": server.url("/lc25000.zip"), "sha256": sha(zip_bytes)}], **FAST}
    )
    cache = tmp_path / "cache"
    root = source.fetch(cache)
    assert root.parent == cache
    assert (root / "lung_colon_image_set/lung_aca/a.jpeg").read_bytes() == b"A"
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["provenance"]["archives"][0]["sha256"] == sha(zip_bytes)
    assert list((cache / "downloads").glob("*lc25000.zip"))
    assert server.count("/lc25000.zip") == 1

    # A fresh object (as in a new process) trusts the marker on disk and downloads nothing.
    again = source_from_config(
        "url", {"archives": [{"url": server.url("/lc25000.zip"), "sha256": sha(zip_bytes)}]}
    )
    assert again.fetch(cache) == root
    assert server.count("/lc25000.zip") == 1
    json.dumps(again.provenance())  # JSON-able


def test_url_source_merges_archives_and_records_unpinned_hashes(server: FakeServer, tmp_path: Path) -> None:
    first, second = make_zip({"CT-0/a.nii": b"0"}), make_tar([("CT-23/b.nii", b"23")])
    server.files["/CT-0.zip"], server.files["/CT-23.tar.gz"] = first, second
    source = UrlSource(
        archives=[UrlArchive(server.url("/CT-0.zip")), UrlArchive(server.url("/CT-23.tar.gz"))], **FAST
    )
    assert all(a["sha256"] is None for a in source.provenance()["archives"])
    root = source.fetch(tmp_path)
    assert (root / "CT-0/a.nii").read_bytes() == b"0" and (root / "CT-23/b.nii").read_bytes() == b"23"
    recorded = {a["url"]: a["sha256"] for a in source.provenance()["archives"]}
    assert recorded == {server.url("/CT-0.zip"): sha(first), server.url("/CT-23.tar.gz"): sha(second)}

    fresh = UrlSource(archives=[UrlArchive(server.url("/CT-0.zip")), UrlArchive(server.url("/CT-23.tar.gz"))])
    fresh.fetch(tmp_path)
    assert {a["url"]: a["sha256"] for a in fresh.provenance()["archives"]} == recorded
    assert len(server.requests) == 2


def test_url_source_with_unsafe_archive_leaves_no_root(server: FakeServer, tmp_path: Path) -> None:
    server.files["/evil.zip"] = make_zip({"../evil.txt": b"x"})
    source = UrlSource(archives=[UrlArchive(server.url("/evil.zip"))], name="evil", **FAST)
    with pytest.raises(DataSourceError, match="evil.txt"):
        source.fetch(tmp_path)
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not list(tmp_path.glob(".evil.staging-*"))


def test_url_source_rebuilds_root_without_marker(server: FakeServer, tmp_path: Path) -> None:
    server.files["/d.zip"] = make_zip({"x/a.txt": b"a"})
    source = UrlSource(archives=[UrlArchive(server.url("/d.zip"))], name="d", **FAST)
    root = source.fetch(tmp_path)
    (root / MARKER_NAME).unlink()  # as if the run died after the rename, before the marker
    (root / "half-written.tmp").write_bytes(b"junk")
    assert source.fetch(tmp_path) == root
    assert (root / MARKER_NAME).exists() and not (root / "half-written.tmp").exists()
    assert server.count("/d.zip") == 1  # the verified download was reused; only extraction redone


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(DataSourceError, match="sha265"):
        source_from_config("url", {"archives": [{"url": "https://example.org/a.zip", "sha265": "0" * 64}]})
    with pytest.raises(DataSourceError, match="unknown source kind 'ftp'"):
        source_from_config("ftp", {})
    with pytest.raises(DataSourceError, match="'slug'"):
        source_from_config("kaggle", {})
    with pytest.raises(DataSourceError, match="http"):
        source_from_config("url", {"url": "ftp://example.org/a.zip"})


# --------------------------------------------------------------------------------------------
# LocalFolderSource


def test_local_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataSourceError) as err:
        LocalFolderSource(missing).fetch(tmp_path / "cache")
    assert str(missing) in str(err.value) and "--data-dir" in str(err.value)


def test_local_folder_is_used_in_place(tmp_path: Path) -> None:
    data = tmp_path / "mine"
    (data / "lung_n").mkdir(parents=True)
    (data / "lung_n/a.jpeg").write_bytes(b"a")
    source = source_from_config("local", {"path": str(data)})
    assert source.fetch(tmp_path / "cache") == data
    assert not (tmp_path / "cache").exists()  # nothing copied
    assert source.provenance()["files"] == 1


# --------------------------------------------------------------------------------------------
# KaggleSource


def test_kaggle_failure_says_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kagglehub

    def fail(*args: object, **kwargs: object) -> str:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(kagglehub, "dataset_download", fail)
    with pytest.raises(DataSourceError) as err:
        KaggleSource("andrewmvd/lung-and-colon-cancer-histopathological-images").fetch(tmp_path)
    message = str(err.value)
    for needle in ("KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle-credentials", "--data-dir", "no route to host"):
        assert needle in message, needle


def test_kaggle_success_is_cached_and_hides_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kagglehub

    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    downloaded = tmp_path / "kagglehub-out"
    calls: list[tuple[str, dict[str, str | None]]] = []

    def fake(slug: str, **kwargs: object) -> str:
        calls.append((slug, {k: os.environ.get(k) for k in ("KAGGLE_USERNAME", "KAGGLE_KEY")}))
        (downloaded / "lung_image_sets/lung_n").mkdir(parents=True, exist_ok=True)
        (downloaded / "lung_image_sets/lung_n/a.jpeg").write_bytes(b"a")
        return str(downloaded)

    monkeypatch.setattr(kagglehub, "dataset_download", fake)
    source = KaggleSource("owner/lc25000", credentials={"username": "alice", "key": "s3cret"})
    assert source.fetch(tmp_path / "cache") == downloaded
    assert calls == [("owner/lc25000", {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "s3cret"})]
    assert "KAGGLE_KEY" not in os.environ  # credentials were only set for the call

    assert KaggleSource("owner/lc25000").fetch(tmp_path / "cache") == downloaded
    assert len(calls) == 1  # the marker made the second fetch a no-op

    provenance = source.provenance()
    assert provenance["slug"] == "owner/lc25000" and provenance["files"] == 1
    assert "s3cret" not in json.dumps(provenance) and "s3cret" not in repr(source)


def test_kaggle_interrupted_output_dir_is_forced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kagglehub

    forced: list[bool] = []

    def fake(slug: str, *, output_dir: str, force_download: bool = False) -> str:
        forced.append(force_download)
        if not force_download:  # what kagglehub does when an earlier download left files behind
            raise FileExistsError(f"output_dir is not empty: {output_dir}")
        Path(output_dir, "a.csv").parent.mkdir(parents=True, exist_ok=True)
        Path(output_dir, "a.csv").write_text("x")
        return output_dir

    monkeypatch.setattr(kagglehub, "dataset_download", fake)
    root = KaggleSource("owner/mosmed").fetch(tmp_path)
    assert forced == [False, True]
    assert root == tmp_path / "kaggle-owner-mosmed" and (root / MARKER_NAME).exists()


# --------------------------------------------------------------------------------------------
# GeneratedSource


def install_fake_phantoms(monkeypatch: pytest.MonkeyPatch, write_dataset: Callable[..., None]) -> types.ModuleType:
    """Put a stand-in lung_models.data.phantoms with this ``write_dataset`` (and the real module's
    other names that sources use) in sys.modules for the test."""
    module = types.ModuleType("lung_models.data.phantoms")
    module.write_dataset = write_dataset  # type: ignore[attr-defined]
    module.GENERATOR_VERSIONS = {"lc25000": 1, "mosmed": 1}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lung_models.data.phantoms", module)
    return module


@pytest.fixture
def fake_phantoms(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Stand-in for lung_models.data.phantoms, so these tests do not depend on the real generator."""
    calls: list[tuple] = []

    def write_dataset(kind: str, root: Path, n_per_class: int, seed: int, **params: object) -> None:
        calls.append((kind, n_per_class, seed, params))
        if params.get("explode"):
            (root / "partial.png").write_bytes(b"half")
            raise RuntimeError("generator crashed")
        for name in ("lung_n", "lung_aca"):
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                (root / name / f"{i}.png").write_bytes(b"png")

    install_fake_phantoms(monkeypatch, write_dataset)
    return calls


def test_generated_source_is_idempotent(fake_phantoms: list[tuple], tmp_path: Path) -> None:
    source = source_from_config("generated", {"kind": "lc25000", "n_per_class": 3, "seed": 7, "size": 64})
    assert isinstance(source, GeneratedSource) and source.params == {"size": 64}
    root = source.fetch(tmp_path)
    assert root.name.startswith("generated-lc25000-3-7-")
    assert len(list((root / "lung_n").iterdir())) == 3
    assert GeneratedSource("lc25000", 3, 7, {"size": 64}).fetch(tmp_path) == root
    assert fake_phantoms == [("lc25000", 3, 7, {"size": 64})]

    other = GeneratedSource("lc25000", 3, 7, {"size": 32}).fetch(tmp_path)
    assert other != root and len(fake_phantoms) == 2  # other params, other folder
    assert json.loads((root / MARKER_NAME).read_text())["provenance"]["seed"] == 7


def test_generated_source_is_rebuilt_when_the_generator_changes(fake_phantoms: list[tuple], tmp_path: Path) -> None:
    root = GeneratedSource("lc25000", 3, 7, {"size": 64}).fetch(tmp_path)
    assert json.loads((root / MARKER_NAME).read_text())["provenance"]["generator_version"] == 1
    sys.modules["lung_models.data.phantoms"].GENERATOR_VERSIONS["lc25000"] = 2  # new pictures, same seed
    again = GeneratedSource("lc25000", 3, 7, {"size": 64}).fetch(tmp_path)
    assert again == root and len(fake_phantoms) == 2  # regenerated in place, not reused
    assert json.loads((root / MARKER_NAME).read_text())["provenance"]["generator_version"] == 2
    assert GeneratedSource("lc25000", 3, 7, {"size": 64}).fetch(tmp_path) == root and len(fake_phantoms) == 2


def test_generated_source_crash_leaves_nothing_trusted(fake_phantoms: list[tuple], tmp_path: Path) -> None:
    source = GeneratedSource("mosmed", 2, 0, {"explode": True})
    with pytest.raises(RuntimeError, match="generator crashed"):
        source.fetch(tmp_path)
    assert not (tmp_path / source.folder_name).exists()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the staging folder was removed
    with pytest.raises(RuntimeError):
        source.fetch(tmp_path)
    assert len(fake_phantoms) == 2  # a failed build is retried, never trusted


def test_sources_module_has_no_prefect_import() -> None:
    modules = sorted(Path(sources.__file__).parent.glob("*.py"))
    assert len(modules) > 1  # the package's modules, not only its __init__
    for module in modules:
        text = module.read_text()
        assert "import prefect" not in text and "from prefect" not in text, module.name


def test_concurrent_fetches_generate_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []

    def slow_write(kind: str, root: Path, n_per_class: int, seed: int, **params: object) -> None:
        calls.append(seed)
        time.sleep(0.2)  # long enough for the second thread to arrive while the first is building
        (root / "lung_n").mkdir()
        (root / "lung_n/0.png").write_bytes(b"png")

    install_fake_phantoms(monkeypatch, slow_write)
    roots: list[Path] = []
    threads = [
        threading.Thread(target=lambda: roots.append(GeneratedSource("lc25000", 1, 3).fetch(tmp_path)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(roots) == 2 and roots[0] == roots[1]
    assert calls == [3]
