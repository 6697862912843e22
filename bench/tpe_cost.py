"""TPE's cost per trial on a big study, in plain Optuna and through hyperfleet's controller.

A study with N finished trials (4 float parameters, random values) is written once to a journal
file; each runner gets its own copy of that file and runs K more trials of a trivial objective
(4 ``suggest_float`` calls, no work), one at a time, with the same sampler (TPE with constant
liar and a fixed seed, as ``hyperfleet run`` sets it):

- ``optuna``: ``study.optimize(objective, n_trials=K)`` in this process;
- ``hyperfleet``: ``hyperfleet.optimize`` with one CPU slot; the controller runs TPE, the
  worker asks it for each suggestion.

The cost per trial is the time between the first and the last of the K trials' completions over
K - 1 (so hyperfleet's worker start-up is not counted): TPE's suggestions plus the storage
writes of each trial. As N grows TPE dominates and the ratio should go to 1; a ratio above 1 at
large N would be cost hyperfleet adds to every suggestion. The copies are written on the
ordinary temporary folder, as a run's journal would be.

    python bench/tpe_cost.py                          # N = 100, 1,000; about a minute
    python bench/tpe_cost.py --trials 100 1000 10000 --new-trials 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from common import PARAMS, build_journal, journal, scratch
from optuna.trial import TrialState

import hyperfleet

STUDY = "tpe-cost"


def objective(trial: optuna.Trial) -> float:
    return sum(trial.suggest_float(name, -10.0, 10.0) ** 2 for name in PARAMS)


def load(path: Path) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=0, constant_liar=True)
    return optuna.load_study(study_name=STUDY, storage=journal(path), sampler=sampler)


def run_optuna(folder: Path, source: Path, n_old: int, n_new: int) -> optuna.Study:
    del folder, n_old  # study.optimize counts this call's trials, not the study's
    study = load(source)
    study.optimize(objective, n_trials=n_new)
    return study


def run_hyperfleet(folder: Path, source: Path, n_old: int, n_new: int) -> optuna.Study:
    study = load(source)
    outcome = hyperfleet.optimize(
        study,
        objective,
        n_trials=n_old + n_new,  # hyperfleet counts the study's finished trials
        gpus=[],
        cpu_slots=1,
        run_dir=folder / "run",
        display="quiet",
        report=False,
    )
    if outcome.status != "completed":
        raise RuntimeError(f"hyperfleet {outcome.status}: {outcome.message}")
    return study


RUNNERS: dict[str, Callable[[Path, Path, int, int], optuna.Study]] = {
    "optuna": run_optuna,
    "hyperfleet": run_hyperfleet,
}


def ms_per_trial(study: optuna.Study, n_old: int, n_new: int) -> float:
    new = [t for t in study.get_trials(deepcopy=False) if t.number >= n_old]
    done = sorted(t.datetime_complete for t in new if t.state == TrialState.COMPLETE)
    if len(done) != n_new or done[0] is None:
        raise RuntimeError(f"expected {n_new} new complete trials, found {len(done)}")
    return (done[-1] - done[0]).total_seconds() * 1000 / (n_new - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000], help="N")
    parser.add_argument("--new-trials", type=int, default=20, help="K, timed")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()
    if args.new_trials < 2:
        parser.error("--new-trials must be 2 or more")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tpe-cost-journals-", dir=scratch()) as built:
        for n in args.trials:
            built_journal = Path(built) / f"{n}.journal"
            build_journal(built_journal, STUDY, n)
            times: dict[str, list[float]] = {name: [] for name in RUNNERS}
            for _ in range(args.repeats):
                for name, runner in RUNNERS.items():  # alternated, so drift hits both alike
                    with tempfile.TemporaryDirectory(prefix="tpe-cost-") as folder:
                        copy = Path(folder) / "optuna.journal"
                        shutil.copyfile(built_journal, copy)
                        start = time.perf_counter()
                        study = runner(Path(folder), copy, n, args.new_trials)
                        wall = time.perf_counter() - start
                        times[name].append(ms_per_trial(study, n, args.new_trials))
                    print(f"{n} trials, {name}: {times[name][-1]:.1f} ms/trial, {wall:.1f} s")
            results[n] = {name: statistics.median(v) for name, v in times.items()}

    print(
        f"TPE (constant liar), 4 float params, {args.new_trials} new trials one at a time, "
        f"journal file; ms per trial, median of {args.repeats}"
    )
    print(f"{'trials':>7}{'optuna':>10}{'hyperfleet':>12}{'hyperfleet/optuna':>19}")
    for n, row in results.items():
        ratio = row["hyperfleet"] / row["optuna"]
        print(f"{n:>7}{row['optuna']:>10.1f}{row['hyperfleet']:>12.1f}{ratio:>18.2f}x")
    if args.json:
        print(json.dumps({str(n): row for n, row in results.items()}))


if __name__ == "__main__":
    main()
