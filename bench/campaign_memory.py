"""Worker memory and start-up in a sequential campaign of many data sets.

The campaign is the one of the seed write-ups at small scale: 8 data sets x 3 model families,
one stage per data set, each study's factory reading its data set (``--load-seconds``, a sleep
standing for the file read) and allocating it (50 MB of touched memory by default). Two model
families use a (fake) GPU slot, the third a CPU slot. A sampler polls the resident set size
(RSS) of every worker process of the run and prints, per slot, the largest seen: a worker that
holds only the data set of the stage it runs stays near one data set above its own baseline.
It also prints when the first trial started: a worker that loads every study's data set before
its first trial makes that wait grow with the number of studies.

    python bench/campaign_memory.py
    python bench/campaign_memory.py --datasets 4 --megabytes 20 --load-seconds 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

WORKER_MODULE = "hyperfleet.workers.main"

FACTORY = """
import time

import numpy as np


def make(dataset, megabytes, load_seconds):
    time.sleep(load_seconds)  # reading the data set's file
    data = np.ones(megabytes * 2**20 // 8)  # touched: every page is resident

    def objective(trial):
        return trial.suggest_float("x", 0.0, 1.0) + float(data[:1].sum())

    return objective
"""

CAMPAIGN = """
[campaign]
name = "memory"
sequential = true

[pool]
trials_per_gpu = 1
cpu_slots = 1

[defaults]
objective = "models.py:make"
args = {{ dataset = "{{dataset}}", megabytes = {megabytes}, load_seconds = {load_seconds} }}
matrix = {{ dataset = {datasets} }}
stage = "{{dataset}}"
n_trials = {trials}
sampler = "random"

[[study]]
name = "xgb-{{dataset}}"
slot = "gpu"

[[study]]
name = "lgbm-{{dataset}}"
slot = "gpu"

[[study]]
name = "cat-{{dataset}}"
slot = "cpu"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=8)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--trials", type=int, default=3, help="trials per study")
    parser.add_argument("--load-seconds", type=float, default=0.5, help="per data set")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        names = [f"d{i}" for i in range(args.datasets)]
        (folder / "models.py").write_text(FACTORY)
        (folder / "campaign.toml").write_text(
            textwrap.dedent(
                CAMPAIGN.format(
                    datasets=json.dumps(names),
                    trials=args.trials,
                    megabytes=args.megabytes,
                    load_seconds=args.load_seconds,
                )
            )
        )
        peaks, first, wall = run_and_sample(folder)
    print(
        f"{args.datasets} data sets x 3 models, {args.megabytes} MB each read in "
        f"{args.load_seconds:g}s, sequential, {args.trials} trials per study"
    )
    print(f"first trial started after {first:.1f}s, run took {wall:.1f}s")
    print(f"{'slot':<10}{'peak RSS MB':>12}")
    for slot, peak in sorted(peaks.items()):
        print(f"{slot:<10}{peak / 2**20:>12.0f}")


def run_and_sample(folder: Path) -> tuple[dict[str, int], float, float]:
    env = {**os.environ, "HYPERFLEET_FAKE_GPUS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hyperfleet.app.cli", "run", "campaign.toml", "--plain"]
    started = time.monotonic()
    process = subprocess.Popen(
        [*command, "--no-report"], cwd=folder, env=env, stdout=subprocess.PIPE, text=True
    )
    peaks: dict[str, int] = {}
    done = threading.Event()
    sampler = threading.Thread(target=sample, args=(process.pid, peaks, done))
    sampler.start()
    first = 0.0
    assert process.stdout is not None
    for line in process.stdout:
        if " started on " in line and not first:
            first = time.monotonic() - started
    code = process.wait()
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"the campaign exited with status {code}")
    return peaks, first, wall


def sample(controller: int, peaks: dict[str, int], done: threading.Event) -> None:
    """Every 50 ms: the RSS of each worker, kept per slot at its largest."""
    while not done.is_set():
        try:
            children = psutil.Process(controller).children()
        except psutil.Error:
            return
        for child in children:
            try:
                if WORKER_MODULE not in child.cmdline():
                    continue
                slot = json.loads(child.environ().get("HYPERFLEET_SLOT", "{}")).get("name", "?")
                peaks[slot] = max(peaks.get(slot, 0), child.memory_info().rss)
            except psutil.Error:
                continue
        done.wait(0.05)


if __name__ == "__main__":
    main()
