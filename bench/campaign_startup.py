"""Start-up and reports of the example campaign (nine studies): where the time outside trials goes.

Runs ``hyperfleet run`` on a copy of ``examples/campaign/`` with fewer trials per study and
stamps each line of its output as it arrives: the time to the first trial's start, to the last
trial's end, and from there to the exit (the nine studies' reports).

    python bench/campaign_startup.py
    python bench/campaign_startup.py --trials 2 --repeats 3 --sequential
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "campaign"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="trials per study")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequential", action="store_true")
    args = parser.parse_args()
    runs = [one_run(args.trials, args.sequential) for _ in range(args.repeats)]
    mode = "sequential" if args.sequential else "all at once"
    print(f"examples/campaign, 9 studies x {args.trials} trials, {mode}, median of {len(runs)}")
    for label, index in (("first trial started", 0), ("last trial ended", 1), ("exit", 2)):
        values = [run[index] for run in runs]
        print(f"{label:<22}{statistics.median(values):>7.1f}s   {fmt(values)}")
    reports = [run[2] - run[1] for run in runs]
    print(f"{'reports (end to exit)':<22}{statistics.median(reports):>7.1f}s   {fmt(reports)}")


def fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def one_run(trials: int, sequential: bool) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shutil.copy(EXAMPLE / "models.py", folder)
        text = (EXAMPLE / "campaign.toml").read_text()
        text = re.sub(r"^n_trials = \d+", f"n_trials = {trials}", text, flags=re.M)
        (folder / "campaign.toml").write_text(text)
        command = [sys.executable, "-m", "hyperfleet.app.cli", "run", "campaign.toml", "--plain"]
        if sequential:
            command.append("--sequential")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        first = last = 0.0
        for line in process.stdout:
            now = time.monotonic() - started
            if " started on " in line and not first:
                first = now
            if re.search(r"trial \d+ of \S+ (complete|pruned|failed)", line):
                last = now
        if process.wait() != 0:
            raise SystemExit(f"the campaign exited with status {process.returncode}")
        return first, last, time.monotonic() - started


if __name__ == "__main__":
    main()
