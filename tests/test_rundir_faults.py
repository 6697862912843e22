"""What goes wrong around the run folder ends in one clear line, never a traceback.

A full disk and a deleted run folder stop a running search (exit status 1: the input was fine,
the run failed); names that cannot be folders are refused before anything is written (2).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from support.background import BackgroundRun, started
from support.procs import (
    assert_no_leftovers,
    cpu_only_env,
    load_trials,
    objective,
    run_cli,
    wait_until,
)


def held_search(run_dir: Path, n_trials: int) -> list[str]:
    """A search on one slot whose trials run until the test creates ``release``."""
    return [
        "run", objective("waits_for_release"), "--run-dir", str(run_dir), "--study-name", "s",
        "--n-trials", str(n_trials), "--cpu-slots", "1", "--plain", "--no-report",
    ]  # fmt: skip


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real file system that really fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses: every later write that needs room fails."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_stops_the_run_with_one_line_and_the_next_run_resumes(
    tmp_path: Path, small_disk: Path
) -> None:
    run_dir = small_disk / "run"
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}  # the objective's log: another disk
    run = BackgroundRun(held_search(run_dir, 3), tmp_path, env)
    try:
        wait_until(lambda: started(tmp_path) == 1, 60, "the first trial to start")
        filler = fill(small_disk)
        (tmp_path / "release").touch()  # the trial ends: its result must be written
        assert run.wait() == 1, run.stdout + run.stderr
    finally:
        run.stop()
    line = one_line(run.stderr)
    assert line.startswith("hyperfleet: run failed: the disk is full: cannot write ")
    assert str(run_dir) in line and "run the same command again to resume" in line
    assert_no_leftovers(run_dir)

    filler.unlink()
    again = run_cli(held_search(run_dir, 3), tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    states = [t.state for t in load_trials(run_dir, "s")]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.COMPLETE) == 3
    assert not list(run_dir.rglob("*.tmp"))  # no half-written file was left


def test_a_run_folder_deleted_during_the_run_stops_it_with_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run = BackgroundRun(held_search(run_dir, 2), tmp_path, env)
    try:
        wait_until(lambda: started(tmp_path) == 1, 60, "the first trial to start")
        trash = tmp_path / "trash"
        run_dir.rename(trash)  # gone from its path at once, then deleted
        shutil.rmtree(trash)
        (tmp_path / "release").touch()
        assert run.wait() == 1, run.stdout + run.stderr
    finally:
        run.stop()
    line = one_line(run.stderr)
    assert line == (
        f"hyperfleet: run failed: the run directory {run_dir} was deleted or moved during the "
        "run; run the same command again to start a new one there"
    )
    assert not run_dir.exists()  # not made again, half empty, by the stopping run
    assert_no_leftovers(run_dir)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("x" * 300, "is 300 bytes long, too long for a folder name: use at most 128 bytes"),
        ("../../escape", "cannot hold a slash"),
        ("..", "cannot be '.' or '..'"),
    ],
)
def test_a_study_name_that_cannot_be_a_folder_in_runs_is_refused_before_anything_is_written(
    tmp_path: Path, name: str, problem: str
) -> None:
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    args = ["run", objective("quick"), "--study-name", name, "--n-trials", "1"]
    result = run_cli([*args, "--cpu-slots", "1", "--quiet", "--no-report"], work)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert problem in line and "--study-name" in line
    assert list(tmp_path.rglob("*")) == [tmp_path / "work", work]  # nothing written anywhere


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('[campaign]\nname = ".."\n', "key 'name': the campaign name '..'"),
        (f'[campaign]\nname = "c"\n[defaults]\nname = "{"y" * 300}"\n', "at most 128"),
    ],
)
def test_a_campaign_name_or_study_name_that_cannot_be_a_folder_is_refused(
    tmp_path: Path, table: str, problem: str
) -> None:
    study = f'\n[[study]]\nobjective = "{objective("quick")}"\nslot = "cpu"\nn_trials = 1\n'
    (tmp_path / "campaign.toml").write_text(table + study)
    result = run_cli(["run", "campaign.toml", "--quiet", "--no-report"], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert problem in one_line(result.stderr)
    assert not (tmp_path / "runs").exists()


UNGUARDED = """
    import optuna

    import hyperfleet


    def objective(trial):
        return trial.suggest_float("x", 0.0, 1.0)


    study = optuna.create_study(study_name="unguarded")
    hyperfleet.optimize(study, objective, n_trials=2, cpu_slots=1, run_dir="run", display="quiet")
"""


def test_a_script_that_starts_the_search_when_imported_gets_one_clear_load_failure(
    tmp_path: Path,
) -> None:
    (tmp_path / "search.py").write_text(textwrap.dedent(UNGUARDED).lstrip())
    result = subprocess.run(
        [sys.executable, "search.py"],
        cwd=tmp_path,
        env=cpu_only_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count("Traceback") == 1  # the script's own, in the main process
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "hyperfleet.errors.ObjectiveError: the objective objective could not be loaded: "
        "ObjectiveError: search.py, line 11, calls hyperfleet.optimize when the script is "
        "imported (each worker imports it to find the objective); put the call under "
        '`if __name__ == "__main__":`.'
    )
    assert not (tmp_path / "run").exists()

    # The same script as the command line's target: the worker that imports it refuses.
    args = ["run", "search.py:objective", "--n-trials", "1", "--cpu-slots", "1", "--quiet"]
    by_cli = run_cli([*args, "--run-dir", "by-cli"], tmp_path)
    assert by_cli.returncode == 2, by_cli.stdout + by_cli.stderr
    assert "search.py, line 11, calls hyperfleet.optimize" in one_line(by_cli.stderr)
    assert not (tmp_path / "by-cli").exists()
