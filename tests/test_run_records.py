"""What a run's records say about its trials: an interrupted trial is counted as interrupted,
not failed, and ends when it stopped rather than at the resume; summary.md's and ``hyperfleet
status``'s busy share of a slot is the report's."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

from hyperfleet.app.status import status
from hyperfleet.display.events import summary_lines
from hyperfleet.display.runstate import RunState, StudyView
from hyperfleet.report import tables
from hyperfleet.report.best import state_counts
from hyperfleet.report.campaign import study_row
from hyperfleet.store import schema
from support.procs import (
    assert_no_leftovers,
    cli_command,
    cpu_only_env,
    load_trials,
    objective,
    run_cli,
    wait_until,
)


def _args(run_dir: Path, function: str, n_trials: int, slots: int = 1) -> list[str]:
    return [
        "run", objective(function), "--run-dir", str(run_dir), "--study-name", "s",
        "--n-trials", str(n_trials), "--cpu-slots", str(slots), "--plain", "--no-report",
    ]  # fmt: skip


def _failed(kind: str) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.FAIL, system_attrs={schema.KIND_ATTR: kind})


def test_interrupted_trials_are_counted_apart_from_failed_ones() -> None:
    trials = [
        create_trial(state=TrialState.COMPLETE, value=1.0),
        _failed("interrupted"),
        _failed("interrupted"),
        _failed("error"),
    ]
    counts = state_counts(trials)
    assert (counts["complete"], counts["fail"], counts["interrupted"]) == (1, 1, 2)
    study = optuna.create_study()
    for trial in trials:
        study.add_trial(trial)
    assert study_row(study, study.get_trials()).failed == 1
    state = RunState("r", "/r", studies=[StudyView("s", ("MINIMIZE",), complete=1, failed=1)])
    state.studies[0].interrupted = 2
    assert summary_lines(state)[0].startswith(
        "study s: 1 complete, 0 pruned, 1 failed, 2 interrupted"
    )


def test_a_trial_left_running_ends_when_it_stopped_not_at_the_resume(tmp_path: Path) -> None:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run_dir = tmp_path / "run"
    args = _args(run_dir, "waits_for_release", 2)
    proc = subprocess.Popen(
        cli_command(*args),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "log"
    wait_until(lambda: log.exists() and "start 0" in log.read_text(), 60, "trial 0 to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.time()
    assert_no_leftovers(run_dir)
    (tmp_path / "release").touch()
    resumed = time.time()

    again = run_cli(args, tmp_path, env=env)

    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 complete, 0 pruned, 0 failed, 1 interrupted" in again.stdout
    interrupted = load_trials(run_dir, "s")[0]
    assert schema.is_interrupted(interrupted)
    assert interrupted.datetime_complete.timestamp() >= resumed  # Optuna's: the resume's time
    end = schema.ended_at(interrupted)
    assert end is not None
    assert interrupted.datetime_start <= end and end.timestamp() <= killed
    assert tables.duration_seconds(interrupted) <= killed - interrupted.datetime_start.timestamp()
    summary = (run_dir / "summary.md").read_text()
    assert "| interrupted | 1 |" in summary and "| fail |" not in summary


def test_summary_and_report_give_a_slot_the_same_busy_share(tmp_path: Path) -> None:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run_dir = tmp_path / "run"
    done = run_cli(_args(run_dir, "short_and_logged", 8, slots=2), tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (run_dir / "summary.md").read_text()
    shares = {
        slot: int(share) / 100
        for slot, share in re.findall(r"^\| (cpu#\d) \| \d+ \| [^|]+ \| (\d+)% \|$", summary, re.M)
    }
    report = tables.busy_fractions(load_trials(run_dir, "s"))
    shown = {s["name"]: s["busy_fraction"] for s in status(run_dir)["slots"]}  # hyperfleet status
    assert set(shares) == set(report) == set(shown) == {"cpu#0", "cpu#1"}
    for slot, share in shares.items():
        assert abs(share - report[slot]) <= 0.05, (slot, share, report[slot])
        assert abs(shown[slot] - report[slot]) <= 0.05, (slot, shown[slot], report[slot])
