"""What users meet in a run folder and on the screen: trial folders listed in order (old names
still read), the workers' own logs, a summary and a status that read well when nothing
completed, and ``--cmd "python ..."`` run with hyperfleet's own interpreter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import optuna

from hyperfleet.objective.command import with_this_python
from hyperfleet.report.best import write_best
from hyperfleet.store.rundir import RunDir
from support.procs import cpu_only_env, run_cli

FAILING = """
print("loading the data set")


def objective(trial):
    trial.suggest_float("x", 0.0, 1.0)
    raise ValueError("no luck")
"""


def test_a_run_where_nothing_completed_reads_well_everywhere(tmp_path: Path) -> None:
    (tmp_path / "objective.py").write_text(FAILING)
    args = ["run", "objective.py:objective", "--n-trials", "1", "--cpu-slots", "1"]
    done = run_cli([*args, "--run-dir", "run", "--plain", "--no-report"], tmp_path, 120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 complete, 0 pruned, 1 failed; no trial completed" in done.stdout
    assert "None" not in done.stdout

    run_dir = tmp_path / "run"
    assert [p.name for p in (run_dir / "trials").iterdir()] == ["00000"]
    worker_log = (run_dir / "workers" / "cpu-0.log").read_text()
    assert "for slot cpu#0 started" in worker_log
    assert "loading the data set" in worker_log
    assert "trial 0 of objective-objective started" in worker_log
    assert "trial 0 ended: error ValueError" in worker_log

    status = run_cli(["status", str(run_dir)], tmp_path, 60)
    assert "cpu#0" in status.stdout and "% busy, 1 trial" in status.stdout
    assert "1 trials" not in status.stdout


def test_trial_folders_sort_in_order_and_old_names_are_still_read(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.trial_dir(7).name == "00007" and run_dir.trial_dir(123456).name == "123456"
    old = run_dir.path / "trials" / "7"
    old.mkdir(parents=True)
    (old / "model.txt").write_text("from an older run")
    assert run_dir.existing_trial_dir(7) == old
    assert run_dir.existing_trial_dir(8) == run_dir.trial_dir(8)
    names = [run_dir.trial_dir(n).name for n in (2, 10, 100)]
    assert sorted(names) == names

    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5})
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    best = study.best_trial
    best_folder = write_best(run_dir, study, [best])
    described = json.loads((best_folder / "best.json").read_text())
    assert described["trial_folder"] == "trials/00000"  # trial 0 has no older folder
    old_zero = run_dir.path / "trials" / "0"
    old.rename(old_zero)
    write_best(run_dir, study, [best])
    described = json.loads((best_folder / "best.json").read_text())
    assert described["trial_folder"] == "trials/0"
    assert (best_folder / "model.txt").read_text() == "from an older run"


TRAIN = """
import json
import hyperfleet  # installed only where hyperfleet runs, not for the `python` on PATH

print(json.dumps({"value": 1.0}))
"""


def test_a_python_command_runs_with_hyperfleets_interpreter(tmp_path: Path) -> None:
    assert with_this_python(["python", "train.py"]) == [sys.executable, "train.py"]
    assert with_this_python(["python3.12", "-u"]) == [sys.executable, "-u"]
    assert with_this_python(["pythonista", "x"]) == ["pythonista", "x"]
    assert with_this_python(["/usr/bin/python3"]) == ["/usr/bin/python3"]

    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "space.toml").write_text('[params.x]\ntype = "float"\nlow = 0.0\nhigh = 1.0\n')
    wrong = tmp_path / "bin"
    wrong.mkdir()
    (wrong / "python").write_text("#!/bin/sh\necho 'the wrong python' >&2\nexit 3\n")
    (wrong / "python").chmod(0o755)
    env = {**cpu_only_env(), "PATH": f"{wrong}{os.pathsep}{os.environ['PATH']}"}
    command = ["run", "--cmd", "python train.py", "--space", "space.toml", "--n-trials", "2"]
    done = run_cli([*command, "--cpu-slots", "1", "--plain", "--no-report"], tmp_path, 120, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 complete, 0 pruned, 0 failed" in done.stdout
