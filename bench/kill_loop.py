"""Kill the controller with SIGKILL at random moments, restart it each time, check nothing is lost.

    python bench/kill_loop.py --kills 200 --n-trials 300

Each round starts ``hyperfleet run`` on the same run directory, waits for a random number of new
trial completions (0 to --max-wait, from a seeded generator; every other round, the start of a
repeated trial if that comes first), kills the controller with SIGKILL,
and checks that every worker and every process the objective started is gone within a few
seconds. After the last kill the command runs to the end. Then the study and the objective's
log must show: exactly N completed trials, every failure an interrupted one that was repeated
with the same parameters, and no completed trial run twice.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path[:0] = [str(HERE), str(TESTS)]  # common (also when the tests load this file), support
from common import final_run, kill_round, wait_for  # noqa: E402

from support.procs import cpu_only_env, load_trials, processes_of_run  # noqa: E402

OBJECTIVE = TESTS / "support" / "objectives.py"
RETRY_ATTR = "hyperfleet.retry_of"
KIND_ATTR = "hyperfleet:fail_kind"
STUDY = "killed"


@dataclass
class Report:
    kills: int = 0
    rounds: int = 0
    trials: int = 0
    complete: int = 0
    interrupted: int = 0
    longest_chain: int = 0  # most interruptions of one trial's parameters in a row
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def command(run_dir: Path, n_trials: int, slots: int, sampler: str = "auto") -> list[str]:
    return [
        sys.executable,
        "-m",
        "hyperfleet.app.cli",
        "run",
        f"{OBJECTIVE}:short_and_logged",
        "--run-dir",
        str(run_dir),
        "--study-name",
        STUDY,
        "--n-trials",
        str(n_trials),
        "--cpu-slots",
        str(slots),
        # The random sampler's trials are prepared while the slot before runs, and sent before
        # their start is on disk (see hyperfleet.controller.prepared): kills hit that too.
        "--sampler",
        sampler,
        # No retry rule: interrupted trials must be repeated however often they are interrupted.
        "--quiet",
        "--no-report",
    ]


def environment(folder: Path) -> dict[str, str]:
    return {**cpu_only_env(), "TEST_FOLDER": str(folder)}


def completions(folder: Path) -> int:
    try:
        return (folder / "log").read_text().count("end ")
    except FileNotFoundError:
        return 0


def repeats_started(folder: Path) -> int:
    """How many "start" lines repeat the parameters of an earlier one (a retry starting)."""
    try:
        lines = (folder / "log").read_text().splitlines()
    except FileNotFoundError:
        return 0
    params = [line.split()[2] for line in lines if line.startswith("start ")]
    return len(params) - len(set(params))


def one_round(
    cmd: list[str],
    env: dict[str, str],
    folder: Path,
    rng: random.Random,
    max_wait: int,
    at_repeat: bool = False,
) -> tuple[bool, str]:
    """Start the controller, wait for some completions, SIGKILL it. (killed, problem).

    With ``at_repeat``, kill as soon as a repeat of an interrupted trial starts, if one does
    first: a repeat interrupted in its turn must be repeated again."""
    wanted = completions(folder) + rng.randint(0, max_wait)
    repeats = repeats_started(folder) + 1 if at_repeat else None

    def reached_kill_point() -> bool:
        if repeats is not None and repeats_started(folder) >= repeats:
            return True
        return completions(folder) >= wanted

    return kill_round(cmd, env, reached_kill_point)


def check(trials: list[FrozenTrial], log: str, n_trials: int) -> list[str]:
    """Everything the issue promises about a run that was killed many times."""
    problems = []
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) != n_trials:
        problems.append(f"{len(complete)} complete trials, expected {n_trials}")
    leftover = [t.number for t in trials if t.state not in (TrialState.COMPLETE, TrialState.FAIL)]
    if leftover:
        problems.append(f"trials neither complete nor failed: {leftover}")
    repeats = {int(t.user_attrs[RETRY_ATTR]): t for t in trials if RETRY_ATTR in t.user_attrs}
    for trial in trials:
        if trial.state == TrialState.FAIL:
            if trial.system_attrs.get(KIND_ATTR) != "interrupted":
                problems.append(f"trial {trial.number} failed: {trial.system_attrs}")
            if trial.number not in repeats:
                problems.append(f"interrupted trial {trial.number} was not repeated")
            elif not _same_params(repeats[trial.number], intended(trial, trials)):
                problems.append(f"the repeat of trial {trial.number} has other parameters")
        if trial.state == TrialState.COMPLETE and trial.number in repeats:
            problems.append(f"completed trial {trial.number} was repeated")
    starts = Counter(line.split()[1] for line in log.splitlines() if line.startswith("start "))
    twice = [n for n, count in starts.items() if count > 1]
    if twice:
        problems.append(f"trial numbers started twice: {twice}")
    for trial in complete:
        line = f"end {trial.number} {trial.params['x']!r}"
        if line not in log.splitlines():
            problems.append(f"completed trial {trial.number} has no matching end line")
    if len({t.params["x"] for t in complete}) != len(complete):
        problems.append("two completed trials share their parameters")
    return problems


def intended(trial: FrozenTrial, trials: list[FrozenTrial]) -> dict[str, object]:
    """The parameters a trial repeats: its own, or, if it was killed before its first suggest,
    those of the trial it repeats (empty for a first attempt killed that early)."""
    if trial.params or RETRY_ATTR not in trial.user_attrs:
        return dict(trial.params)
    return intended(trials[int(trial.user_attrs[RETRY_ATTR])], trials)


def chain_length(trial: FrozenTrial, trials: list[FrozenTrial]) -> int:
    """How many earlier attempts this trial repeats (2: a repeat of a repeat)."""
    count = 0
    while RETRY_ATTR in trial.user_attrs:
        trial, count = trials[int(trial.user_attrs[RETRY_ATTR])], count + 1
    return count


def _same_params(repeat: FrozenTrial, wanted: dict[str, object]) -> bool:
    # A repeat killed before its first suggest has no params yet; its own repeat is checked.
    return not wanted or not repeat.params or repeat.params == wanted


def kill_loop(
    folder: Path,
    kills: int,
    n_trials: int,
    slots: int = 2,
    seed: int = 0,
    max_wait: int = 4,
    sampler: str = "auto",
) -> Report:
    started = time.monotonic()
    rng = random.Random(seed)
    run_dir = folder / "run"
    cmd, env = command(run_dir, n_trials, slots, sampler), environment(folder)
    report = Report()
    while report.kills < kills:
        report.rounds += 1
        # Every other round aims at the repeat the round before may have left to run.
        at_repeat = report.rounds % 2 == 0
        killed, problem = one_round(cmd, env, folder, rng, max_wait, at_repeat)
        report.kills += killed
        if problem:
            report.problems.append(f"round {report.rounds}: {problem}")
        if not killed:
            break  # the budget was reached before the planned kills
    if problem := final_run(cmd, env):
        report.problems.append(problem)
    if not wait_for(lambda: not processes_of_run(run_dir), 10):
        report.problems.append("workers left after the final run")
    trials = load_trials(run_dir, STUDY)
    report.problems += check(trials, (folder / "log").read_text(), n_trials)
    report.trials = len(trials)
    report.complete = sum(t.state == TrialState.COMPLETE for t in trials)
    report.interrupted = sum(t.state == TrialState.FAIL for t in trials)
    report.longest_chain = max((chain_length(t, trials) for t in trials), default=0)
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--n-trials", type=int, default=300)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-wait", type=int, default=4, help="most completions between kills")
    parser.add_argument("--sampler", default="auto", help="as hyperfleet run --sampler")
    parser.add_argument("--folder", type=Path, help="where to put the run (default: a temp dir)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="kill-loop-"))
    folder.mkdir(parents=True, exist_ok=True)
    report = kill_loop(
        folder, args.kills, args.n_trials, args.slots, args.seed, args.max_wait, args.sampler
    )
    print(json.dumps({**report.__dict__, "folder": str(folder)}, indent=2))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
