"""Controller overhead per trial, side by side with plain Optuna.

A trivial objective (one suggest, one arithmetic) makes every second spent the cost of the
machinery around it. Three ways run on the same kind of storage, a journal file:

- ``optuna-threads``: ``study.optimize(objective, n_trials, n_jobs=2)``, Optuna's own threads;
- ``optuna-processes``: two processes each calling ``study.optimize`` on the shared journal,
  the launcher the seeds hand-write;
- ``hyperfleet``: ``hyperfleet.optimize`` with two CPU slots (two warm workers, one writer)
  on the same kind of study as the two above (its journal may be shared with other processes);
- ``hyperfleet-cli``: ``hyperfleet run`` with two CPU slots and its default storage, the run
  directory's own journal (no other writer: no lock per record).

Each reports its steady rate (trials per second between the first and the last finished trial,
so process start-up is not counted) and its wall time including start-up. Every runner uses
the same sampler (``--sampler``: TPE, Optuna's default, or random).

    python bench/overhead.py --trials 400 --repeats 3 --sampler random
    python bench/overhead.py --trials 400 --repeats 3 --sampler tpe
    python bench/overhead.py --trials 100 --trial-seconds 0.1   # trials that do some work
    python bench/overhead.py --prefill 2000 --runners optuna-processes hyperfleet \
        hyperfleet-nopool                        # TPE on a study of 2,000 finished trials

``--prefill N`` starts every runner's study with N finished trials (a copy of one journal
written once), so TPE's cost is that of a grown study; the rates count the new trials only.
``hyperfleet`` runs with one TPE sampler process (``sampling_processes=1``, or
``--sampling-processes N``; the pool is off by default), ``hyperfleet-nopool`` without
(``sampling_processes=0``); for the in-process runners the controller's CPU per new trial (this
process's user and system time) is printed too.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from common import bench_sampler, run_folder
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

import hyperfleet

PREFILL: Path | None = None  # the journal every study starts from (--prefill)
PREFILLED = 0  # its finished trials
POOL = 1  # the sampler processes the `hyperfleet` runner starts (--sampling-processes)
TRIAL_SECONDS = float(os.environ.get("BENCH_TRIAL_SECONDS", "0"))
SAMPLER = os.environ.get("BENCH_SAMPLER", "tpe")
HERE = Path(__file__).resolve()


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    if TRIAL_SECONDS:
        time.sleep(TRIAL_SECONDS)  # stands in for work; the workers inherit the variable
    return (x - 2.0) ** 2


def _storage(folder: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))


def _new_study(folder: Path) -> optuna.Study:
    """The runner's study: empty, or a copy of the prefilled one."""
    if PREFILL is not None:
        shutil.copyfile(PREFILL, folder / "optuna.journal")
    return optuna.create_study(
        study_name="bench",
        storage=_storage(folder),
        sampler=bench_sampler(SAMPLER),
        load_if_exists=True,
    )


def _prefill(n_trials: int) -> Path:
    path = run_folder("prefill-") / "optuna.journal"
    study = optuna.create_study(study_name="bench", storage=_storage(path.parent))
    rng = random.Random(n_trials)
    distribution = optuna.distributions.FloatDistribution(-10.0, 10.0)
    study.add_trials(
        optuna.trial.create_trial(
            params={"x": (x := rng.uniform(-10.0, 10.0))},
            distributions={"x": distribution},
            value=(x - 2.0) ** 2,
        )
        for _ in range(n_trials)
    )
    return path


def _steady_rate(study: optuna.Study) -> float:
    new = [t for t in study.trials if t.number >= PREFILLED]
    ends = sorted(t.datetime_complete for t in new if t.datetime_complete is not None)
    span = (ends[-1] - ends[0]).total_seconds()
    return (len(ends) - 1) / span if span > 0 else float("nan")


def run_optuna_threads(folder: Path, n_trials: int) -> optuna.Study:
    study = _new_study(folder)
    study.optimize(objective, n_trials=n_trials, n_jobs=2)
    return study


def _process_worker(folder: str, n_trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name="bench", storage=_storage(Path(folder)), sampler=bench_sampler(SAMPLER)
    )
    study.optimize(objective, n_trials=n_trials)


def run_optuna_processes(folder: Path, n_trials: int) -> optuna.Study:
    study = _new_study(folder)
    context = multiprocessing.get_context("spawn")
    share = [n_trials // 2, n_trials - n_trials // 2]
    workers = [context.Process(target=_process_worker, args=(str(folder), n)) for n in share]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
    return study


def run_hyperfleet(
    folder: Path, n_trials: int, sampling_processes: int | None = None
) -> optuna.Study:
    sampling_processes = POOL if sampling_processes is None else sampling_processes
    study = _new_study(folder)
    before = _cpu_seconds()
    hyperfleet.optimize(
        study,
        objective,
        n_trials=PREFILLED + n_trials,  # it counts the study's finished trials
        cpu_slots=2,
        gpus=[],
        run_dir=folder / "run",
        display="quiet",
        report=False,
        sampling_processes=sampling_processes,
    )
    key = "hyperfleet" if sampling_processes else "hyperfleet-nopool"
    CPU_PER_TRIAL.setdefault(key, []).append((_cpu_seconds() - before) / n_trials)
    return study


def run_hyperfleet_nopool(folder: Path, n_trials: int) -> optuna.Study:
    return run_hyperfleet(folder, n_trials, sampling_processes=0)


CPU_PER_TRIAL: dict[str, list[float]] = {}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_hyperfleet_cli(folder: Path, n_trials: int) -> optuna.Study:
    run_dir = folder / "run"
    command = [sys.executable, "-m", "hyperfleet.app.cli", "run", f"{HERE}:objective"]
    command += ["--study-name", "bench", "--n-trials", str(n_trials), "--cpu-slots", "2"]
    command += ["--run-dir", str(run_dir), "--sampler", SAMPLER, "--quiet", "--no-report"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return optuna.load_study(study_name="bench", storage=_storage(run_dir))


RUNNERS: dict[str, Callable[[Path, int], optuna.Study]] = {
    "optuna-threads": run_optuna_threads,
    "optuna-processes": run_optuna_processes,
    "hyperfleet": run_hyperfleet,
    "hyperfleet-nopool": run_hyperfleet_nopool,
    "hyperfleet-cli": run_hyperfleet_cli,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trial-seconds", type=float, default=0.0, help="work per trial")
    parser.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    parser.add_argument("--prefill", type=int, default=0, help="finished trials to start from")
    parser.add_argument("--runners", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    parser.add_argument(
        "--sampling-processes", type=int, default=1, help="TPE sampler processes of `hyperfleet`"
    )
    args = parser.parse_args()
    global TRIAL_SECONDS, SAMPLER, PREFILL, PREFILLED, POOL
    POOL = args.sampling_processes
    if args.prefill:
        if "hyperfleet-cli" in args.runners:
            parser.error("--prefill: the hyperfleet-cli runner starts from its own new journal")
        PREFILL, PREFILLED = _prefill(args.prefill), args.prefill
    TRIAL_SECONDS, SAMPLER = args.trial_seconds, args.sampler
    os.environ["BENCH_TRIAL_SECONDS"] = str(args.trial_seconds)
    os.environ["BENCH_SAMPLER"] = args.sampler
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    runners = {name: RUNNERS[name] for name in args.runners}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    walls: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():  # interleaved, so drift hits all alike
            folder = run_folder()
            start = time.perf_counter()
            study = runner(Path(folder), args.trials)
            walls[name].append(time.perf_counter() - start)
            rates[name].append(_steady_rate(study))

    peer = "optuna-threads" if "optuna-threads" in runners else args.runners[0]
    base = statistics.median(rates[peer])
    work = f"{args.trial_seconds * 1000:.0f} ms" if args.trial_seconds else "trivial"
    print(
        f"{args.trials} {work} trials, 2 slots, journal file, {args.sampler} sampler, "
        f"median of {args.repeats}" + (f", study of {args.prefill} trials" if args.prefill else "")
    )
    print(
        f"{'runner':<18}{'trials/s':>10}{'ms/trial':>10}{'wall s':>9}{'vs ' + peer:>22}"
        f"{'ctl cpu ms':>11}"
    )
    for name in runners:
        rate = statistics.median(rates[name])
        wall = statistics.median(walls[name])
        cpu = CPU_PER_TRIAL.get(name)
        cpu_text = f"{1000 * statistics.median(cpu):>11.1f}" if cpu else ""
        print(
            f"{name:<18}{rate:>10.0f}{1000 / rate:>10.2f}{wall:>9.2f}{rate / base:>21.2f}x"
            + cpu_text
        )


if __name__ == "__main__":
    main()
