"""A worker holds the data of the studies it runs now, not of every study that may use its slot:
in a sequential campaign, each stage's factory is loaded when the stage starts and its data set
is released when the stage is done; a later stage whose objective cannot load stops alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.procs import campaign_files, load_trials, run_cli

MEGABYTES = 64  # each data set

OBJECTIVE = """
import numpy as np
import psutil


def make_objective(megabytes):
    data = np.ones(megabytes * 2**20 // 8)  # touched: every page is resident

    def objective(trial):
        trial.suggest_float("x", 0.0, 1.0)
        return psutil.Process().memory_info().rss / 2**20 + float(data[:1].sum()) * 0

    return objective
"""

CAMPAIGN = f"""
    [campaign]
    name = "memory"
    sequential = true

    [pool]
    cpu_slots = 1

    [defaults]
    objective = "objective.py:make_objective"
    slot = "cpu"
    sampler = "random"
    n_trials = 2

    [[study]]
    name = "baseline"
    args = {{ megabytes = 0 }}

    [[study]]
    name = "set-{{dataset}}"
    matrix = {{ dataset = ["a", "b", "c"] }}
    args = {{ megabytes = {MEGABYTES} }}
"""


def test_a_worker_holds_only_the_data_set_of_the_stage_it_runs(tmp_path: Path) -> None:
    campaign_files(tmp_path, CAMPAIGN, OBJECTIVE)
    done = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "memory"
    # Each trial measured its worker's resident memory; one worker ran them all (one slot).
    rss = {
        study: max(t.value for t in load_trials(run_dir, study) if t.value is not None)
        for study in ("baseline", "set-a", "set-b", "set-c")
    }
    for study in ("set-a", "set-b", "set-c"):
        # One data set above the worker's own memory; all three would be 3 x 64 MB.
        extra = rss[study] - rss["baseline"]
        assert MEGABYTES * 0.8 < extra < MEGABYTES * 1.5, (study, rss)


BROKEN_LATER = """
    [campaign]
    name = "later"
    sequential = SEQUENTIAL

    [pool]
    cpu_slots = 1

    [defaults]
    objective = "objective.py:make_objective"
    slot = "cpu"
    n_trials = 2

    [[study]]
    name = "fine"
    args = { megabytes = 0 }

    [[study]]
    name = "broken"
    args = { wrong = 1 }

    [[study]]
    name = "after"
    args = { megabytes = 0 }
"""


@pytest.mark.parametrize("sequential", ["true", "false"])
def test_a_study_whose_objective_cannot_load_stops_alone(tmp_path: Path, sequential: str) -> None:
    # In a sequential run the broken study is a later stage; in a parallel one the first trial
    # starts as soon as one study has loaded, and the broken one fails while the others run.
    campaign_files(tmp_path, BROKEN_LATER.replace("SEQUENTIAL", sequential), OBJECTIVE)
    done = run_cli(["run", "campaign.toml", "--plain", "--no-report"], tmp_path, 120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "study broken stopped: its objective" in done.stdout
    assert "unexpected keyword argument 'wrong'" in done.stdout
    run_dir = tmp_path / "runs" / "later"
    for study in ("fine", "after"):  # the stages before and after it ran their trials
        assert [t.state.name for t in load_trials(run_dir, study)] == ["COMPLETE", "COMPLETE"]
    assert load_trials(run_dir, "broken") == []
