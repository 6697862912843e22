"""Restart of a big study: seconds from launching the command to its first new trial's start.

A run directory is prepared with a journal (``RUN_DIR/optuna.journal``) of N finished trials
(4 float parameters, random values, written by plain Optuna), then

    hyperfleet run bench/restart.py:objective --run-dir RUN_DIR --study-name NAME
        --n-trials N+5 --cpu-slots 1 --quiet --no-report

runs in a fresh process; the objective's first line writes the wall time (``time.time()``) of
its first call to a file, and the time from the launch to that is the restart time: interpreter
start-up, reading and checking the journal, starting the worker, the first ask. Side by side,
the least a plain Optuna process does to resume on the same journal: a fresh interpreter that
calls ``optuna.load_study`` and one ``study.ask()`` (the same sampler), timed the same way, from
the launch to the ask's return. ``--after-kill`` adds a second case: a run is started on the
journal, killed with SIGKILL while its first trial runs, and the same command is timed at once
(it must first mark the killed trial interrupted); Optuna's process loads that same killed
journal. The journals are built on tmpfs where there is one (fast) and copied in place.

    python bench/restart.py                        # N = 100, 1,000, 10,000; about 2 minutes
    python bench/restart.py --trials 10000 --after-kill --repeats 5
    python bench/restart.py --trials 100 1000 --sampler random --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from common import PARAMS, build_journal, journal, scratch

THIS_FILE = Path(__file__).resolve()
STUDY = "restart"
FIRST_ENV = "BENCH_RESTART_FIRST"  # where the first call writes its time; workers inherit it
SECONDS_ENV = "BENCH_RESTART_SECONDS"
GOAL_S = 3.0


def objective(trial: optuna.Trial) -> float:
    try:
        fd = os.open(os.environ[FIRST_ENV], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, repr(time.time()).encode())
        os.close(fd)
    except FileExistsError:
        pass  # not the first call
    value = sum(trial.suggest_float(name, -10.0, 10.0) ** 2 for name in PARAMS)
    time.sleep(float(os.environ.get(SECONDS_ENV, "0.05")))
    return value


def make_sampler(name: str) -> optuna.samplers.BaseSampler:
    """The sampler ``hyperfleet run --sampler NAME --seed 0`` uses."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=0, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=0)


def wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> float:
    """The time written in `path`, once it is there; fails if the process exits first."""
    while True:
        if path.exists() and path.stat().st_size:
            return float(path.read_text())
        if process.poll() is not None:
            err = process.stderr.read().decode()[-1000:] if process.stderr else ""
            raise RuntimeError(f"{what} exited with {process.returncode} first: {err}")
        time.sleep(0.002)


# --- the runners: each returns seconds from its launch to its first trial ---------------------


def hyperfleet_command(run_dir: Path, n_trials: int, sampler: str) -> list[str]:
    return [
        sys.executable, "-m", "hyperfleet.app.cli", "run", f"{THIS_FILE}:objective",
        "--run-dir", str(run_dir), "--study-name", STUDY, "--n-trials", str(n_trials),
        "--cpu-slots", "1", "--sampler", sampler, "--seed", "0", "--quiet", "--no-report",
    ]  # fmt: skip


def hyperfleet_env(first: Path, trial_seconds: float) -> dict[str, str]:
    env = {**os.environ, FIRST_ENV: str(first), SECONDS_ENV: str(trial_seconds)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # one CPU slot on any machine
    env.pop("HYPERFLEET_FAKE_GPUS", None)
    return env


def restart_hyperfleet(run_dir: Path, n_trials: int, sampler: str) -> float:
    first = run_dir.parent / f"first-{time.monotonic_ns()}"
    command = hyperfleet_command(run_dir, n_trials + 5, sampler)
    launch = time.time()
    process = subprocess.Popen(
        command, env=hyperfleet_env(first, 0.05), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    started = wait_for(first, process, "hyperfleet run")
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"hyperfleet run exited with {process.returncode}: {err.decode()}")
    return started - launch


def restart_optuna(run_dir: Path, sampler: str) -> float:
    first = run_dir.parent / f"first-{time.monotonic_ns()}"
    command = [sys.executable, str(THIS_FILE), "--optuna-child", str(run_dir), sampler, str(first)]
    launch = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = wait_for(first, process, "the Optuna process")
    process.wait()
    return started - launch


def optuna_child(run_dir: str, sampler: str, first: str) -> None:
    """What a plain Optuna process does before it can run a trial: load the study, ask."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = journal(Path(run_dir) / "optuna.journal")
    study = optuna.load_study(study_name=STUDY, storage=storage, sampler=make_sampler(sampler))
    study.ask()
    Path(first).write_text(repr(time.time()))


def kill_during_first_trial(run_dir: Path, n_trials: int, sampler: str) -> None:
    """Leave `run_dir` as a SIGKILL leaves it: the controller gone while a trial runs."""
    first = run_dir.parent / f"killed-{time.monotonic_ns()}"
    command = hyperfleet_command(run_dir, n_trials + 5, sampler)
    # A long trial, so the kill lands while it runs.
    process = subprocess.Popen(
        command, env=hyperfleet_env(first, 60.0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for(first, process, "hyperfleet run")
    time.sleep(0.2)  # into the trial, past its suggestions' writes
    process.send_signal(signal.SIGKILL)
    process.wait()


def check_interrupted(run_dir: Path) -> None:
    """The kill must have landed while a trial ran, or this case measured a cold restart."""
    trials = optuna.load_study(study_name=STUDY, storage=journal(run_dir / "optuna.journal"))
    kinds = [t.system_attrs.get("hyperfleet:fail_kind") for t in trials.get_trials()]
    if "interrupted" not in kinds:
        raise RuntimeError("the killed run left no interrupted trial")


RUNNERS = ("hyperfleet", "optuna-load+ask")


@dataclass(frozen=True)
class Row:
    case: str
    trials: int
    seconds: dict[str, float]  # median by runner


def measure(
    journals: dict[int, Path], n: int, case: str, sampler: str, repeats: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="restart-") as folder:
            base = Path(folder) / "run"
            base.mkdir()
            shutil.copyfile(journals[n], base / "optuna.journal")
            if case == "after SIGKILL":
                kill_during_first_trial(base, n, sampler)
            # Optuna gets a copy of the journal as it is now; hyperfleet restarts at once in
            # the very folder the killed run left (its lock, its dying workers included).
            optuna_dir = Path(folder) / "optuna"
            optuna_dir.mkdir()
            shutil.copyfile(base / "optuna.journal", optuna_dir / "optuna.journal")
            times["hyperfleet"].append(restart_hyperfleet(base, n, sampler))
            if case == "after SIGKILL":
                check_interrupted(base)
            times["optuna-load+ask"].append(restart_optuna(optuna_dir, sampler))
    return times


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--optuna-child":
        optuna_child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    parser.add_argument("--after-kill", action="store_true", help="also restart after SIGKILL")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    cases = ["cold", "after SIGKILL"] if args.after_kill else ["cold"]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="restart-journals-", dir=scratch()) as built:
        journals = {}
        for n in args.trials:
            start = time.perf_counter()
            journals[n] = Path(built) / f"{n}.journal"
            build_journal(journals[n], STUDY, n)
            print(f"built {n} trials in {time.perf_counter() - start:.1f} s", flush=True)
        for n in args.trials:
            for case in cases:
                times = measure(journals, n, case, args.sampler, args.repeats)
                rows.append(Row(case, n, {k: statistics.median(v) for k, v in times.items()}))
                spread = ", ".join(f"{k} {min(v):.2f}-{max(v):.2f} s" for k, v in times.items())
                print(f"{n} trials, {case}: {spread}", flush=True)

    print(
        f"launch to first new trial start, {args.sampler} sampler, 1 CPU slot, "
        f"median of {args.repeats}"
    )
    names = list(RUNNERS)
    print(f"{'trials':>7}  {'case':<15}{names[0]:>12}{names[1]:>17}{'ratio':>8}")
    for row in rows:
        hf, op = row.seconds[names[0]], row.seconds[names[1]]
        print(f"{row.trials:>7}  {row.case:<15}{hf:>12.2f}{op:>17.2f}{hf / op:>7.2f}x")
    print(f"goal: hyperfleet under {GOAL_S:g} s at 10000 trials")
    for row in rows:
        if row.trials == 10000:
            met = "met" if row.seconds[names[0]] < GOAL_S else "not met"
            print(f"  {row.case}: {met}")
    if args.json:
        print(json.dumps([row.__dict__ for row in rows]))


if __name__ == "__main__":
    main()
