"""What one suggestion of Optuna's GPSampler costs, by the size of the study.

A Hartmann-6 study (6 floats, one objective) gets ``N`` finished trials at random points and
``--running`` trials still running with their parameters, as on that many busy slots; then the
GP sampler suggests (``infer_relative_search_space`` and ``sample_relative``, the part of
``study.ask()`` that fits the model and maximises qLogEI) ``--repeats`` times, each new trial
told its value before the next, the first untimed (it fits the kernel from scratch; later ones
start from the last fit, as in a run).
Printed: the median seconds of CPU (``time.process_time``: every thread torch uses) and of wall
time per suggestion, by N. The controller's ``auto`` sampler picks GP up to a budget where this
stays a small share of a trial's time (see bench/RESULTS.md).

    python bench/gp_cost.py --trials 16 64 128 256 512
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from quality_functions import FUNCTIONS


def study_of(n_finished: int, n_running: int, seed: int = 0) -> optuna.Study:
    rng = random.Random(seed)
    space = {f"x{i}": FloatDistribution(0.0, 1.0) for i in range(6)}
    study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=seed))
    for _ in range(n_finished):
        params = {name: rng.random() for name in space}
        value = FUNCTIONS["hartmann6"](optuna.trial.FixedTrial(params))
        study.add_trial(create_trial(params=params, distributions=space, value=value))
    for _ in range(n_running):
        study.enqueue_trial({name: rng.random() for name in space})
        trial = study.ask()
        for name, distribution in space.items():
            trial._suggest(name, distribution)
    return study


def one_suggestion(study: optuna.Study) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the sampler's relative sample for a new trial; the trial
    is then told its value, so that the next suggestion fits one more result, as in a run."""
    trial = study.ask()
    cpu, wall = time.process_time(), time.perf_counter()
    _ = trial.relative_params
    took = time.process_time() - cpu, time.perf_counter() - wall
    study.tell(trial, FUNCTIONS["hartmann6"](trial))  # suggests the sampled parameters
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", nargs="+", type=int, default=[16, 64, 128, 256])
    parser.add_argument("--running", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"{'finished':>8} {'running':>7} {'cpu s':>7} {'wall s':>7}")
    for n in args.trials:
        study = study_of(n, args.running)
        times = [one_suggestion(study) for _ in range(args.repeats)][1:]
        cpu = statistics.median(t[0] for t in times)
        wall = statistics.median(t[1] for t in times)
        print(f"{n:8} {args.running:7} {cpu:7.2f} {wall:7.2f}", flush=True)


if __name__ == "__main__":
    main()
