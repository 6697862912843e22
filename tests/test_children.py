"""A process a trial starts ends with the trial, however it was started and however the trial
ends: in the worker's process group or not, orphaned or not; returned, raised, pruned, crashed,
timed out, interrupted, or with the controller killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState

from support.procs import (
    HERE,
    assert_no_leftovers,
    cli_command,
    cpu_only_env,
    load_trials,
    processes_of_run,
    run_cli,
    wait_until,
)

OBJECTIVE = f"{HERE.parent / 'objectives' / 'children.py'}:leaves_a_child"


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "run"
    yield folder
    # A failing test must not leave its sleepers behind for the next five minutes.
    for line in processes_of_run(folder):
        with contextlib.suppress(psutil.Error):
            psutil.Process(int(line.split(":")[0])).kill()


def _args(run_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return [
        "run", OBJECTIVE, "--n-trials", str(n_trials), "--cpu-slots", "1",
        "--run-dir", str(run_dir), "--study-name", "s", "--plain", "--no-report", *extra,
    ]  # fmt: skip


def _env(how: str, end: str) -> dict[str, str]:
    return {**cpu_only_env(), "CHILD_HOW": how, "CHILD_END": end}


@pytest.mark.parametrize("how", ["group", "session", "orphan"])
def test_the_next_trial_in_the_worker_finds_the_earlier_child_gone(how: str, run_dir: Path) -> None:
    done = run_cli(_args(run_dir, 2), run_dir.parent, env=_env(how, "returns"))

    assert done.returncode == 0, done.stderr
    trials = load_trials(run_dir, "s")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    # One slot, one worker: trial 1 ran where trial 0 left its child, and found it gone.
    assert [t.value for t in trials] == [0.0, 0.0]
    assert_no_leftovers(run_dir, timeout=5)


@pytest.mark.parametrize(
    ("how", "end", "extra"),
    [
        ("session", "raises", ()),
        ("session", "prunes", ()),
        ("session", "exits", ()),
        ("orphan", "exits", ()),
        ("session", "hangs", ("--trial-timeout", "1s", "--kill-grace", "1s")),
    ],
)
def test_a_detached_child_ends_however_the_trial_ends(
    how: str, end: str, extra: tuple[str, ...], run_dir: Path
) -> None:
    done = run_cli(_args(run_dir, 1, *extra), run_dir.parent, env=_env(how, end))

    trials = load_trials(run_dir, "s")
    assert len(trials) == 1 and trials[0].state != TrialState.COMPLETE, done.stderr
    assert (run_dir / "trials" / "00000" / "child.pid").exists()
    assert_no_leftovers(run_dir, timeout=5)


def _start_hanging_run(run_dir: Path, how: str, *extra: str) -> subprocess.Popen[bytes]:
    controller = subprocess.Popen(
        cli_command(*_args(run_dir, 1, *extra)),
        cwd=run_dir.parent,
        env=_env(how, "hangs"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = run_dir / "trials" / "00000" / "child.pid"
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, "the trial's child")
    return controller


@pytest.mark.parametrize("how", ["session", "orphan"])
def test_a_detached_child_ends_when_the_controller_is_killed(how: str, run_dir: Path) -> None:
    controller = _start_hanging_run(run_dir, how)
    os.kill(controller.pid, signal.SIGKILL)
    controller.wait()

    assert_no_leftovers(run_dir, timeout=5)


def test_a_detached_child_ends_when_the_run_is_stopped(run_dir: Path) -> None:
    controller = _start_hanging_run(run_dir, "session", "--stop-grace", "1s", "--kill-grace", "1s")
    os.kill(controller.pid, signal.SIGTERM)

    assert controller.wait(timeout=30) == 130
    first = load_trials(run_dir, "s")[0]
    assert first.system_attrs["hyperfleet:fail_kind"] == "interrupted"
    assert_no_leftovers(run_dir, timeout=5)
