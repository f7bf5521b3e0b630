"""Pipeline benchmarks: cached set-up, each demo stage, and the no-op `dvc repro`.

Runs in a throw-away copy of the repository (so the workspace is untouched) and prints a
Markdown table. Usage: `make bench` or `uv run python benchmarks/run.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hemaflow._scratch import scratch_env, scratch_repository

REPO = Path(__file__).resolve().parents[1]


def _timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def _stages(work: Path, env: dict[str, str]) -> list[str]:
    listed = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list", "--name-only"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return listed.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each quick measurement (median reported)")
    args = parser.parse_args()
    env = scratch_env()
    rows: list[tuple[str, float, str]] = []
    setup_times = [_timed(["make", "--silent", "setup"], REPO, env) for _ in range(args.repeats)]
    rows.append(("set-up when cached (`make setup`)", statistics.median(setup_times), f"median of {args.repeats}"))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "repo"
        scratch_repository(REPO, work)
        for stage in _stages(work, env):
            seconds = _timed([sys.executable, "-m", "dvc", "repro", "--single-item", stage], work, env)
            rows.append((f"stage `{stage}` (demo params)", seconds, "one run, 2 CPU cores"))
        noop = [_timed([sys.executable, "-m", "dvc", "repro"], work, env) for _ in range(args.repeats)]
        rows.append(
            ("`dvc repro` with nothing to do", statistics.median(noop), f"median of {args.repeats}; goal < 2 s")
        )

    print("| measurement | seconds | note |\n|---|---:|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.2f} | {note} |")


if __name__ == "__main__":
    main()
