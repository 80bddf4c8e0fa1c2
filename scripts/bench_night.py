"""The nightly scorer at scale: a benchmark, not a CI test. Every figure below is measured in this one run,
so the ratios compare like with like on a noisy machine. Needs exported bundles (``lung-factory demo``, or
``lung-factory train --profile demo --epochs 1`` for bundles of the real sizes quickly).

    .venv/bin/python scripts/bench_night.py                        # everything (about 15 minutes on 2 cores)
    .venv/bin/python scripts/bench_night.py --only raw tf          # some sections: raw tf night flow rss

Sections:
  raw    ONNX Runtime throughput per model on in-memory batches (random inputs of the model's shape);
  tf     the same model's best TensorFlow path (Keras predict, tf.function, tf.function with XLA) beside it;
  night  end-to-end night throughput over a generated folder mixing slices, tiles, NIfTI volumes and DICOM
         series, against the raw inference time those (scan, model) pairs need (goal: ratio >= 0.8);
  flow   the Prefect flow against the bare scoring function (night.run_night) on 1,000 slices (goal <= 1.1x),
         with the CLI's temporary API (new and used PREFECT_HOME) and against a running server;
  rss    peak resident memory of scoring 1,000 and 10,000 slices with one model, each in a fresh process
         (goal: 10,000 <= 1.2x of 1,000);
  workers decoding and preparing the night folder's scans for every model in a pool of threads against a
         pool of processes of the same size (the arrays travel back to the parent, as the scorer needs them);
  volume a 512x512x120 int16 .nii.gz: the bare read of its voxels against the scorer's whole decode
         (read, HU, check, reorient) plus the 3-D model's preprocessing (goal: <= 1.3x the bare read);
  arena  per model, the scorer's sessions (one CPU arena shared by the process) against sessions with an
         arena of their own, alternating on the same batch in this one process;
  explain heat maps (--explain): per bundle, one flagged scan's heat map (Keras pass under a gradient tape,
         picture, PNG) against scoring one input with ONNX Runtime, and what a night of 10,000 inputs with
         10 % flagged would spend on each; then per model at its documented input size (random weights: the
         cost does not depend on them) a heat map against a traced Keras forward pass of one input, with
         SmoothGrad (what an opaque TF-Hub module gets) beside Grad-CAM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
SECTIONS = ("raw", "tf", "night", "flow", "rss", "arena", "workers", "volume", "explain")


def _bundles(exports: str, names: list[str] | None = None):
    from lung_models.bundle import latest_bundles

    # Speed, not accuracy: a bundle that did not pass its promotion gate measures the same.
    bundles = latest_bundles(exports, names, include_unpromoted=True)
    if not bundles:
        sys.exit(f"no bundles under {exports}: run `lung-factory demo` (or train) first")
    return bundles


def _input_shape(bundle) -> tuple[int, ...]:
    params = bundle.preprocessing
    if params["kind"] == "ct_volume":
        return (*params["target_shape"], 1)
    return (*params["size"], 3)


def _rate(fn, n_items: int, min_seconds: float = 3.0, warmup: int = 1) -> float:
    """Items per second of ``fn`` (which handles ``n_items``), repeated for at least ``min_seconds``."""
    for _ in range(warmup):
        fn()
    runs, started = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and runs >= 3:
            return runs * n_items / elapsed


def _batch(bundle, size: int):
    import numpy as np

    from lung_models import preprocess

    rng = np.random.default_rng(0)
    shape = _input_shape(bundle)
    if bundle.preprocessing["kind"] == "ct_volume":
        return rng.random((size, *shape), dtype=np.float32)
    return preprocess.batch_stage(rng.integers(0, 256, (size, *shape), dtype=np.uint8), bundle.preprocessing)


def raw_rates(bundles, batch_size: int) -> dict[str, float]:
    from lung_models.scoring.pipeline import VOLUME_BATCH
    from lung_models.scoring.runtime import open_model, predict

    rates = {}
    for name, bundle in bundles.items():
        size = min(batch_size, VOLUME_BATCH) if bundle.preprocessing["kind"] == "ct_volume" else batch_size
        model, x = open_model(bundle), _batch(bundle, size)
        rates[name] = _rate(lambda m=model, v=x: predict(m, v), size)
        print(f"raw    {name:26s} ORT {model.provider:22s} batch {size}: {rates[name]:7.1f} inputs/s", flush=True)
    return rates


def _decode_for_models(item, root: Path, preps: list[dict]) -> list:
    """What one decoding worker does for one scan: decode once, prepare once per signature."""
    from lung_models.scoring import decode

    try:
        decoded = decode.decode(item, root)
        return [decode.prepare(decoded, p) for p in preps]
    except Exception as exc:  # noqa: BLE001 - a scan no model can take: its message only
        return [str(exc)]


def workers_compare(bundles, work: Path, workers: int | None) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from lung_models.scoring import discover
    from lung_models.scoring.items import takes
    from lung_models.scoring.pipeline import default_workers

    folder = work / "night-in"
    if not folder.exists():
        write_night_folder(folder)
    n = workers or default_workers()
    jobs = [(i, [b.preprocessing for b in bundles.values() if takes(b.modality, i)]) for i in discover(folder).items]
    results = {}
    for kind in ("thread", "process"):
        started = time.perf_counter()
        pool = (ThreadPoolExecutor(n) if kind == "thread"
                else ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")))
        with pool:
            list(pool.map(_decode_for_models, *zip(*[(i, folder, p) for i, p in jobs])))  # warm-up: worker start
            ready = time.perf_counter()
            for _ in range(2):
                out = list(pool.map(_decode_for_models, *zip(*[(i, folder, p) for i, p in jobs])))
            results[kind] = (time.perf_counter() - ready) / 2
        print(f"workers {n} {kind} worker(s): {len(jobs)} scans decoded and prepared for {len(bundles)} models in "
              f"{results[kind]:.2f} s ({ready - started:.1f} s for the first pass, start-up "
              f"included); {sum(isinstance(x, str) for o in out for x in o)} refused", flush=True)
    print(f"workers processes take {results['process'] / results['thread']:.2f}x the time of threads", flush=True)


def volume_read(bundles, work: Path) -> None:
    import nibabel as nib
    import numpy as np

    from lung_models.scoring import decode, discover

    volume_bundles = [b for b in bundles.values() if b.preprocessing["kind"] == "ct_volume"]
    if not volume_bundles:
        print("volume no 3-D bundle: skipped")
        return
    folder = work / "volume-in"
    path = folder / "ct_512x512x120.nii.gz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        data = (rng.normal(-600, 300, (512, 512, 120)).clip(-1024, 1500)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1.0])), str(path))
    item = discover(folder).items[0]
    params = volume_bundles[0].preprocessing
    bare, full = [], []
    for _ in range(3):  # alternating, so both see the same machine
        started = time.perf_counter()
        np.asanyarray(nib.load(str(path)).dataobj)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        decode.prepare(decode.decode(item, folder), params)
        full.append(time.perf_counter() - started)
    b, f = min(bare), min(full)
    print(f"volume 512x512x120 int16 .nii.gz: bare read {b:.2f} s, decode + 3-D preprocessing {f:.2f} s: "
          f"ratio {f / b:.2f} (goal <= 1.3)", flush=True)


def arena_rates(bundles, batch_size: int) -> None:
    import onnxruntime as ort

    from lung_models.scoring.pipeline import VOLUME_BATCH
    from lung_models.scoring.runtime import open_session, session_options

    for name, bundle in bundles.items():
        size = min(batch_size, VOLUME_BATCH) if bundle.preprocessing["kind"] == "ct_volume" else batch_size
        x = _batch(bundle, size)
        own = session_options()
        own.add_session_config_entry("session.use_env_allocators", "0")
        sessions = {"shared": open_session(bundle.onnx_path),
                    "own": ort.InferenceSession(str(bundle.onnx_path), sess_options=own,
                                                providers=["CPUExecutionProvider"])}
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        seconds = dict.fromkeys(sessions, 0.0)
        for k, s in sessions.items():
            s.run(None, feeds[k])  # warm-up
        for _ in range(5):
            for k, s in sessions.items():
                started = time.perf_counter()
                s.run(None, feeds[k])
                seconds[k] += time.perf_counter() - started
        print(f"arena  {name:26s} shared arena {5 * size / seconds['shared']:7.1f} inputs/s, own arena "
              f"{5 * size / seconds['own']:7.1f}: shared/own {seconds['own'] / seconds['shared']:.2f}", flush=True)


def tf_rates(bundles, batch_size: int, ort: dict[str, float]) -> None:
    import keras
    import tensorflow as tf

    from lung_models.scoring.pipeline import VOLUME_BATCH
    from lung_models.training import load_checkpoint

    for name, bundle in bundles.items():
        path = bundle.path / "model.keras"
        if not path.is_file():
            print(f"tf     {name:26s} no model.keras in the bundle: skipped")
            continue
        try:
            model = load_checkpoint(path)  # registers the project's custom model classes first
        except Exception as exc:  # noqa: BLE001 - a model that does not load here is reported, not fatal
            print(f"tf     {name:26s} does not load in this process ({type(exc).__name__}): skipped")
            continue
        size = min(batch_size, VOLUME_BATCH) if bundle.preprocessing["kind"] == "ct_volume" else batch_size
        found = _tf_paths(model, tf.constant(_batch(bundle, size)), size)
        best = max(found, key=found.get)
        print(f"tf     {name:26s} " + ", ".join(f"{k} {v:6.1f}" for k, v in found.items())
              + f" inputs/s; ORT / best TF ({best}) = {ort[name] / found[best]:.2f}", flush=True)
        del model
        keras.backend.clear_session()


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: tracing, first allocations
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def explain_costs(bundles, rates: dict[str, float], work: Path, night_inputs: int = 10_000,
                  flagged_share: float = 0.1) -> None:
    import inspect

    import keras
    import numpy as np
    import tensorflow as tf

    from lung_models import explain, registry

    explainer = explain.Explainer(work / "explain-out")
    for name, bundle in bundles.items():
        x = _batch(bundle, 1)
        probs = np.full((1, len(bundle.class_names)), 1.0 / len(bundle.class_names), np.float32)
        started = time.perf_counter()
        try:
            explain.keras_model(bundle)
        except Exception as exc:  # noqa: BLE001 - reported, the other bundles still measured
            print(f"explain {name:26s} no Keras model ({type(exc).__name__}: {exc}): skipped", flush=True)
            continue
        loaded = time.perf_counter() - started
        one = _best_seconds(lambda b=bundle, v=x, p=probs: explainer.explain(b, f"bench/{b.name}", "0" * 64, v, p, 1))
        scoring, heat = night_inputs / rates[name], night_inputs * flagged_share * one
        print(f"explain {name:26s} input {'x'.join(map(str, _input_shape(bundle)))}: model load {loaded:.1f} s once, "
              f"one heat map {one:.3f} s = scoring {one * rates[name]:.0f} inputs with ORT; a night of "
              f"{night_inputs:,} inputs, {flagged_share:.0%} flagged: scoring {scoring / 60:.1f} min, heat maps "
              f"{heat / 60:.1f} min ({heat / scoring:.2f}x)",
              flush=True)
    explain.forget_models([])
    keras.backend.clear_session()
    registry.load_all()
    for name in bundles:
        entry = registry.get(name)
        shape = tuple(entry.spec.input_shape)
        if name == "chest-ensemble":  # its submodels' heat map: the first one's (see explain._target)
            continue
        options = {"weights": "random"} if "weights" in inspect.signature(entry.build).parameters else {}
        model = entry.build(entry.spec, input_shape=shape, **options)
        x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
        traced = tf.function(lambda v, m=model: m(v, training=False))  # a graph, as the heat maps' functions are
        forward = _best_seconds(lambda f=traced, v=x: f(v).numpy())
        cam = _best_seconds(lambda m=model, v=x: explain.heat_map(m, v, 1))
        smooth = _best_seconds(lambda m=model, v=x: explain.smooth_grad(m, v, 1), repeats=1)
        print(f"explain {name:26s} documented input {'x'.join(map(str, shape))}: forward pass {forward:.3f} s, "
              f"Grad-CAM {cam:.2f} s ({cam / forward:.1f}x), SmoothGrad {smooth:.2f} s ({smooth / forward:.1f}x)",
              flush=True)
        del model
        keras.backend.clear_session()


def _tf_paths(model, x, size: int) -> dict[str, float]:
    import tensorflow as tf

    plain = tf.function(lambda v: model(v, training=False))
    xla = tf.function(lambda v: model(v, training=False), jit_compile=True)
    found = {"predict": _rate(lambda: model.predict(x, verbose=0), size),
             "tf.function": _rate(lambda: plain(x).numpy(), size)}
    try:
        found["xla"] = _rate(lambda: xla(x).numpy(), size)
    except Exception:  # noqa: BLE001 - XLA cannot compile every graph on every CPU
        pass
    return found


def write_night_folder(folder: Path, seed: int = 0, n_slices: int = 40, n_tiles: int = 40, n_volumes: int = 3,
                       n_series: int = 2) -> None:
    from lung_models.data import phantoms

    phantoms.write_incoming(folder, seed=seed, n_tiles=n_tiles, n_volumes=n_volumes, corrupt=False,
                            tile_size=768, in_plane=256, slices=48, n_slices=n_slices, slice_size=512,
                            n_dicom_series=n_series)


def night(bundles, rates: dict[str, float], work: Path, workers: int | None) -> None:
    from lung_models.scoring import discover
    from lung_models.scoring import night as night_mod
    from lung_models.scoring.items import takes

    folder = work / "night-in"
    if not folder.exists():
        write_night_folder(folder)
    items = discover(folder).items
    # The raw inference time these (scan, model) pairs need: the scan's inputs (its slices for a 2-D CT
    # model, one volume for the 3-D one) at the model's raw rate.
    needed, pairs = 0.0, 0
    for bundle in bundles.values():
        for item in items:
            if takes(bundle.modality, item):
                pairs += 1
                needed += _n_inputs(item, folder, bundle) / rates[bundle.name]
    out = work / f"night-out-{time.time_ns()}"
    started = time.perf_counter()
    csv = night_mod.run_night(folder, out, exports_dir=_exports(bundles), workers=workers, include_unpromoted=True)
    seconds = time.perf_counter() - started
    import pandas as pd

    df = pd.read_csv(csv, keep_default_na=False)
    assert len(df) == pairs and set(df.status) == {"ok"}, df[df.status != "ok"][["relative_path", "error"]]
    print(f"night  {len(items)} scans ({pairs} scan-model rows) in {seconds:.1f} s end to end; raw inference "
          f"alone needs {needed:.1f} s: ratio {needed / seconds:.2f} (goal >= 0.8)", flush=True)


def _n_inputs(item, folder: Path, bundle) -> int:
    if bundle.preprocessing["kind"] == "ct_volume" or item.input_kind != "ct_volume":
        return 1
    if item.file_kind == "dicom_series":
        return len(item.files)
    import nibabel as nib

    return int(nib.load(str(folder / item.key)).shape[2])


def _exports(bundles) -> str:
    return str(next(iter(bundles.values())).path.parent.parent)


def write_slices(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 256-pixel PNG CT slices: 64 distinct phantom slices, each copy with a few pixels changed so
    every file has its own content hash, 1,000 a sub-folder."""
    import numpy as np
    from PIL import Image

    from lung_models.data.phantoms import CHEST_CLASSES, ct_slice

    rng = np.random.default_rng(seed)
    bases = [ct_slice(CHEST_CLASSES[i % 4], np.random.default_rng([seed, i]), size=256) for i in range(64)]
    for i in range(n):
        img = bases[i % len(bases)].copy()
        ys, xs = rng.integers(0, 256, 8), rng.integers(0, 256, 8)
        img[ys, xs] = rng.integers(0, 256, 8, dtype=np.uint8)
        sub = folder / f"day{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        (sub / f"slice_{i:06d}.png").write_bytes(buf.getvalue())


def _child(mode: str, folder: Path, out: Path, exports: str, model: str, workers: int | None,
           env: dict[str, str] | None = None) -> dict:
    """Score ``folder`` in a fresh process (``mode`` flow or bare); its times, rows and peak RSS. Without
    ``env`` the process gets a PREFECT_HOME of its own (a flow then starts a temporary local API)."""
    env = env or {**os.environ, "PREFECT_HOME": str(out) + "-prefect"}
    env = {**env, "PREFECT_LOGGING_LEVEL": "WARNING"}
    args = [sys.executable, __file__, "--child", mode, "--input", str(folder), "--output", str(out),
            "--exports", exports, "--model", model] + (["--workers", str(workers)] if workers else [])
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"scoring {folder} ({mode}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(line.removeprefix("RESULT ")), "process_seconds": time.perf_counter() - started}


def child(args: argparse.Namespace) -> None:
    import pandas as pd

    started = time.perf_counter()
    if args.child == "flow":
        from flows.score import score_folder as run
    else:
        from lung_models.scoring.night import run_night as run
    imported = time.perf_counter()
    # The flow's decoding threads are decode_threads (its workers are Dask processes); run_night's are workers.
    kw = {"settle_seconds": 0, "decode_threads": args.workers} if args.child == "flow" else {"workers": args.workers}
    csv = run(args.input, args.output, models=[args.model], exports_dir=args.exports, include_unpromoted=True, **kw)
    seconds = time.perf_counter() - imported
    rows = len(pd.read_csv(csv))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps({"rows": rows, "seconds": seconds, "import_seconds": imported - started,
                                  "peak_rss_mib": peak_mib}), flush=True)


@contextlib.contextmanager
def prefect_server(home: Path):
    """A running ``prefect server start`` (its own PREFECT_HOME and SQLite); yields the environment of a
    client of it, as a deployment's worker would run the flow."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"prefect server did not start; see {home / 'server.log'}")
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def flow_vs_bare(work: Path, exports: str, model: str, workers: int | None) -> None:
    folders = {n: work / f"slices-{n}" for n in (1000, 10000)}
    for n, folder in folders.items():
        if not folder.exists():
            write_slices(folder, n)

    def run(mode: str, env: dict[str, str] | None = None, tag: str = "", n: int = 1000) -> dict:
        r = _child(mode, folders[n], work / f"{mode}{tag}-{time.time_ns()}", exports, model, workers, env)
        assert r["rows"] == n, r
        return r

    bare = run("bare")
    # A first flow in a fresh PREFECT_HOME: the CLI's temporary API, and its database created on the spot.
    cold = run("flow", tag="-cold")
    # The same with a PREFECT_HOME used before (a user's second `lung-factory score`).
    home = work / f"prefect-home-{time.time_ns()}"
    temp_env = {**os.environ, "PREFECT_HOME": str(home)}
    run("flow", temp_env, "-warmup")
    warm = run("flow", temp_env, "-warm")
    # Against a running server, as the nightly deployment runs (its first flow run warms the server).
    with prefect_server(work / f"server-{time.time_ns()}") as server_env:
        run("flow", server_env, "-served-warmup")
        served = run("flow", server_env, "-served")
        served_large, bare_large = run("flow", server_env, "-served", 10000), run("bare", n=10000)
    print(f"flow   1,000 slices with {model}, each in a fresh process (import time apart; scoring call):"
          f" bare function {bare['seconds']:.1f} s (+{bare['import_seconds']:.1f} s imports)", flush=True)
    for name, r, b in (("temporary API, new PREFECT_HOME", cold, bare),
                       ("temporary API, PREFECT_HOME used before", warm, bare),
                       ("running server (the deployment)", served, bare),
                       ("running server, 10,000 slices", served_large, bare_large)):
        whole = r["process_seconds"] / b["process_seconds"]
        print(f"flow   Prefect flow, {name}: {r['seconds']:.1f} s (+{r['import_seconds']:.1f} s imports) against "
              f"{b['seconds']:.1f} s bare: ratio {r['seconds'] / b['seconds']:.2f}, whole process {whole:.2f} "
              "(goal <= 1.1)", flush=True)


def rss(work: Path, exports: str, model: str, workers: int | None, sizes: list[int]) -> None:
    results = {}
    for n in sizes:
        folder = work / f"slices-{n}"
        if not folder.exists():
            write_slices(folder, n)
        r = _child("bare", folder, work / f"rss-{n}-{time.time_ns()}", exports, model, workers)
        assert r["rows"] == n, r
        results[n] = r
        print(f"rss    {n:6d} slices with {model}: peak RSS {r['peak_rss_mib']:6.0f} MiB, {r['seconds']:6.1f} s, "
              f"{n / r['seconds']:6.1f} files/s", flush=True)
    small, large = min(results), max(results)
    if small != large:
        ratio = results[large]["peak_rss_mib"] / results[small]["peak_rss_mib"]
        print(f"rss    ratio {large}/{small} files: peak RSS x{ratio:.2f} (goal <= 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--exports", default=str(REPO / "exports"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: the scorer's)")
    parser.add_argument("--model", default="chest-cnn", help="the model of the flow and rss sections")
    parser.add_argument("--models", nargs="+", default=None, help="the bundles of the raw, tf and night sections "
                        "(default: every bundle)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--child", choices=("flow", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-night-"))
    work.mkdir(parents=True, exist_ok=True)
    bundles = _bundles(args.exports, args.models)
    print(f"bundles: {', '.join(f'{n} {b.version}' for n, b in bundles.items())}; scratch: {work}", flush=True)
    rates = raw_rates(bundles, args.batch_size) if {"raw", "tf", "night", "explain"} & set(args.only) else {}
    if "tf" in args.only:
        tf_rates(bundles, args.batch_size, rates)
    if "night" in args.only:
        night(bundles, rates, work, args.workers)
    if "flow" in args.only:
        flow_vs_bare(work, args.exports, args.model, args.workers)
    if "workers" in args.only:
        workers_compare(bundles, work, args.workers)
    if "volume" in args.only:
        volume_read(bundles, work)
    if "arena" in args.only:
        arena_rates(bundles, args.batch_size)
    if "explain" in args.only:
        explain_costs(bundles, rates, work)
    if "rss" in args.only:
        rss(work, args.exports, args.model, args.workers, sorted(args.sizes))


if __name__ == "__main__":
    main()
