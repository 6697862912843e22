"""A campaign loses no work when its controller dies: running the same command again finishes it.

Each campaign here runs real workers on fake GPUs (``HYPERFLEET_FAKE_GPUS=2``) and CPU slots.
The objective marks each trial it starts with a file and then holds its slot until the test
creates ``release``, so the test knows exactly which trials were running when it stopped the
controller, without guessing with sleeps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from support.procs import (
    assert_no_leftovers,
    cli_command,
    cpu_only_env,
    load_trials,
    processes_of_run,
    run_cli,
    wait_until,
)

RETRY_OF = "hyperfleet.retry_of"
FAIL_KIND = "hyperfleet:fail_kind"
EXPERIMENT = "experiment"
SOFT_STOP = "Press Ctrl+C again to terminate them"
RUN = ["run", "campaign.toml", "--plain", "--no-report"]

OBJECTIVE = """
import time
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def make_objective(study):
    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        started = FOLDER / "started"
        started.mkdir(exist_ok=True)
        (started / f"{study}-{trial.number}").write_text(repr(x))
        while not (FOLDER / "release").exists():  # hold the slot until the test says so
            time.sleep(0.02)
        return x

    return objective
"""

# Four GPU-share slots (two per fake GPU) and two CPU slots: six trials run at once.
TWO_SHAPES = """
    [campaign]
    name = "resume"

    [pool]
    cpu_slots = 2

    [defaults]
    objective = "objective.py:make_objective"
    sampler = "random"

    [[study]]
    name = "shared"
    args = { study = "shared" }
    slot = { gpus = 0.5 }
    n_trials = 6

    [[study]]
    name = "cores"
    args = { study = "cores" }
    slot = "cpu"
    n_trials = 3
"""
BUDGETS = {"shared": 6, "cores": 3}
SLOTS = 6

NAMED = """
    [campaign]
    name = "named"

    [pool]
    cpu_slots = 2

    [[study]]
    name = "named"
    objective = "objective.py:make_objective"
    args = { study = "named" }
    slot = "cpu"
    sampler = "random"
    n_trials = 4
    experiments = [
        { name = "low", params = { x = 0.125 } },
        { name = "high", params = { x = 0.875 } },
        { name = "middle", params = { x = 0.5 } },
    ]
"""


class Controller:
    """``hyperfleet run campaign.toml`` as a background process whose output goes to a file."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.output_file = folder / "controller.out"
        with self.output_file.open("w") as out:
            self.process = subprocess.Popen(
                cli_command(*RUN), cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def output(self) -> str:
        return self.output_file.read_text()

    def wait_for(self, what: str, condition: Callable[[], object]) -> None:
        """Wait for ``condition()``; fail at once, with the output, if the controller exits."""

        def met() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the controller exited ({self.process.returncode}) before {what}:\n"
                    + self.output
                )
            return bool(condition())

        wait_until(met, 90, what)

    def wait(self) -> int:
        return self.process.wait(timeout=90)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def write_campaign(folder: Path, text: str) -> None:
    (folder / "objective.py").write_text(OBJECTIVE)
    (folder / "campaign.toml").write_text(textwrap.dedent(text))


def fake_gpu_env(count: int) -> dict[str, str]:
    env = cpu_only_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    env["HYPERFLEET_FAKE_GPUS"] = str(count)
    return env


def started(folder: Path) -> set[tuple[str, int]]:
    """(study, trial number) of every trial whose objective has begun."""
    marks = folder / "started"
    if not marks.is_dir():
        return set()
    pairs = (path.name.rsplit("-", 1) for path in marks.iterdir())
    return {(study, int(number)) for study, number in pairs}


def running(run_dir: Path, studies: list[str]) -> set[tuple[str, int]]:
    return {
        (study, trial.number)
        for study in studies
        for trial in load_trials(run_dir, study)
        if trial.state == TrialState.RUNNING
    }


def start_and_fill_every_slot(folder: Path, text: str, slots: int) -> Controller:
    write_campaign(folder, text)
    controller = Controller(folder, fake_gpu_env(2))
    controller.wait_for(f"{slots} trials to start", lambda: len(started(folder)) == slots)
    return controller


def assert_interrupted_then_repeated(
    trials: list[FrozenTrial], interrupted: set[int], budget: int
) -> None:
    """The budget is met by COMPLETE trials; each interrupted trial failed as "interrupted" and
    was run again, once, with its parameters; nothing else failed or is left over."""
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == budget
    assert {t.number for t in by_state[TrialState.FAIL]} == interrupted
    assert all(t.system_attrs[FAIL_KIND] == "interrupted" for t in by_state[TrialState.FAIL])
    assert len(trials) == budget + len(interrupted)  # nothing RUNNING, WAITING or PRUNED
    repeats = [t for t in trials if RETRY_OF in t.user_attrs]
    assert sorted(t.user_attrs[RETRY_OF] for t in repeats) == sorted(interrupted)
    for repeat in repeats:
        assert repeat.state == TrialState.COMPLETE
        assert repeat.params == trials[repeat.user_attrs[RETRY_OF]].params
        assert repeat.params  # the interrupted trial had suggested before it was stopped


def test_sigkill_of_the_controller_mid_campaign_then_running_again_finishes_every_study(
    tmp_path: Path,
) -> None:
    controller = start_and_fill_every_slot(tmp_path, TWO_SHAPES, SLOTS)
    run_dir = tmp_path / "runs" / "resume"
    try:
        assert len(processes_of_run(run_dir)) >= SLOTS  # the leftover check sees the workers
        controller.process.send_signal(signal.SIGKILL)
        assert controller.wait() == -signal.SIGKILL
    finally:
        controller.stop()
    assert_no_leftovers(run_dir)  # the workers and their objectives follow their controller
    interrupted = running(run_dir, list(BUDGETS))
    assert interrupted == started(tmp_path)
    assert {study for study, _ in interrupted} == set(BUDGETS)

    (tmp_path / "release").touch()
    again = run_cli(RUN, tmp_path, 120, fake_gpu_env(2))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "was left running: marked interrupted" in again.stdout
    for study, budget in BUDGETS.items():
        numbers = {number for name, number in interrupted if name == study}
        assert_interrupted_then_repeated(load_trials(run_dir, study), numbers, budget)
        for number in numbers:  # the resume wrote how the dead controller's trials ended
            folder = run_dir / "studies" / study / "trials" / f"{number:05d}"
            result = json.loads((folder / "result.json").read_text())
            assert (result["state"], result["fail_kind"]) == ("FAIL", "interrupted")
            params = json.loads((folder / "params.json").read_text())
            assert params == load_trials(run_dir, study)[number].params
    assert_no_leftovers(run_dir)


def test_two_sigints_stop_a_campaign_hard_and_the_next_run_completes_it(tmp_path: Path) -> None:
    controller = start_and_fill_every_slot(tmp_path, TWO_SHAPES, SLOTS)
    run_dir = tmp_path / "runs" / "resume"
    try:
        controller.process.send_signal(signal.SIGINT)
        controller.wait_for("the soft stop to be announced", lambda: SOFT_STOP in controller.output)
        controller.process.send_signal(signal.SIGINT)
        assert controller.wait() == 130, controller.output
    finally:
        controller.stop()
    assert_no_leftovers(run_dir)
    assert running(run_dir, list(BUDGETS)) == set()
    stopped = {
        (study, t.number)
        for study in BUDGETS
        for t in load_trials(run_dir, study)
        if t.state == TrialState.FAIL
    }
    assert stopped == started(tmp_path)  # the hard stop marked every running trial, no other

    (tmp_path / "release").touch()
    again = run_cli(RUN, tmp_path, 120, fake_gpu_env(2))
    assert again.returncode == 0, again.stdout + again.stderr
    for study, budget in BUDGETS.items():
        numbers = {number for name, number in stopped if name == study}
        assert_interrupted_then_repeated(load_trials(run_dir, study), numbers, budget)


def test_an_interrupted_named_experiment_is_repeated_not_enqueued_again(tmp_path: Path) -> None:
    controller = start_and_fill_every_slot(tmp_path, NAMED, 2)
    run_dir = tmp_path / "runs" / "named"
    try:
        controller.process.send_signal(signal.SIGKILL)
        controller.wait()
    finally:
        controller.stop()
    first = load_trials(run_dir, "named")
    interrupted = {t.number for t in first if t.state == TrialState.RUNNING}
    cut_short = {t.user_attrs[EXPERIMENT] for t in first if t.number in interrupted}
    assert cut_short == {"low", "high"}  # the first two experiments held both slots

    (tmp_path / "release").touch()
    again = run_cli(RUN, tmp_path, 120, fake_gpu_env(2))
    assert again.returncode == 0, again.stdout + again.stderr
    trials = load_trials(run_dir, "named")
    assert_interrupted_then_repeated(trials, interrupted, 4)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    names = [t.user_attrs[EXPERIMENT] for t in complete if EXPERIMENT in t.user_attrs]
    assert sorted(names) == ["high", "low", "middle"]  # each exactly once
    by_name = {t.user_attrs[EXPERIMENT]: t.params for t in complete if EXPERIMENT in t.user_attrs}
    assert by_name == {"low": {"x": 0.125}, "high": {"x": 0.875}, "middle": {"x": 0.5}}
    # The fourth trial of the budget is the sampler's own, not an experiment run twice.
    assert sum(EXPERIMENT not in t.user_attrs for t in complete) == 1
    assert_no_leftovers(run_dir)
