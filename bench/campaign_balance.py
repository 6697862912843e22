"""Three studies of unequal size: one shared pool against one worker process per resource.

The launcher people hand-write for such a campaign pins each model family to a resource:
XGBoost on gpu0, LightGBM on gpu1, CatBoost on the CPU, one worker process per resource, each
running its own study (``study.optimize``, its own journal file, ``CUDA_VISIBLE_DEVICES`` set in
the process) until its budget is done. When the budgets differ, gpu1 sits idle once the small
study is done while gpu0 still works through the large one. A campaign runs the same three
studies in one pool (``slot = { gpus = 1 }`` for the two GPU studies, ``slot = "cpu"`` for the
third, one CPU slot), and hands gpu1 to the large study as soon as the small one is done.

Trials only sleep (a fixed time per study), so the figures do not depend on this machine's CPU;
the GPUs are fake (``HYPERFLEET_FAKE_GPUS=2``). The ratio depends entirely on the budgets and
durations, which are chosen to show the effect of unequal budgets: with equal GPU budgets the
static assignment loses nothing. Both runners alternate, a few times each.

    python bench/campaign_balance.py
    python bench/campaign_balance.py --xgb-trials 40 --lgbm-trials 40   # equal budgets
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from common import run_processes
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

THIS_FILE = Path(__file__).resolve()
SLOT_ATTR = "hyperfleet:slot"  # where hyperfleet ran a trial: "gpu0#0", "gpu1#0", "cpu#0"
GPU_RESOURCES = ("gpu0", "gpu1")


@dataclass(frozen=True)
class Workload:
    """One model family's study: its budget, the time of each trial, where the launcher pins it."""

    name: str
    n_trials: int
    seconds: float
    resource: str  # the static launcher's assignment: "gpu0", "gpu1" or "cpu"

    @property
    def visible_devices(self) -> str:
        return self.resource.removeprefix("gpu") if self.resource in GPU_RESOURCES else ""


@dataclass(frozen=True)
class Outcome:
    wall_s: float  # from launch to the last process gone, start-up included
    span_s: float  # from the first trial's start to the last trial's end
    gpu_busy: float  # trial time on the two GPUs over 2 x span


def make_objective(seconds: float) -> Callable[[optuna.Trial], float]:
    """The objective of every study: one suggestion and a fixed time of 'training'."""

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -10.0, 10.0)
        time.sleep(seconds)
        return (x - 2.0) ** 2

    return objective


# --- the static launcher: one process per resource, each with its own study -----------------


def _journal(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


def _static_worker(workload: Workload, journal: str) -> None:
    # Set before anything could touch CUDA, as the launcher's worker does.
    os.environ["CUDA_VISIBLE_DEVICES"] = workload.visible_devices
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=workload.name, storage=_journal(Path(journal)))
    study.optimize(make_objective(workload.seconds), n_trials=workload.n_trials)


def run_static(folder: Path, workloads: list[Workload]) -> dict[str, list[FrozenTrial]]:
    journals = {w.name: folder / f"{w.name}.journal" for w in workloads}
    run_processes(_static_worker, [(w, str(journals[w.name])) for w in workloads])
    return {
        w.name: optuna.load_study(study_name=w.name, storage=_journal(path)).get_trials()
        for w, path in zip(workloads, journals.values(), strict=True)
    }


def static_resources(workloads: list[Workload]) -> dict[str, str]:
    return {w.name: w.resource for w in workloads}


# --- hyperfleet: one campaign, one pool ------------------------------------------------------


def campaign_file(folder: Path, workloads: list[Workload]) -> Path:
    studies = "".join(
        f"""
[[study]]
name = "{w.name}"
objective = "{THIS_FILE}:make_objective"
args = {{ seconds = {w.seconds} }}
n_trials = {w.n_trials}
slot = {"{ gpus = 1 }" if w.resource in GPU_RESOURCES else '"cpu"'}
"""
        for w in workloads
    )
    path = folder / "campaign.toml"
    path.write_text(
        f"""[campaign]
name = "balance"
run_dir = "{folder / "run"}"

[pool]
gpus = "all"
cpu_slots = 1
threads_per_slot = 1

[defaults]
direction = "minimize"
{studies}"""
    )
    return path


def run_hyperfleet(folder: Path, workloads: list[Workload]) -> dict[str, list[FrozenTrial]]:
    env = {**os.environ, "HYPERFLEET_FAKE_GPUS": "2"}
    campaign = str(campaign_file(folder, workloads))
    command = [sys.executable, "-m", "hyperfleet.app.cli", "run", campaign]
    done = subprocess.run(
        [*command, "--quiet", "--no-report"], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"hyperfleet exited with {done.returncode}: {done.stderr[-1000:]}")
    storage = _journal(folder / "run" / "optuna.journal")
    return {
        w.name: optuna.load_study(study_name=w.name, storage=storage).get_trials()
        for w in workloads
    }


def hyperfleet_resource(trial: FrozenTrial) -> str:
    """'gpu1' from the slot name 'gpu1#0'; 'cpu' for a CPU slot ('cpu#0')."""
    found = re.match(r"gpu\d+|cpu", str(trial.system_attrs.get(SLOT_ATTR, "")))
    return found.group() if found else "unknown"


# --- measuring ---------------------------------------------------------------------------------


def measure(
    trials: dict[str, list[FrozenTrial]],
    resource_of: Callable[[str, FrozenTrial], str],
    wall_s: float,
    workloads: list[Workload],
) -> Outcome:
    finished = [(name, t) for name, ts in trials.items() for t in ts]
    for w in workloads:
        complete = sum(t.state == TrialState.COMPLETE for t in trials[w.name])
        if complete != w.n_trials:
            raise RuntimeError(f"{w.name}: {complete} complete trials, expected {w.n_trials}")
    starts = [t.datetime_start for _, t in finished if t.datetime_start is not None]
    ends = [t.datetime_complete for _, t in finished if t.datetime_complete is not None]
    span = (max(ends) - min(starts)).total_seconds()
    on_gpus = sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for name, t in finished
        if t.datetime_start and t.datetime_complete and resource_of(name, t) in GPU_RESOURCES
    )
    return Outcome(wall_s, span, on_gpus / (len(GPU_RESOURCES) * span))


def timed(
    runner: Callable[[Path, list[Workload]], dict[str, list[FrozenTrial]]],
    workloads: list[Workload],
) -> tuple[dict[str, list[FrozenTrial]], float]:
    with tempfile.TemporaryDirectory(prefix="campaign-balance-") as folder:
        start = time.perf_counter()
        trials = runner(Path(folder), workloads)
        return trials, time.perf_counter() - start


def ideal_spans(workloads: list[Workload]) -> tuple[float, float]:
    """Trial time alone, no overhead: (static, pooled). The pool spreads the GPU work evenly."""
    work = {w.name: w.n_trials * w.seconds for w in workloads}
    static = max(work.values())
    gpu_work = sum(work[w.name] for w in workloads if w.resource in GPU_RESOURCES)
    cpu_work = max((work[w.name] for w in workloads if w.resource == "cpu"), default=0.0)
    return static, max(gpu_work / len(GPU_RESOURCES), cpu_work)


def parse_workloads() -> tuple[list[Workload], int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xgb-trials", type=int, default=60, help="the large GPU study")
    parser.add_argument("--lgbm-trials", type=int, default=12, help="the small GPU study")
    parser.add_argument("--cat-trials", type=int, default=18, help="the CPU study")
    parser.add_argument("--gpu-trial-seconds", type=float, default=0.4)
    parser.add_argument("--cpu-trial-seconds", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workloads = [
        Workload("xgb", args.xgb_trials, args.gpu_trial_seconds, "gpu0"),
        Workload("lgbm", args.lgbm_trials, args.gpu_trial_seconds, "gpu1"),
        Workload("cat", args.cat_trials, args.cpu_trial_seconds, "cpu"),
    ]
    return workloads, args.repeats


def main() -> None:
    workloads, repeats = parse_workloads()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pinned = static_resources(workloads)
    outcomes: dict[str, list[Outcome]] = {"static": [], "hyperfleet": []}
    for repeat in range(repeats):
        trials, wall = timed(run_static, workloads)  # alternated, so drift hits both alike
        outcomes["static"].append(measure(trials, lambda n, _: pinned[n], wall, workloads))
        trials, wall = timed(run_hyperfleet, workloads)
        outcomes["hyperfleet"].append(
            measure(trials, lambda _, t: hyperfleet_resource(t), wall, workloads)
        )
        print(
            f"repeat {repeat + 1}: static {outcomes['static'][-1].wall_s:.1f} s, "
            f"hyperfleet {outcomes['hyperfleet'][-1].wall_s:.1f} s",
            flush=True,
        )
    report(workloads, repeats, outcomes)


def report(workloads: list[Workload], repeats: int, outcomes: dict[str, list[Outcome]]) -> None:
    budgets = ", ".join(f"{w.name} {w.n_trials} x {w.seconds:g} s" for w in workloads)
    static_ideal, pooled_ideal = ideal_spans(workloads)
    print(f"budgets (the defaults are unequal on purpose; the ratio depends on them): {budgets}")
    print("static: xgb on gpu0, lgbm on gpu1, cat on the CPU, one process each")
    print("hyperfleet: one campaign, 2 fake GPUs (slot = { gpus = 1 }) + 1 CPU slot")
    print(
        f"trial time alone: static {static_ideal:.1f} s, pooled {pooled_ideal:.1f} s "
        f"({static_ideal / pooled_ideal:.2f}x); median of {repeats}:"
    )
    static_wall = statistics.median(o.wall_s for o in outcomes["static"])
    print(f"{'runner':<12}{'wall s':>8}{'span s':>8}{'GPU busy':>10}{'static/this':>13}")
    for name, runs in outcomes.items():
        wall = statistics.median(o.wall_s for o in runs)
        span = statistics.median(o.span_s for o in runs)
        busy = statistics.median(o.gpu_busy for o in runs)
        print(f"{name:<12}{wall:>8.1f}{span:>8.1f}{busy:>9.0%}{static_wall / wall:>12.2f}x")


if __name__ == "__main__":
    main()
