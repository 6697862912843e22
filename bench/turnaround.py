"""Slot turnaround: how long a slot waits between the end of one trial and the start of the next.

Each trial sleeps a fixed time (0.2 s by default) after its suggestions and records, from inside
the objective, when it started (the objective's first line), when it ended (just before it
returns) and where it ran; the turnaround is the next start on the same slot minus the previous
end. It covers the result's trip to the writer, the storage writes of the result and of the next
trial, and the next trial's trip back: all the time a slot is not running the objective.
Reported as median, 99th percentile and maximum per slot count and sampler (random, and TPE
with constant liar, as ``hyperfleet run`` sets it), with ``busy``, the share of slot time spent
in the objective between the first start and the last end, for two runners side by side:

- ``hyperfleet``: ``hyperfleet.optimize`` on N fake GPUs (``HYPERFLEET_FAKE_GPUS=N``,
  ``trials_per_gpu=1``, ``cpu_slots=0``), a journal file;
- ``optuna-processes``: N processes on one journal file, each asking and telling the study's
  next trial until the budget is reached (each process is a slot).

The default sizes (2 and 16 slots) finish in a minute or two on 2 cores. 128 slots start 128
workers (50-100 MB each) and need a big machine; if hyperfleet refuses that many worker
processes, the largest count it accepts is used and the output says so.

    python bench/turnaround.py
    python bench/turnaround.py --slots 2 16 128 --trials-per-slot 30
    python bench/turnaround.py --samplers random --runners hyperfleet --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from common import run_folder, run_processes
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.errors import HyperfleetError

LOG_ENV = "BENCH_TURNAROUND_LOG"  # the workers inherit it from the controller
SECONDS_ENV = "BENCH_TURNAROUND_SECONDS"
PARAMS = 2
GOAL_MEDIAN_MS, GOAL_P99_MS = 2.0, 10.0
_log_fd: int | None = None


def objective(trial: optuna.Trial) -> float:
    start = time.time()
    value = sum(trial.suggest_float(f"x{i}", -10.0, 10.0) ** 2 for i in range(PARAMS))
    # The process id tells apart slots outside hyperfleet (where every slot is "local") and
    # a worker that replaced a crashed one (whose gap is not a turnaround). Looked up inside
    # the trial's own time: the first look imports hyperfleet's slot module (tens of ms), which
    # is not a gap between trials.
    where = f"{hyperfleet.current_slot().name}/{os.getpid()}"
    global _log_fd
    if _log_fd is None:
        # One O_APPEND descriptor per process: each record is a single small write, which
        # costs microseconds and never interleaves with another process's.
        _log_fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    time.sleep(float(os.environ[SECONDS_ENV]))
    end = time.time()
    record = {"slot": where, "number": trial.number, "start": start, "end": end}
    os.write(_log_fd, (json.dumps(record) + "\n").encode())
    return value


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def _journal(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


# --- runners: each runs n_trials on `slots` slots; the objective writes the log --------------


def run_hyperfleet(folder: Path, slots: int, sampler: str, n_trials: int) -> None:
    study = optuna.create_study(
        study_name="turnaround",
        storage=_journal(folder / "optuna.journal"),
        sampler=make_sampler(sampler, 0),
    )
    os.environ["HYPERFLEET_FAKE_GPUS"] = str(slots)
    try:
        outcome = hyperfleet.optimize(
            study,
            objective,
            n_trials=n_trials,
            trials_per_gpu=1,
            cpu_slots=0,
            run_dir=folder / "run",
            display="quiet",
            report=False,
        )
    finally:
        del os.environ["HYPERFLEET_FAKE_GPUS"]
    if outcome.status != "completed":
        raise RuntimeError(f"hyperfleet {outcome.status}: {outcome.message}")


def _optuna_process(journal: str, sampler: str, seed: int, n_trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name="turnaround",
        storage=_journal(Path(journal)),
        sampler=make_sampler(sampler, seed),
    )
    while True:
        trial = study.ask()
        if trial.number >= n_trials:  # another process took the last one: stop here
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, objective(trial))


def run_optuna_processes(folder: Path, slots: int, sampler: str, n_trials: int) -> None:
    journal = folder / "optuna.journal"
    optuna.create_study(study_name="turnaround", storage=_journal(journal))
    run_processes(
        _optuna_process, [(str(journal), sampler, seed, n_trials) for seed in range(slots)]
    )


RUNNERS: dict[str, Callable[[Path, int, str, int], None]] = {
    "hyperfleet": run_hyperfleet,
    "optuna-processes": run_optuna_processes,
}


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    runner: str
    sampler: str
    slots: int
    gaps: int
    median_ms: float
    p99_ms: float
    max_ms: float
    busy: float  # objective time over slots x (last end - first start)


def read_log(log: Path) -> dict[str, list[tuple[float, float]]]:
    """(start, end) of every trial, by slot, in order."""
    by_slot: dict[str, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        by_slot.setdefault(record["slot"], []).append((record["start"], record["end"]))
    return {slot: sorted(runs) for slot, runs in by_slot.items()}


def turnarounds(by_slot: dict[str, list[tuple[float, float]]]) -> list[float]:
    """Next start minus previous end on each slot, in seconds; a slot's first trial has none."""
    return [nxt[0] - prev[1] for runs in by_slot.values() for prev, nxt in itertools.pairwise(runs)]


def busy_share(by_slot: dict[str, list[tuple[float, float]]], slots: int) -> float:
    runs = [run for slot_runs in by_slot.values() for run in slot_runs]
    span = max(end for _, end in runs) - min(start for start, _ in runs)
    return sum(end - start for start, end in runs) / (slots * span)


def measure(runner: str, slots: int, sampler: str, trials_per_slot: int) -> Row:
    folder = run_folder("turnaround-")
    log = folder / "trials.jsonl"
    os.environ[LOG_ENV] = str(log)
    RUNNERS[runner](folder, slots, sampler, slots * trials_per_slot)
    by_slot = read_log(log)
    gaps = sorted(g * 1000 for g in turnarounds(by_slot))
    p99 = statistics.quantiles(gaps, n=100, method="inclusive")[98] if len(gaps) > 1 else gaps[0]
    busy = busy_share(by_slot, slots)
    return Row(runner, sampler, slots, len(gaps), statistics.median(gaps), p99, gaps[-1], busy)


def fewer_slots(slots: int, refusal: HyperfleetError) -> int:
    """The next count to try after hyperfleet refused `slots` workers: a limit the message
    names (the largest number in it below `slots`), else half as many."""
    named = [int(n) for n in re.findall(r"\d+", str(refusal)) if 0 < int(n) < slots]
    return max(named) if named else slots // 2


def rows_for(rows: list[Row], slots: int) -> list[Row]:
    return [row for row in rows if row.slots == slots]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[2, 16], help="slot counts")
    parser.add_argument(
        "--samplers", nargs="+", default=["random", "tpe"], choices=["random", "tpe"]
    )
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--trials-per-slot", type=int, default=15)
    parser.add_argument("--trial-seconds", type=float, default=0.2, help="sleep per trial")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()
    os.environ[SECONDS_ENV] = str(args.trial_seconds)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    notes: list[str] = []
    rows: list[Row] = []
    for wanted in args.slots:
        slots = wanted
        for sampler in args.samplers:
            for runner in args.runners:  # side by side, one after the other
                while True:
                    try:
                        rows.append(measure(runner, slots, sampler, args.trials_per_slot))
                        break
                    except HyperfleetError as refusal:
                        # A limit on worker processes per machine: measure the most it allows,
                        # and the other runner with as many, so the rows stay side by side.
                        if runner != "hyperfleet" or slots <= 1 or rows_for(rows, slots):
                            raise
                        slots = fewer_slots(slots, refusal)
                        notes.append(f"{wanted} slots refused ({refusal}); measured {slots}")
                row = rows[-1]
                print(
                    f"{row.slots} slots, {row.sampler}, {row.runner}: median "
                    f"{row.median_ms:.2f} ms, p99 {row.p99_ms:.2f} ms",
                    flush=True,
                )

    print(
        f"turnaround (next start minus previous end on a slot), {args.trial_seconds:g} s "
        f"sleeping trials, {PARAMS} float params, {args.trials_per_slot} trials per slot"
    )
    header = f"{'slots':>5}  {'sampler':<8}{'runner':<18}{'gaps':>6}{'median ms':>11}"
    print(f"{header}{'p99 ms':>9}{'max ms':>9}{'busy':>7}")
    for row in rows:
        print(
            f"{row.slots:>5}  {row.sampler:<8}{row.runner:<18}{row.gaps:>6}"
            f"{row.median_ms:>11.2f}{row.p99_ms:>9.2f}{row.max_ms:>9.1f}{row.busy:>7.0%}"
        )
    for note in notes:
        print(f"note: {note}")
    print(
        f"goal: hyperfleet with the random sampler, median under {GOAL_MEDIAN_MS:g} ms and p99 "
        f"under {GOAL_P99_MS:g} ms on 2 idle cores"
    )
    for row in rows:
        if row.runner == "hyperfleet" and row.sampler == "random":
            met = row.median_ms < GOAL_MEDIAN_MS and row.p99_ms < GOAL_P99_MS
            print(f"  {row.slots} slots: {'met' if met else 'not met'}")
    if args.json:
        print(json.dumps({"rows": [asdict(row) for row in rows], "notes": notes}))


if __name__ == "__main__":
    main()
