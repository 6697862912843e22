"""Search quality per trial with parallel slots: simple regret after a fixed number of trials.

Each point runs one sampler setup on one test function with ``SLOTS`` slots for ``--trials``
trials, once per seed, and reports the median simple regret (best value found minus the global
minimum) with its quartiles. Time is simulated: trial durations are drawn from a seeded
log-normal distribution (median 1, sigma 0.5), a heap holds the running trials by finish time,
and at each finish the trial is told and the freed slot asks for the next one at once, with the
others still RUNNING in the study: what hyperfleet's controller does. The first ``SLOTS`` trials
are all asked before any of them suggests its parameters, as when every worker is handed its
first trial in the same step. ``--real`` runs the same search through ``hyperfleet.optimize`` on
fake-GPU slots instead (trials sleep their drawn duration, scaled down), to check the simulation.

    python bench/parallel_quality.py --slots 1 --setups tpe-liar --out points.jsonl
    python bench/parallel_quality.py --slots 4 8 32 --out points.jsonl    # about 20 minutes
    python bench/parallel_quality.py --functions hartmann6 --slots 8 --seeds 5
    python bench/parallel_quality.py --real --functions hartmann6 --slots 8 --setups default
    python bench/parallel_quality.py --real --functions hartmann6 --slots 8 --setups tpe-liar \
        --sampling-processes 0                             # TPE sampled by the controller alone
    python bench/parallel_quality.py --functions hartmann6 --slots 8 --setups tpe-liar --ahead 4
                                      # each trial's set sampled 4 sets ahead, as by the pool
    python bench/parallel_quality.py --table points.jsonl      # the markdown table of --out
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from quality_functions import FUNCTIONS, MINIMA

from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.sampling.pending import PendingTrialsSampler

SamplerFactory = Callable[[int, int, int], optuna.samplers.BaseSampler]  # (slots, seed, trials)


def _tpe(**options: object) -> SamplerFactory:
    return lambda slots, seed, trials: optuna.samplers.TPESampler(seed=seed, **options)  # type: ignore[arg-type]


def _pending(liar: str) -> SamplerFactory:
    return lambda slots, seed, trials: PendingTrialsSampler(
        optuna.samplers.TPESampler(seed=seed, constant_liar=False), liar
    )


SETUPS: dict[str, SamplerFactory] = {
    # Optuna 5's TPE as it comes: multivariate, constant liar (the running trials are counted
    # among the worst), 10 random startup trials counted among finished trials.
    "tpe-liar": _tpe(),
    "tpe-no-liar": _tpe(constant_liar=False),
    # Constant liar, and as few random startup trials as a sequential search has (10): the
    # first wave of ``slots`` trials is random anyway.
    "tpe-liar-startup": lambda slots, seed, trials: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=max(1, 11 - slots)
    ),
    "pending-worst": _pending("worst"),
    "pending-mean": _pending("mean"),
    "pending-best": _pending("best"),
    # Optuna's GP sampler conditions on running trials itself (qLogEI over their posterior).
    "gp": lambda slots, seed, trials: optuna.samplers.GPSampler(seed=seed),
    # hyperfleet's default: GP for a fixed numeric space, a budget of at most a few hundred
    # trials and trials of 10 s or more, TPE with constant liar otherwise; the budget is the
    # search's trials. The simulated trials stand for such long ones (their clock is simulated,
    # their stored start and end are not), so the duration rule is set aside here.
    "auto": lambda slots, seed, trials: AutoSampler(seed, trials, min_trial_seconds=0.0),
    "default": lambda slots, seed, trials: AutoSampler(seed, trials, min_trial_seconds=0.0),
}

COMPARED = ("tpe-liar", "tpe-liar-startup", "pending-worst", "pending-mean")  # the table's


def lognormal_durations(seed: int) -> Iterator[float]:
    rng = random.Random(seed)
    while True:
        yield rng.lognormvariate(0.0, 0.5)


# --ahead: suggestion sets sampled ahead of need, as TPE's sampler processes do (read from the
# environment, so that the processes of --jobs see it too)
AHEAD = int(os.environ.get("BENCH_AHEAD", "0"))


def simulate(setup: str, function: str, slots: int, seed: int, n_trials: int) -> float:
    """Simple regret of one simulated search. With ``AHEAD`` sets, each trial that starts
    takes the set sampled longest ago (its suggestions made then), and a new set is sampled
    at once in its place, the waiting sets running beside it: the pool's queue, with
    processes that sample without delay (``controller.sampler_pool``)."""
    objective = FUNCTIONS[function]
    study = optuna.create_study(sampler=SETUPS[setup](slots, seed, n_trials))
    durations = lognormal_durations(seed)
    running: list[tuple[float, int, optuna.Trial, float]] = []
    ready: collections.deque[tuple[optuna.Trial, float]] = collections.deque()

    def sampled() -> tuple[optuna.Trial, float]:
        trial = study.ask()
        return trial, objective(trial)

    first_wave = [sampled() for _ in range(min(slots, n_trials))]
    ready.extend(sampled() for _ in range(min(AHEAD, n_trials - len(first_wave))))
    for trial, value in first_wave:
        heapq.heappush(running, (next(durations), trial.number, trial, value))
    started = len(first_wave)
    while running:
        now, _, trial, value = heapq.heappop(running)
        study.tell(trial, value)
        if started < n_trials:
            ready.append(sampled())  # sampled from what is known now, for a later start
            trial, value = ready.popleft()
            heapq.heappush(running, (now + next(durations), trial.number, trial, value))
            started += 1
    return study.best_value - MINIMA[function]


SAMPLING_PROCESSES: int | None = None  # --real: TPE's sampler processes (None: the default)


def real_run(setup: str, function: str, slots: int, seed: int, n_trials: int) -> float:
    """Simple regret of one search through hyperfleet itself on ``slots`` fake GPUs."""
    import hyperfleet

    study = optuna.create_study(sampler=SETUPS[setup](slots, seed, n_trials))
    with tempfile.TemporaryDirectory() as folder:
        hyperfleet.optimize(
            study,
            _sleeping_objective,
            n_trials=n_trials,
            gpus=list(range(slots)),
            cpu_slots=0,
            run_dir=Path(folder) / "run",
            display="quiet",
            report=False,
            objective_kwargs={"function": function, "seed": seed},
            sampling_processes=SAMPLING_PROCESSES,
        )
    return study.best_value - MINIMA[function]


def _sleeping_objective(function: str, seed: int) -> Callable[[optuna.Trial], float]:
    """Per worker: the test function, after sleeping the trial's drawn duration (0.15 s per
    unit, enough for the controller's own work to be small beside it)."""
    durations = list(zip(range(10_000), lognormal_durations(seed), strict=False))

    def objective(trial: optuna.Trial) -> float:
        value = FUNCTIONS[function](trial)
        time.sleep(0.15 * durations[trial.number][1])
        return value

    return objective


def _regrets(
    run: Callable[[str, str, int, int, int], float],
    jobs: int,
    point: tuple[str, str, int],
    seeds: int,
    trials: int,
) -> list[float]:
    """One regret per seed, ``jobs`` seeds at a time (in processes of their own, each torch on
    one thread, so that side by side they do not fight for the cores)."""
    tasks = [(*point, seed, trials) for seed in range(seeds)]
    if jobs <= 1:
        return [run(*task) for task in tasks]
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_one_thread) as pool:
        return pool.starmap(run, tasks)


def _one_thread() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(1)


def summary(regrets: list[float]) -> dict[str, float]:
    if len(regrets) < 2:
        return {"median": regrets[0], "q1": regrets[0], "q3": regrets[0]}
    q1, median, q3 = statistics.quantiles(regrets, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def table(points: list[dict[str, Any]]) -> str:
    """A markdown table: one row per function and slot count, one column per setup, each cell
    the median regret with its quartiles and, in parallel, its ratio to sequential TPE."""
    setups = list(dict.fromkeys(p["setup"] for p in points if p["slots"] > 1))
    sequential = {p["function"]: p["median"] for p in points if p["slots"] == 1}
    cells = {(p["function"], p["slots"], p["setup"]): p for p in points}
    lines = [
        "| function | slots | " + " | ".join(setups) + " |",
        "|---|---:|" + "---:|" * len(setups),
    ]
    for function in dict.fromkeys(p["function"] for p in points):
        if function in sequential:
            p = next(p for p in points if p["function"] == function and p["slots"] == 1)
            seq = f"{p['median']:.3g} [{p['q1']:.3g}, {p['q3']:.3g}] ({p['setup']})"
            lines.append(f"| {function} | 1 | {seq} |" + " |" * (len(setups) - 1))
        for slots in sorted({p["slots"] for p in points if p["function"] == function} - {1}):
            row = [_cell(cells.get((function, slots, s)), sequential.get(function)) for s in setups]
            lines.append(f"| {function} | {slots} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cell(point: dict[str, Any] | None, sequential: float | None) -> str:
    if point is None:
        return ""
    text = f"{point['median']:.3g} [{point['q1']:.3g}, {point['q3']:.3g}]"
    if sequential:
        text += f" {point['median'] / sequential:.2f}x"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=FUNCTIONS)
    parser.add_argument("--slots", nargs="+", type=int, default=[1, 4, 8, 32])
    parser.add_argument("--setups", nargs="+", default=list(COMPARED), choices=SETUPS)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--real", action="store_true", help="run through hyperfleet itself")
    parser.add_argument(
        "--sampling-processes", type=int, help="--real: TPE's sampler processes (0: none)"
    )
    parser.add_argument(
        "--ahead",
        type=int,
        default=0,
        help="simulation: sets sampled ahead, as by TPE's sampler processes (0: at each start)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side (simulation)")
    parser.add_argument("--out", type=Path, help="append one JSON line per point here")
    parser.add_argument("--table", type=Path, help="print the table of an --out file, then stop")
    args = parser.parse_args()
    if args.table is not None:
        lines = args.table.read_text().splitlines()
        print(table([json.loads(line) for line in lines if line.strip()]))
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    global SAMPLING_PROCESSES, AHEAD
    SAMPLING_PROCESSES = args.sampling_processes
    AHEAD = args.ahead
    os.environ["BENCH_AHEAD"] = str(args.ahead)
    if args.real:
        os.environ["HYPERFLEET_FAKE_GPUS"] = str(max(args.slots))
    run = real_run if args.real else simulate
    print(f"{'function':10} {'slots':>5} {'setup':22} {'median':>9} {'q1':>9} {'q3':>9}  s")
    for function in args.functions:
        for slots in args.slots:
            for setup in args.setups:
                started = time.perf_counter()
                where = (setup, function, slots)
                regrets = _regrets(run, args.jobs, where, args.seeds, args.trials)
                point = {"function": function, "slots": slots, "setup": setup, "real": args.real}
                point["ahead"] = args.ahead
                point |= summary(regrets) | {"regrets": regrets, "trials": args.trials}
                took = time.perf_counter() - started
                print(
                    f"{function:10} {slots:5} {setup:22} {point['median']:9.4f} "
                    f"{point['q1']:9.4f} {point['q3']:9.4f}  {took:.0f}",
                    flush=True,
                )
                if args.out is not None:
                    with args.out.open("a") as out:
                        out.write(json.dumps(point) + "\n")


if __name__ == "__main__":
    sys.exit(main())
