"""Makespan of a fixed list of sleeping trials on 4 slots, against four plain Optuna processes.

The workload is the peers' one: the 48 durations in ``bench/makespan_durations.json``; trial k
sleeps ``durations[k]`` seconds, whoever runs it, so every runner does the same work in the same
order. No schedule can finish before ``max(sum / slots, longest)`` (6.006 s on 4 slots): the
table reports each runner's makespan over that lower bound. Taking the trials in number order,
each on the first free slot, with no overhead at all, gives 7.544 s (1.26): what is above that
is start-up, shutdown and the time slots wait between trials. Two runners, alternated:

- ``hyperfleet``: ``hyperfleet run`` in a subprocess, 4 fake GPUs (``HYPERFLEET_FAKE_GPUS=4``,
  ``--cpu-slots 0``, so there are 4 slots whatever the machine's core count), random sampler;
- ``optuna-processes``: 4 processes on one journal file, each taking the study's next trial
  (``study.ask``) and telling its result until the study has its 48 trials, so trials are
  taken greedily in number order, as a free hyperfleet slot takes the next one.

``wall`` runs from the parent's launch to the last process gone (interpreter and worker
start-up included); ``span`` from the first trial's start to the last trial's end (the schedule
alone); ``start-up`` from the launch to the first trial's start. Trials only sleep, so the CPU
enters only through start-up and the controller's own work.

    python bench/makespan.py                  # 3 repeats, about a minute
    python bench/makespan.py --repeats 7 --json
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from common import run_folder, run_processes
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

THIS_FILE = Path(__file__).resolve()
DURATIONS: list[float] = json.loads((THIS_FILE.parent / "makespan_durations.json").read_text())
STUDY = "makespan"
GOAL = 1.30  # hyperfleet wall over the bound; the four Optuna processes gave 1.34


def objective(trial: optuna.Trial) -> float:
    """Sleep this trial number's duration; the value says which duration ran, for the check."""
    seconds = DURATIONS[trial.number]
    time.sleep(seconds)
    return seconds


@dataclass(frozen=True)
class Outcome:
    wall_s: float
    span_s: float
    startup_s: float


def _journal(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


# --- the runners: each returns its finished trials and its launch time (time.time()) ---------


def run_hyperfleet(folder: Path, slots: int) -> list[FrozenTrial]:
    env = {**os.environ, "HYPERFLEET_FAKE_GPUS": str(slots)}
    command = [
        sys.executable, "-m", "hyperfleet.app.cli", "run", f"{THIS_FILE}:objective",
        "--run-dir", str(folder / "run"), "--study-name", STUDY,
        "--n-trials", str(len(DURATIONS)), "--cpu-slots", "0", "--sampler", "random",
        "--seed", "0", "--quiet", "--no-report",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"hyperfleet exited with {done.returncode}: {done.stderr[-1000:]}")
    storage = _journal(folder / "run" / "optuna.journal")
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials()


def _optuna_process(journal: str, n_trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=STUDY, storage=_journal(Path(journal)), sampler=optuna.samplers.RandomSampler()
    )
    while True:
        # The journal hands out trial numbers one at a time under its lock, so each process
        # gets the next free number, the greedy order a free slot would take.
        trial = study.ask()
        if trial.number >= n_trials:
            # Another process took the last one between our asks: this extra trial is no work.
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, objective(trial))


def run_optuna_processes(folder: Path, slots: int) -> list[FrozenTrial]:
    journal = folder / "optuna.journal"
    optuna.create_study(study_name=STUDY, storage=_journal(journal))
    run_processes(_optuna_process, [(str(journal), len(DURATIONS)) for _ in range(slots)])
    return optuna.load_study(study_name=STUDY, storage=_journal(journal)).get_trials()


RUNNERS: dict[str, Callable[[Path, int], list[FrozenTrial]]] = {
    "hyperfleet": run_hyperfleet,
    "optuna-processes": run_optuna_processes,
}


def greedy_makespan(slots: int) -> float:
    """Trials taken in number order by the first free slot, with no overhead at all."""
    free_at = [0.0] * slots
    for seconds in DURATIONS:
        heapq.heappush(free_at, heapq.heappop(free_at) + seconds)
    return max(free_at)


def measure(runner: Callable[[Path, int], list[FrozenTrial]], slots: int) -> Outcome:
    folder = run_folder("makespan-")
    launch = time.time()
    trials = runner(folder, slots)
    wall = time.time() - launch
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if sorted(t.number for t in done) != list(range(len(DURATIONS))) or any(
        t.value != DURATIONS[t.number] for t in done
    ):
        raise RuntimeError(f"expected trials 0-{len(DURATIONS) - 1} with their durations")
    starts = [t.datetime_start.timestamp() for t in done if t.datetime_start]
    ends = [t.datetime_complete.timestamp() for t in done if t.datetime_complete]
    return Outcome(wall, max(ends) - min(starts), min(starts) - launch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4, help="slots (fake GPUs) and processes")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    bound = max(sum(DURATIONS) / args.slots, max(DURATIONS))
    outcomes: dict[str, list[Outcome]] = {name: [] for name in RUNNERS}
    for repeat in range(args.repeats):
        for name, runner in RUNNERS.items():  # alternated, so drift hits both alike
            outcomes[name].append(measure(runner, args.slots))
        line = ", ".join(f"{n} {o[-1].wall_s / bound:.2f}" for n, o in outcomes.items())
        print(f"repeat {repeat + 1}: wall/bound {line}", flush=True)

    print(
        f"{len(DURATIONS)} sleeping trials ({sum(DURATIONS):.3f} s in all, longest "
        f"{max(DURATIONS):.3f} s) on {args.slots} slots; lower bound {bound:.3f} s; "
        f"median of {args.repeats}"
    )
    greedy = greedy_makespan(args.slots)
    print(f"greedy in trial order with no overhead at all: {greedy:.3f} s ({greedy / bound:.2f})")
    header = f"{'runner':<18}{'wall s':>8}{'wall/bound':>12}{'span s':>8}{'span/bound':>12}"
    print(f"{header}{'start-up s':>12}")
    summary: dict[str, dict[str, float]] = {}
    for name, runs in outcomes.items():
        row = {key: statistics.median(getattr(o, key) for o in runs) for key in asdict(runs[0])}
        summary[name] = {**row, "wall_over_bound": row["wall_s"] / bound}
        print(
            f"{name:<18}{row['wall_s']:>8.2f}{row['wall_s'] / bound:>12.2f}{row['span_s']:>8.2f}"
            f"{row['span_s'] / bound:>12.2f}{row['startup_s']:>12.2f}"
        )
    ratio = summary["hyperfleet"]["wall_s"] / summary["optuna-processes"]["wall_s"]
    met = "met" if summary["hyperfleet"]["wall_over_bound"] <= GOAL else "not met"
    print(
        f"goal: hyperfleet wall/bound at most {GOAL:.2f} ({met}; the Optuna processes: 1.34 "
        f"on an idle machine); hyperfleet wall / optuna-processes wall {ratio:.2f}x"
    )
    if args.json:
        result = {"bound_s": bound, "greedy_s": greedy, "repeats": args.repeats}
        print(json.dumps({**result, "runners": summary}))


if __name__ == "__main__":
    main()
