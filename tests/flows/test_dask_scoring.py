"""The score flow's shards on Dask (prefect-dask): the same rows whatever the number of workers,
exactly once even when a worker is killed mid-shard, and the same again with a PostgreSQL ledger."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from lung_models.data import phantoms
from lung_models.scoring.ledger import CUMULATIVE_NAME, Ledger

MODELS = ("lc25000-cnn", "chest-cnn", "mosmed-3dcnn")  # tiles, slices and a series (as slices and as a volume)


def _score(factory, folder: Path, out: Path, **kw) -> Path:
    from flows.score import score_folder

    return Path(score_folder(input_dir=str(folder), output_dir=str(out), exports_dir=str(factory["exports"]),
                             models=list(MODELS), settle_seconds=0, batch_size=4, **kw))


def _rows(out: Path) -> pd.DataFrame:
    """Every row of every night CSV of ``out``, keyed and sorted, with the probabilities parsed."""
    nights = [pd.read_csv(p, keep_default_na=False) for p in sorted(out.glob("scores-2*.csv"))]
    df = pd.concat(nights, ignore_index=True)
    assert not df.duplicated(["relative_path", "series_uid_hash", "model"]).any(), "a row was written twice"
    cumulative = pd.read_csv(out / CUMULATIVE_NAME, keep_default_na=False)
    assert len(cumulative) == len(df)
    return df.sort_values(["relative_path", "series_uid_hash", "model"]).reset_index(drop=True)


def _assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    key = ["relative_path", "series_uid_hash", "model", "file_sha256", "bundle_sha256", "status",
           "predicted_class", "n_inputs"]
    assert got[key].astype(str).values.tolist() == want[key].astype(str).values.tolist()
    for a, b in zip(got.probabilities, want.probabilities):
        pa, pb = (json.loads(a) if a else {}), (json.loads(b) if b else {})
        assert pa.keys() == pb.keys() and all(abs(pa[c] - pb[c]) <= 1e-6 for c in pa), (a, b)


@pytest.fixture(scope="module")
def night_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dask") / "in"
    phantoms.write_incoming(folder, seed=41, n_tiles=48, n_volumes=2, corrupt=True, tile_size=128, in_plane=64,
                            slices=24, n_slices=12, slice_size=128, n_dicom_series=1)
    return folder


@pytest.fixture(scope="module")
def one_worker(factory, night_folder, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("one") / "out"
    _score(factory, night_folder, out)
    return _rows(out)


def test_three_workers_give_the_rows_of_one(factory, night_folder, one_worker, tmp_path):
    assert len(one_worker) > 60 and {"ok", "rejected"} <= set(one_worker.status)
    out = tmp_path / "out"
    _score(factory, night_folder, out, workers=3)
    _assert_same_rows(_rows(out), one_worker)
    with Ledger(out) as led:
        assert led.claims() == []  # every shard ended its claims
        assert sorted(p["model"] for p in led.night_pins(_run_id(out))) == sorted(MODELS)  # what it scored with
    again = _score(factory, night_folder, out, workers=3)  # the next night: nothing new, nothing doubled
    assert pd.read_csv(again).empty


def _run_id(out: Path) -> str:
    return pd.read_csv(out / CUMULATIVE_NAME, keep_default_na=False).run_id.iloc[0]


def _ledger_rows(out: Path) -> int:
    try:
        with sqlite3.connect(f"file:{out / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("select count(*) from rows").fetchone()[0])
    except sqlite3.Error:
        return 0


def _kill_a_busy_worker(client, out: Path, total: int, deadline: float) -> int:
    """SIGKILL a worker process while it runs a shard, once some rows are committed: returns the rows
    recorded at that moment."""
    while time.time() < deadline:
        recorded = _ledger_rows(out)
        busy = [w for w, keys in client.processing().items() if keys]
        if 0 < recorded < total and busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            return recorded
        time.sleep(0.02)
    raise AssertionError(f"no worker was busy while the night was part-recorded ({_ledger_rows(out)} rows)")


def test_a_worker_killed_mid_shard_is_redone_and_nothing_is_doubled(factory, night_folder, one_worker, tmp_path,
                                                                     monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setenv("LUNG_FACTORY_COMMIT_ROWS", "4")  # commit often, so the kill lands between commits
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["csv"] = _score(factory, night_folder, out, dask_address=cluster.scheduler_address)
            except BaseException as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        at_kill = _kill_a_busy_worker(client, out, len(one_worker), time.time() + 300)
        thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert 0 < at_kill < len(one_worker)
    _assert_same_rows(_rows(out), one_worker)
    with Ledger(out) as led:
        assert led.claims() == []


def test_a_cluster_with_a_postgres_ledger_gives_the_same_rows(factory, night_folder, one_worker, tmp_path,
                                                              postgres_url):
    out = tmp_path / "out"
    _score(factory, night_folder, out, workers=2, ledger=postgres_url)
    _assert_same_rows(_rows(out), one_worker)
    assert not (out / "ledger.sqlite3").exists() and (out / ".ledger-id").exists()


def test_shards_are_dealt_round_robin_within_size_bounds():
    from lung_models.scoring import night
    from lung_models.scoring.items import Item

    items = [Item(f"f{i:03d}.png", "ct_slice", "image", (f"f{i:03d}.png",), f"{i}") for i in range(100)]
    shards = night.split_shards(items, workers=3)
    assert sorted(i.key for s in shards for i in s) == sorted(i.key for i in items)  # each item in one shard
    assert len(shards) == 12 and {len(s) for s in shards} <= {8, 9}
    assert [i.key for i in shards[0][:2]] == ["f000.png", "f012.png"]  # neighbours go to different shards
    assert len(night.split_shards(items, workers=1)) == 4
    assert len(night.split_shards(items[:5], workers=4)) == 1 and night.split_shards([], 2) == []


def test_a_shard_on_another_host_refuses_the_sqlite_ledger(tmp_path):
    from lung_models.scoring import night

    settings = night.ShardSettings(str(tmp_path), str(tmp_path / "out"), "run1", [], host="the-flows-host")
    with pytest.raises(RuntimeError, match=r"SQLite is for one host.*--ledger postgresql://"):
        night.score_shard("run1-s0000", [], settings)


def test_a_shard_whose_task_failed_is_submitted_once_more(prefect_harness, monkeypatch):
    """The flow's own second chance, for a shard Dask gave up on (its workers kept dying): the redo
    runs, and a shard failing twice is reported, not raised, so the night still publishes."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.score as score_mod
    from lung_models.scoring.items import Item

    attempts: dict[str, int] = {}

    @task
    def flaky_shard(shard_id: str, items: list, settings: dict) -> dict:
        attempts[shard_id] = attempts.get(shard_id, 0) + 1
        if shard_id.endswith("s0000") or (shard_id.endswith("s0001") and attempts[shard_id] == 1):
            raise ConnectionError("worker lost")
        return {"shard": shard_id, "host": "h", "counts": [], "skipped": []}

    monkeypatch.setattr(score_mod, "score_shard", flaky_shard)
    shares: list[tuple[float, str]] = []
    monkeypatch.setattr(score_mod, "update_progress_artifact",
                        lambda artifact, share, description: shares.append((share, description)))
    items = [Item(f"f{i:03d}.png", "ct_slice", "image", (f"f{i:03d}.png",), f"{i}").as_dict() for i in range(40)]

    @flow
    def night() -> dict:
        return score_mod.score_shards(items, {"run_id": "abcdef12-run"}, ThreadPoolTaskRunner(max_workers=1))

    result = night()
    assert attempts == {f"abcdef12-s{k:04d}": (2 if k < 2 else 1) for k in range(4)}
    assert sorted(r["shard"] for r in result["shards"]) == [f"abcdef12-s{k:04d}" for k in (1, 2, 3)]
    assert len(result["failed"]) == 1 and "s0000: ConnectionError: worker lost" in result["failed"][0]
    # The progress artifact moved as each shard ended (10 items each): three first, the failed one last.
    assert [share for share, _ in shares] == [25.0, 50.0, 75.0, 100.0]
    assert "10 in shards that failed twice" in shares[-1][1] and "failed" not in shares[0][1]
