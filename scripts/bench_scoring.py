"""Scoring at scale: does memory grow with the number of files? (A benchmark, not a CI test.)

Writes folders of N generated CT slices (256-pixel PNGs: 64 distinct phantom slices, every copy
with a few pixels changed so each file has its own content hash), then runs the score flow on
each folder in a fresh process and prints, per size, the scoring process's peak RSS, wall time
and files per second, and the ratios between the largest and the smallest size, all measured in
this one run. Needs exported bundles (``lung-factory demo`` or ``lung-factory train`` first).

    .venv/bin/python scripts/bench_scoring.py                      # 1,000 and 10,000 slices, chest-cnn
    .venv/bin/python scripts/bench_scoring.py --sizes 500 2000 --model chest-resnet50
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_slices(folder: Path, n: int, seed: int = 0) -> None:
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


def child(args: argparse.Namespace) -> None:
    """Score one folder in this process; print a JSON line with peak RSS and timings."""
    import pandas as pd

    from flows.score import score_folder

    started = time.perf_counter()
    csv = score_folder(input_dir=args.input, output_dir=args.output, models=[args.model],
                       exports_dir=args.exports, settle_seconds=0, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    rows = len(pd.read_csv(csv))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mib": peak_mib}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--model", default="chest-cnn")
    parser.add_argument("--exports", default=str(REPO / "exports"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scoring-"))
    results = {}
    for n in sorted(args.sizes):
        folder = work / f"in-{n}"
        if not folder.exists():
            t0 = time.perf_counter()
            write_slices(folder, n)
            print(f"wrote {n} slices to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
        env = {**os.environ, "PREFECT_HOME": str(work / f"prefect-{n}"), "TF_CPP_MIN_LOG_LEVEL": "2",
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        out = work / f"out-{n}-{int(time.time())}"
        proc = subprocess.run([sys.executable, __file__, "--child", "--input", str(folder), "--output", str(out),
                               "--model", args.model, "--exports", args.exports, "--batch-size", str(args.batch_size)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"scoring {n} files failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        r = json.loads(line.removeprefix("RESULT "))
        if r["rows"] != n:
            sys.exit(f"{n} files gave {r['rows']} rows")
        results[n] = r
        print(f"{n:6d} files: peak RSS {r['peak_rss_mib']:7.0f} MiB, {r['seconds']:6.1f} s, "
              f"{n / r['seconds']:6.1f} files/s ({args.model}, batch {args.batch_size})", flush=True)
    small, large = min(results), max(results)
    if small != large:
        rss = results[large]["peak_rss_mib"] / results[small]["peak_rss_mib"]
        speed = (large / results[large]["seconds"]) / (small / results[small]["seconds"])
        print(f"ratio {large}/{small} files: peak RSS x{rss:.2f}, files/s x{speed:.2f}")
    print(f"scratch folder: {work}")


if __name__ == "__main__":
    main()
