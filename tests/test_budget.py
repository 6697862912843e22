"""The n_trials budget: interrupted trials never count and are always repeated, runs sharing a
storage keep to one budget together, and a run whose budget is reached says so."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from optuna import load_study
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from support.procs import (
    assert_no_leftovers,
    cli_command,
    cpu_only_env,
    load_trials,
    objective,
    run_cli,
    wait_until,
)

RETRY_OF = "hyperfleet.retry_of"
KIND = "hyperfleet:fail_kind"


def _args(run_dir: Path, function: str, n_trials: int, *extra: str) -> list[str]:
    return [
        "run", objective(function), "--run-dir", str(run_dir), "--study-name", "s",
        "--n-trials", str(n_trials), "--cpu-slots", "1", "--plain", "--no-report", *extra,
    ]  # fmt: skip


def _kill_when_logged(args: list[str], env: dict[str, str], folder: Path, line: str) -> None:
    """Start the controller, SIGKILL it once the objective logged ``line``."""
    proc = subprocess.Popen(
        cli_command(*args), cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_until(
            lambda: line in _log(folder) or proc.poll() is not None, 60, f"{line!r} in the log"
        )
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _log(folder: Path) -> str:
    path = folder / "log"
    return path.read_text() if path.exists() else ""


def test_a_repeat_that_is_interrupted_again_is_repeated_again(tmp_path: Path) -> None:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run_dir = tmp_path / "run"
    args = _args(run_dir, "waits_for_release", 1)
    _kill_when_logged(args, env, tmp_path, "start 0 ")
    assert_no_leftovers(run_dir)
    _kill_when_logged(args, env, tmp_path, "start 1 ")  # the repeat of trial 0, killed too
    assert_no_leftovers(run_dir)
    (tmp_path / "release").touch()

    result = run_cli(args, tmp_path, env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(run_dir, "s")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert [t.system_attrs.get(KIND) for t in trials[:2]] == ["interrupted", "interrupted"]
    assert [t.user_attrs.get(RETRY_OF) for t in trials] == [None, 0, 1]
    assert trials[0].params == trials[1].params == trials[2].params
    assert_no_leftovers(run_dir)


def test_runs_sharing_a_storage_keep_to_one_budget(tmp_path: Path) -> None:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    storage = tmp_path / "shared.journal"
    runs = [
        subprocess.Popen(
            cli_command(*_args(tmp_path / name, "short_and_logged", 10, "--storage", str(storage))),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("first", "second")
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    study = load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(storage))))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    # Two runs that each look at the budget just before the other's next trial is written can
    # both start one; never more.
    assert 10 <= len(complete) <= 11, len(complete)
    assert any("trials of other runs on the same storage count too" in o for o in outputs)


def test_a_run_whose_budget_is_reached_says_so_and_starts_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_cli(_args(run_dir, "quick", 3), tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    for log in (run_dir / "workers").iterdir():
        log.unlink()  # a worker started again would write its log here
    records = {name: (run_dir / name).read_bytes() for name in ("status.json", "summary.md")}

    again = run_cli(_args(run_dir, "quick", 3), tmp_path)

    assert again.returncode == 0, again.stdout + again.stderr
    assert "the study already has 3 of its 3 trials: nothing to run" in again.stdout
    assert len(load_trials(run_dir, "s")) == 3
    assert list((run_dir / "workers").iterdir()) == []
    # It claims no slot, and the real run's record (its slots, busy time) stays.
    assert " slots: " not in again.stdout and "run s in" not in again.stdout
    assert {name: (run_dir / name).read_bytes() for name in records} == records
