"""Trial time wasted by random controller kills, with and without checkpoints.

    python bench/checkpoint_kills.py --kills 10 --n-trials 2 --steps 40 --every 5

Runs ``hyperfleet run tests/objectives/checkpointed.py:counter`` (a training loop of --steps
steps that checkpoints a counter every --every steps) on one run folder, kills the controller
with SIGKILL after a random number of steps (1 to --max-between, from a seeded generator),
starts it again, and after the last kill lets it finish. Then the study and the objective's log
must show: --n-trials completed trials whose intermediate values form one unbroken curve, each
repeat starting from the last step its chain saved, and no more steps run than one checkpoint
interval per kill and slot beyond the minimum. The same kills are then made on an objective that
ignores its checkpoint (``--compare``), which starts every repeat from step 0.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from optuna.trial import FrozenTrial, TrialState

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path[:0] = [str(HERE), str(TESTS)]  # common (also when the tests load this file), support
from common import final_run, kill_round  # noqa: E402

from support.procs import cpu_only_env, load_trials  # noqa: E402

OBJECTIVE = TESTS / "objectives" / "checkpointed.py"
STUDY = "checkpointed"
_LINE = re.compile(r"(attempt|step|saved|stopped) (\d+) (\S+) (.*)")


@dataclass
class Report:
    checkpoints: bool
    kills: int = 0
    steps_needed: int = 0
    steps_run: int = 0
    wasted_steps: int = 0
    wasted_s: float = 0.0
    attempts: int = 0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    n_trials: int = 2
    steps: int = 12
    every: int = 3
    step_seconds: float = 0.05
    slots: int = 1


@functools.cache
def _objective_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("checkpointed_objective", OBJECTIVE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def curve(x: float, step: int) -> float:
    """What the objective reports at ``step``, from the objective's own file."""
    return float(_objective_module().curve(x, step))


def command(run_dir: Path, plan: Plan, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hyperfleet.app.cli", "run", f"{OBJECTIVE}:counter",
        "--run-dir", str(run_dir), "--study-name", STUDY, "--n-trials", str(plan.n_trials),
        "--cpu-slots", str(plan.slots), "--quiet", "--no-report", *extra,
    ]  # fmt: skip


def environment(folder: Path, plan: Plan, checkpoints: bool) -> dict[str, str]:
    env = cpu_only_env()
    env.update(
        TEST_FOLDER=str(folder),
        CHECKPOINT_STEPS=str(plan.steps),
        CHECKPOINT_EVERY=str(plan.every),
        STEP_SECONDS=str(plan.step_seconds),
        CHECKPOINTS="on" if checkpoints else "off",
    )
    return env


def log_lines(folder: Path) -> list[tuple[str, int, str, str]]:
    """(event, trial number, x, rest) for each line of the objective's log."""
    try:
        text = (folder / "log").read_text()
    except FileNotFoundError:
        return []
    found = (_LINE.fullmatch(line) for line in text.splitlines())
    return [(m[1], int(m[2]), m[3], m[4]) for m in found if m]


def steps_run(folder: Path) -> int:
    return sum(event == "step" for event, *_ in log_lines(folder))


def one_round(
    cmd: list[str], env: dict[str, str], folder: Path, rng: random.Random, max_between: int
) -> tuple[bool, str]:
    """Start the controller, wait for some more steps, SIGKILL it. (killed, problem)."""
    wanted = steps_run(folder) + rng.randint(1, max_between)
    return kill_round(cmd, env, lambda: steps_run(folder) >= wanted)


def check(trials: list[FrozenTrial], folder: Path, plan: Plan, checkpoints: bool) -> list[str]:
    """Every completed trial's curve is whole; with checkpoints, each repeat started where its
    chain's last checkpoint said and all its attempts shared one folder."""
    problems = []
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) != plan.n_trials:
        problems.append(f"{len(complete)} complete trials, expected {plan.n_trials}")
    for trial in complete:
        x = trial.params["x"]
        expected = {step: curve(x, step) for step in range(plan.steps)}
        if trial.intermediate_values != expected:
            problems.append(f"trial {trial.number}'s curve: {trial.intermediate_values}")
    if checkpoints:
        problems += _check_resumes(log_lines(folder))
    return problems


def _check_resumes(lines: list[tuple[str, int, str, str]]) -> list[str]:
    problems = []
    saved: dict[str, int] = defaultdict(int)  # by x: the chain's last saved step
    ran: dict[str, int] = defaultdict(int)  # by x: steps it ran so far
    folders: dict[str, str] = {}
    for event, number, x, rest in lines:
        if event in ("saved", "stopped"):
            saved[x] = int(rest)
        elif event == "step":
            ran[x] = int(rest) + 1
        elif event == "attempt":
            where, _, start = rest.rpartition(" from ")
            if folders.setdefault(x, where) != where:
                problems.append(f"trial {number} got {where}, its chain {folders[x]}")
            # A kill between a save and its log line leaves the log one save behind.
            if not saved[x] <= int(start) <= max(saved[x], ran[x]):
                problems.append(f"trial {number} started at {start}, saved {saved[x]}")
    return problems


def kill_loop(
    folder: Path,
    kills: int,
    plan: Plan,
    checkpoints: bool = True,
    seed: int = 0,
    max_between: int = 5,
) -> Report:
    started = time.monotonic()
    rng = random.Random(seed)
    run_dir = folder / "run"
    cmd, env = command(run_dir, plan), environment(folder, plan, checkpoints)
    report = Report(checkpoints=checkpoints)
    while report.kills < kills:
        killed, problem = one_round(cmd, env, folder, rng, max_between)
        report.kills += killed
        if problem:
            report.problems.append(f"kill {report.kills}: {problem}")
        if not killed:
            break  # the budget was reached before the planned kills
    if problem := final_run(cmd, env):
        report.problems.append(problem)
    trials = load_trials(run_dir, STUDY)
    report.problems += check(trials, folder, plan, checkpoints)
    report.steps_needed = plan.n_trials * plan.steps
    report.steps_run = steps_run(folder)
    report.wasted_steps = report.steps_run - report.steps_needed
    report.wasted_s = round(report.wasted_steps * plan.step_seconds, 2)
    report.attempts = len(trials)
    bound = report.kills * plan.slots * plan.every
    if checkpoints and report.wasted_steps > bound:
        report.problems.append(f"{report.wasted_steps} steps wasted, more than {bound}")
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--n-trials", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--step-seconds", type=float, default=0.1)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--max-between", type=int, default=15, help="most steps between kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="also run without checkpoints")
    args = parser.parse_args()
    plan = Plan(args.n_trials, args.steps, args.every, args.step_seconds, args.slots)
    reports = []
    for checkpoints in (True, False) if args.compare else (True,):
        folder = Path(tempfile.mkdtemp(prefix="checkpoint-kills-"))
        report = kill_loop(folder, args.kills, plan, checkpoints, args.seed, args.max_between)
        reports.append(report)
    print(json.dumps([r.__dict__ for r in reports], indent=2))
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
