"""How long running trials wait for the controller while Optuna's GP sampler suggests.

The controller answers every trial call (a suggestion, ``trial.report``) from one thread. A GP
suggestion costs about a second of CPU at 64 trials; computed in that thread, every call that
arrives meanwhile waits for it. Each trial here suggests Hartmann-6's six floats, then reports
``--reports`` times, ``--gap`` seconds apart, timing each ``report`` from the objective (its
trip to the controller and back). Two setups, the same search otherwise:

- ``off-thread``: ``GPSampler``, whose suggestions the controller prepares off its thread;
- ``in-loop``: the same GP behind a plain delegating wrapper the controller does not know, so
  it is asked in the loop's thread, as every sampler was before.

Printed per setup: median, 99th percentile and maximum of the report latency in ms, and the
run's wall time.

    python bench/gp_loop_latency.py --slots 4 --trials 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from quality_functions import FUNCTIONS

import hyperfleet
from hyperfleet.resources.inventory import Inventory
from hyperfleet.sampling.delegating import DelegatingSampler

LOG_ENV = "BENCH_GP_LATENCY_LOG"  # the workers inherit it from the controller
REPORTS_ENV, GAP_ENV = "BENCH_GP_LATENCY_REPORTS", "BENCH_GP_LATENCY_GAP"


def objective(trial: optuna.Trial) -> float:
    value = FUNCTIONS["hartmann6"](trial)
    latencies = []
    for step in range(int(os.environ[REPORTS_ENV])):
        time.sleep(float(os.environ[GAP_ENV]))
        started = time.perf_counter()
        trial.report(value, step)
        latencies.append(time.perf_counter() - started)
    with open(os.environ[LOG_ENV], "a") as log:
        log.write("".join(f"{s}\n" for s in latencies))
    return value


class InLoop(DelegatingSampler):
    """Delegates everything to ``base``; the controller does not recognise it as slow."""


def run(setup: str, slots: int, n_trials: int) -> tuple[list[float], float]:
    gp = optuna.samplers.GPSampler(seed=0)
    sampler = gp if setup == "off-thread" else InLoop(gp)
    study = optuna.create_study(sampler=sampler)
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "latency.txt"
        os.environ[LOG_ENV] = str(log)
        cores = tuple(sorted(os.sched_getaffinity(0)))
        started = time.perf_counter()
        hyperfleet.optimize(
            study,
            objective,
            n_trials=n_trials,
            inventory=Inventory(gpus=(), cores=cores),
            cpu_slots=slots,
            run_dir=Path(folder) / "run",
            display="quiet",
            report=False,
        )
        wall = time.perf_counter() - started
        return [float(line) for line in log.read_text().split()], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--reports", type=int, default=10)
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--setups", nargs="+", default=["off-thread", "in-loop"])
    args = parser.parse_args()
    os.environ[REPORTS_ENV], os.environ[GAP_ENV] = str(args.reports), str(args.gap)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"{'setup':10} {'reports':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'wall s':>7}")
    for setup in args.setups:
        latencies, wall = run(setup, args.slots, args.trials)
        ms = sorted(1000 * s for s in latencies)
        p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
        print(
            f"{setup:10} {len(ms):7} {statistics.median(ms):7.1f} {p99:7.1f} {ms[-1]:7.1f} "
            f"{wall:7.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
