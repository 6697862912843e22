"""Trials per second on a PostgreSQL database, side by side with plain Optuna.

Teams that share studies across machines keep them in a database. A trivial objective makes
every second spent the cost of the machinery around it, here mostly the database's round trips
and commits. Each runner gets a new database on the same throwaway server (the tests' own,
``tests/support/postgres.py``, on loopback), which flushes each commit to disk as a real one
does:

- ``optuna-processes``: two processes each calling ``study.optimize`` on the shared study, the
  launcher people write by hand;
- ``hyperfleet-cli``: ``hyperfleet run --storage postgresql+psycopg://...`` with two CPU slots
  (two warm workers, the controller the only writer);
- ``hyperfleet``: ``hyperfleet.optimize`` with two CPU slots on a study in the database;
- ``hyperfleet-cli-before`` (with ``--before SRC``): ``hyperfleet run`` from another source tree
  (``git archive OLD src | tar -x -C /tmp/old``, then ``--before /tmp/old/src``), interleaved
  with the others, so a change is measured side by side on a machine whose speed drifts.

Each reports its steady rate (trials per second between the first and the last finished trial,
so process start-up is not counted) and its wall time including start-up.

    python bench/database.py --trials 300 --repeats 3
    python bench/database.py --trials 300 --repeats 3 --sampler random
    python bench/database.py --trials 300 --repeats 3 --before /tmp/old/src
    python bench/database.py --trials 100 --statements   # what each trial costs the database

``--statements`` counts, per trial, the SQL statements, the writes among them and the commits
that the process writing the study sends: plain Optuna's ``study.optimize`` and
``hyperfleet.optimize`` (whose controller runs in this process), each on its own database.
These counts do not depend on the machine's load; run it with ``PYTHONPATH`` at another source
tree to compare two versions.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import optuna  # noqa: E402
from common import bench_sampler, run_folder, run_processes  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

import hyperfleet  # noqa: E402
from support.postgres import PostgresServer, postgres_server  # noqa: E402 (the tests' server)

SAMPLER = os.environ.get("BENCH_SAMPLER", "tpe")
HERE = Path(__file__).resolve()
HF_SOURCE = Path(hyperfleet.__file__).parents[1]
STUDY = "bench"


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    return (x - 2.0) ** 2


def _steady_rate(study: optuna.Study) -> float:
    ends = sorted(t.datetime_complete for t in study.trials if t.datetime_complete is not None)
    span = (ends[-1] - ends[0]).total_seconds()
    return (len(ends) - 1) / span if span > 0 else float("nan")


def _process_worker(url: str, n_trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=url, sampler=bench_sampler(SAMPLER))
    study.optimize(objective, n_trials=n_trials)


def run_optuna_processes(url: str, n_trials: int) -> optuna.Study:
    study = optuna.create_study(study_name=STUDY, storage=url, sampler=bench_sampler(SAMPLER))
    run_processes(_process_worker, [(url, n_trials // 2), (url, n_trials - n_trials // 2)])
    return study


def run_hyperfleet_cli(url: str, n_trials: int, source: str | None = None) -> optuna.Study:
    """``hyperfleet run``, from ``source`` (a folder holding the package) where given."""
    command = [sys.executable, "-m", "hyperfleet.app.cli", "run", f"{HERE}:objective"]
    command += ["--study-name", STUDY, "--n-trials", str(n_trials), "--cpu-slots", "2"]
    command += ["--storage", url, "--run-dir", str(run_folder() / "run")]
    command += ["--sampler", SAMPLER, "--quiet", "--no-report"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if source is not None:
        env["PYTHONPATH"] = source
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return optuna.load_study(study_name=STUDY, storage=url)


def run_hyperfleet(url: str, n_trials: int) -> optuna.Study:
    study = optuna.create_study(study_name=STUDY, storage=url, sampler=bench_sampler(SAMPLER))
    hyperfleet.optimize(
        study,
        objective,
        n_trials=n_trials,
        cpu_slots=2,
        gpus=[],
        run_dir=run_folder() / "run",
        display="quiet",
        report=False,
    )
    return study


RUNNERS: dict[str, Callable[[str, int], optuna.Study]] = {
    "optuna-processes": run_optuna_processes,
    "hyperfleet-cli": run_hyperfleet_cli,
    "hyperfleet": run_hyperfleet,
}


def measure(server: PostgresServer, trials: int, repeats: int, before: str | None) -> None:
    runners = dict(RUNNERS)
    if before is not None:
        runners["hyperfleet-cli-before"] = functools.partial(run_hyperfleet_cli, source=before)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    walls: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():  # interleaved, so drift hits all alike
            url = server.new_database("bench")
            start = time.perf_counter()
            study = runner(url, trials)
            walls[name].append(time.perf_counter() - start)
            assert len(study.trials) == trials, (name, len(study.trials))
            rates[name].append(_steady_rate(study))
    base = statistics.median(rates["optuna-processes"])
    print(f"{trials} trivial trials, 2 slots, PostgreSQL, {SAMPLER} sampler, median of {repeats}")
    print(f"{'runner':<22}{'trials/s':>10}{'ms/trial':>10}{'wall s':>9}{'vs processes':>14}")
    for name in runners:
        rate = statistics.median(rates[name])
        wall = statistics.median(walls[name])
        print(f"{name:<22}{rate:>10.0f}{1000 / rate:>10.2f}{wall:>9.2f}{rate / base:>13.2f}x")


class StatementCounter:
    """SQL statements, writes and commits of every engine in this process, while counting."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        event.listen(Engine, "before_cursor_execute", self._executed)
        event.listen(Engine, "commit", self._committed)

    def _executed(self, *args: Any) -> None:
        statement = str(args[2]).lstrip().split(None, 1)[0].upper()
        self.counts["statements"] += 1
        self.counts["writes"] += statement in ("INSERT", "UPDATE", "DELETE")

    def _committed(self, *args: Any) -> None:
        self.counts["commits"] += 1


def _hyperfleet_optimize(study: optuna.Study, n_trials: int) -> None:
    run_dir = run_folder() / "run"
    hyperfleet.optimize(
        study, objective, n_trials=n_trials, cpu_slots=2, gpus=[], run_dir=run_dir,
        display="quiet", report=False,
    )  # fmt: skip


def count_statements(server: PostgresServer, trials: int) -> None:
    counter = StatementCounter()
    ways: dict[str, Callable[[optuna.Study, int], object]] = {
        "optuna (1 process)": lambda study, n: study.optimize(objective, n_trials=n),
        "hyperfleet": _hyperfleet_optimize,
    }
    print(f"per trial, {trials} trivial trials, {SAMPLER} sampler, hyperfleet from {HF_SOURCE}")
    print(f"{'runner':<22}{'statements':>12}{'writes':>8}{'commits':>9}")
    for name, optimize in ways.items():
        study = optuna.create_study(
            study_name=STUDY, storage=server.new_database("count"), sampler=bench_sampler(SAMPLER)
        )
        counter.counts.clear()
        optimize(study, trials)
        per = {key: counter.counts[key] / trials for key in ("statements", "writes", "commits")}
        print(f"{name:<22}{per['statements']:>12.1f}{per['writes']:>8.1f}{per['commits']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    parser.add_argument("--before", help="another source tree's src/, run side by side")
    parser.add_argument("--statements", action="store_true", help="count SQL per trial")
    args = parser.parse_args()
    global SAMPLER
    SAMPLER = args.sampler
    os.environ["BENCH_SAMPLER"] = args.sampler
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with postgres_server(durable=True) as server:
        if args.statements:
            count_statements(server, args.trials)
        else:
            measure(server, args.trials, args.repeats, args.before)


if __name__ == "__main__":
    main()
