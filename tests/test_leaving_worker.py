"""A trial is never given to a worker that is leaving (its objective failed to load, or auto
packing retired it): such a worker exits without running it, and the trial would fail as a
crash of its own and count. A trial that never reached its worker runs again; a send to a
worker whose connection is already closed does not stop the controller."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from types import SimpleNamespace

from hyperfleet.controller.outbox import send
from hyperfleet.workers.protocol import RunTrial, StudyInfo
from support.procs import campaign_files, cpu_only_env, load_trials, run_cli

# "broken" fails to load on the slot's worker, which holds "fine" already. The worker then stays
# (at exit) until the controller has started a trial on its slot after saying that broken
# stopped, or for a few seconds: what the controller does while the worker is leaving decides
# the test, not how fast the worker exits.
OBJECTIVE = """
import atexit
import os
import time
from pathlib import Path


def make_fine(scale):
    return lambda trial: scale * trial.suggest_float("x", 0.0, 1.0)


def make_broken(scale):
    atexit.register(_leave_once_a_trial_was_given_here)
    raise RuntimeError("this study's objective cannot load here")


def _leave_once_a_trial_was_given_here():
    log = Path(os.environ["TEST_FOLDER"], "runs", "leaving", "run.log")
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        text = log.read_text()
        stopped = text.find("study broken stopped")
        if stopped >= 0 and " started on " in text[stopped:]:
            return
        time.sleep(0.02)
"""

CAMPAIGN = """
    [campaign]
    name = "leaving"

    [pool]
    cpu_slots = 1

    [defaults]
    slot = "cpu"
    sampler = "random"
    args = { scale = 1 }
    n_trials = 2

    [[study]]
    name = "fine"
    objective = "objective.py:make_fine"

    [[study]]
    name = "broken"
    objective = "objective.py:make_broken"
"""


def test_a_worker_whose_load_failed_gets_no_trial_of_another_study(tmp_path: Path) -> None:
    campaign_files(tmp_path, CAMPAIGN, OBJECTIVE)
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    done = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 120, env)
    assert done.returncode == 1, done.stdout + done.stderr  # a study could not run
    assert "study broken stopped: its objective" in done.stdout
    run_dir = tmp_path / "runs" / "leaving"
    trials = load_trials(run_dir, "fine")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], done.stdout
    assert "exited with status 0" not in done.stdout


def test_a_send_to_a_closed_worker_connection_is_not_an_error() -> None:
    # The worker's exit was handled (its connection closed) before its trial's send, which
    # waits for the trial's start to be committed.
    ours, theirs = multiprocessing.Pipe()
    ours.close()
    theirs.close()
    message = RunTrial("s", 0, "trial", None, StudyInfo("s", ("MINIMIZE",)))
    assert send(SimpleNamespace(conn=ours), message) is False
