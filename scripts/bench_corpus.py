"""Peak memory of a night over the bad-input corpus: a benchmark, not a CI test.

Builds the tests' corpus (``tests/scoring/corpus.py``: good scans beside every kind of bad input,
including headers that claim 12000x12000 pixels or a 2 GB float64 volume in a few KB), scores it
with every exported bundle in a fresh process (``night.run_night``, no Prefect), and prints that
process's peak resident set, the rows by status and the wall time. Goal: under 2 GiB.

    .venv/bin/python scripts/bench_corpus.py --exports exports
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "scoring")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
GOAL_MIB = 2048


def child(input_dir: str, output_dir: str, exports: str, models: list[str] | None) -> None:
    import pandas as pd

    from lung_models.scoring.night import run_night

    started = time.perf_counter()
    csv = run_night(input_dir, output_dir, exports, models, settle_seconds=0, include_unpromoted=True)
    df = pd.read_csv(csv, keep_default_na=False)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "rows": len(df),
                                  "status": df.status.value_counts().to_dict(),
                                  "scans": int(df.relative_path.nunique()),
                                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exports", default=str(REPO / "exports"))
    parser.add_argument("--models", nargs="+", default=None, help="the bundles to score with (default: all)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.exports, args.models)
        return
    from corpus import make_bad_corpus

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-corpus-"))
    folder, out = work / "incoming", work / f"reports-{time.time_ns()}"
    if not folder.exists():
        make_bad_corpus(folder, work / "outside")
    n_files = sum(1 for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    models = ["--models", *args.models] if args.models else []
    proc = subprocess.run([sys.executable, __file__, "--exports", args.exports, *models, "--child", str(folder),
                           str(out)], cwd=REPO, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"scoring the corpus failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(line.removeprefix("RESULT "))
    verdict = "met" if r["peak_rss_mib"] <= GOAL_MIB else "MISSED"
    print(f"corpus {folder}: {n_files} files, {r['scans']} scans, {r['rows']} rows {r['status']} in "
          f"{r['seconds']:.1f} s; peak RSS {r['peak_rss_mib']:.0f} MiB (goal <= {GOAL_MIB} MiB: {verdict})")


if __name__ == "__main__":
    main()
