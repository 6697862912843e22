"""A study's time budget is its own clock, kept with the study in the storage: a sequential
campaign stopped in its second stage and run again gives the finished first stage nothing more,
and the second stage only what it had left."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from support.procs import (
    campaign_files,
    cli_command,
    cpu_only_env,
    load_trials,
    run_cli,
    signal_when,
)

TIMEOUT = 1.5  # each study's time budget, seconds
TRIAL_SECONDS = 0.1

OBJECTIVE = f"""
import time
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def make_objective(study):
    def objective(trial):
        (FOLDER / f"started-{{study}}").touch()
        time.sleep({TRIAL_SECONDS})
        return trial.suggest_float("x", 0.0, 1.0)

    return objective
"""

CAMPAIGN = f"""
    [campaign]
    name = "timed"
    sequential = true

    [pool]
    cpu_slots = 1

    [defaults]
    objective = "objective.py:make_objective"
    slot = "cpu"
    sampler = "random"
    timeout = {TIMEOUT}
    n_trials = 1000

    [[study]]
    name = "first"
    args = {{ study = "first" }}

    [[study]]
    name = "second"
    args = {{ study = "second" }}
"""
RUN = ["run", "campaign.toml", "--plain", "--no-report"]


def time_used(run_dir: Path, study: str) -> float:
    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    study_id = storage.get_study_id_from_name(study)
    return float(storage.get_study_system_attrs(study_id)["hyperfleet:time_used"])


def finished(run_dir: Path, study: str) -> int:
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in states for t in load_trials(run_dir, study))


def test_a_resumed_sequential_campaign_keeps_each_studys_time_budget(tmp_path: Path) -> None:
    campaign_files(tmp_path, CAMPAIGN, OBJECTIVE)
    run_dir = tmp_path / "runs" / "timed"
    with (tmp_path / "first.out").open("w") as out:
        first_run = subprocess.Popen(
            cli_command(*RUN), cwd=tmp_path, env=cpu_only_env(), stdout=out, stderr=out
        )
        second = tmp_path / "started-second"
        # SIGINT: the running trial finishes, nothing starts.
        signal_when(first_run, signal.SIGINT, second.exists, "the second stage")
    first_trials = finished(run_dir, "first")
    first_time = time_used(run_dir, "first")
    # The first study ran until its clock reached the budget, plus the trial running then.
    assert TIMEOUT <= first_time < TIMEOUT + 1.0
    second_time = time_used(run_dir, "second")
    assert 0 < second_time < TIMEOUT

    again = run_cli(RUN, tmp_path, 90)
    assert again.returncode == 0, again.stdout + again.stderr
    assert finished(run_dir, "first") == first_trials  # a finished study stays finished
    assert time_used(run_dir, "first") == first_time
    assert "study first: " in again.stdout and "nothing left to run" in again.stdout
    line = next(x for x in again.stdout.splitlines() if "study second: " in x)
    assert "used already, this run adds up to" in line and "of 1.5s" in line
    # The second study got only what it had left: its clock across both runs ends just past
    # the budget, by at most the trial that was running when it was reached.
    assert TIMEOUT <= time_used(run_dir, "second") < TIMEOUT + 1.0
