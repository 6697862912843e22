"""A run directory knows its own trials wherever it goes, and belongs to one study.

Each test drives ``hyperfleet run`` as a real process. ``waits_for_release`` holds its slot
until the test creates ``release`` in the objective's folder, so the test knows which trials
were running when it killed the controller, without guessing with sleeps.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from support.background import BackgroundRun, started
from support.procs import (
    assert_no_leftovers,
    cpu_only_env,
    load_trials,
    objective,
    run_cli,
    wait_until,
)

RUN_MARK = "hyperfleet:run"
FAIL_KIND = "hyperfleet:fail_kind"
RETRY_OF = "hyperfleet.retry_of"


def search_args(run_dir: Path, n_trials: int, slots: int, *extra: str) -> list[str]:
    return [
        "run", objective("waits_for_release"), "--run-dir", str(run_dir), "--study-name", "s",
        "--n-trials", str(n_trials), "--cpu-slots", str(slots), "--plain", "--no-report", *extra,
    ]  # fmt: skip


def objective_env(folder: Path) -> dict[str, str]:
    folder.mkdir(exist_ok=True)
    return {**cpu_only_env(), "TEST_FOLDER": str(folder)}


def kill_with_trials_running(args: list[str], folder: Path, running: int) -> None:
    """Start the search, wait until ``running`` trials hold their slots, then SIGKILL it."""
    run = BackgroundRun(args, folder, objective_env(folder))
    try:
        wait_until(lambda: started(folder) == running, 60, f"{running} trials to start")
        run.kill()
    finally:
        run.stop()


def earlier_study(tmp: Path) -> tuple[Path, Path, optuna.Study]:
    """A run folder to be, and study "s" in a journal beside it, as an earlier run left it."""
    run_dir, journal = tmp / "run", tmp / "old.journal"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    return run_dir, journal, optuna.create_study(study_name="s", storage=storage)


def own_mark(run_dir: Path) -> str:
    """The mark this machine's runs in ``run_dir`` wrote before run folders had an id."""
    return f"{socket.gethostname()}:{run_dir}"


def quick_on(journal: Path, run_dir: Path, n_trials: int, view: str) -> list[str]:
    return [
        "run", objective("quick"), "--run-dir", str(run_dir), "--storage", str(journal),
        "--study-name", "s", "--n-trials", str(n_trials), "--cpu-slots", "1", view, "--no-report",
    ]  # fmt: skip


def journal_trials(path: Path) -> list[FrozenTrial]:
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name="s", storage=storage).get_trials()


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_killed_run_resumed_from_a_moved_or_copied_folder_repeats_its_running_trials(
    tmp_path: Path, how: str
) -> None:
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere" / "run"
    kill_with_trials_running(search_args(first, 3, 2), tmp_path, running=2)
    assert_no_leftovers(first)
    elsewhere.parent.mkdir()
    if how == "moved":
        first.rename(elsewhere)
    else:
        shutil.copytree(first, elsewhere, symlinks=True)

    (tmp_path / "release").touch()
    again = run_cli(search_args(elsewhere, 3, 2), tmp_path, env=objective_env(tmp_path))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("was left running: marked interrupted") == 2
    trials = load_trials(elsewhere, "s")
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.COMPLETE) == 3  # the budget, exactly
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.number for t in interrupted} == {0, 1}
    assert all(t.system_attrs[FAIL_KIND] == "interrupted" for t in interrupted)
    repeats = {t.user_attrs[RETRY_OF]: t for t in trials if RETRY_OF in t.user_attrs}
    assert sorted(repeats) == [0, 1]
    for number, repeat in repeats.items():
        assert repeat.state == TrialState.COMPLETE
        assert repeat.params == trials[number].params
    assert_no_leftovers(elsewhere)


def test_a_resume_leaves_the_running_trials_of_another_run_folder_on_the_same_storage(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared.journal"
    first_dir, other_dir = tmp_path / "run-a", tmp_path / "run-b"
    first, other = tmp_path / "a", tmp_path / "b"  # each run's objective folder
    first.mkdir()
    kill_with_trials_running(search_args(first_dir, 2, 1, "--storage", str(shared)), first, 1)
    assert_no_leftovers(first_dir)

    other_run = BackgroundRun(
        search_args(other_dir, 2, 1, "--storage", str(shared)), other, objective_env(other)
    )
    try:
        wait_until(lambda: started(other) == 1, 60, "the other run's trial to start")
        moved = tmp_path / "moved" / "run-a"  # and resumed from elsewhere, as in a re-queued job
        moved.parent.mkdir()
        first_dir.rename(moved)
        (first / "release").touch()
        args = search_args(moved, 2, 1, "--storage", str(shared))
        again = run_cli(args, first, env=objective_env(first))
        assert again.returncode == 0, again.stdout + again.stderr

        by_number = {t.number: t for t in journal_trials(shared)}
        assert by_number[0].state == TrialState.FAIL  # the killed run's trial: ours
        assert by_number[0].system_attrs[FAIL_KIND] == "interrupted"
        assert by_number[1].state == TrialState.RUNNING  # the live run's trial: left alone
        assert other_run.process.poll() is None

        (other / "release").touch()
        assert other_run.wait() == 0, other_run.stdout + other_run.stderr
    finally:
        other_run.stop()
    assert journal_trials(shared)[1].state == TrialState.COMPLETE


def test_trials_marked_by_a_run_made_before_run_folders_had_an_id_are_still_recognised(
    tmp_path: Path,
) -> None:
    run_dir, journal, study = earlier_study(tmp_path)
    storage = study._storage
    ours, foreign = study.ask(), study.ask()
    storage.set_trial_system_attr(ours._trial_id, RUN_MARK, own_mark(run_dir))
    storage.set_trial_system_attr(foreign._trial_id, RUN_MARK, f"another-host:{run_dir}")

    result = run_cli(quick_on(journal, run_dir, 1, "--quiet"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = journal_trials(journal)
    assert trials[0].state == TrialState.FAIL
    assert trials[0].system_attrs[FAIL_KIND] == "interrupted"
    assert trials[1].state == TrialState.RUNNING  # another machine may be running it


def quick_search(run_dir: str, study: str, n_trials: int) -> list[str]:
    return [
        "run", objective("quick"), "--run-dir", run_dir, "--study-name", study,
        "--n-trials", str(n_trials), "--cpu-slots", "1", "--quiet", "--no-report",
    ]  # fmt: skip


def test_a_second_study_in_a_study_run_folder_is_refused_and_the_first_still_resumes(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "runs" / "j9"
    alpha = run_cli(quick_search("runs/j9", "alpha", 2), tmp_path)
    assert alpha.returncode == 0, alpha.stdout + alpha.stderr
    first_result = (run_dir / "trials" / "00000" / "result.json").read_text()
    best = (run_dir / "best" / "best.json").read_text()

    beta = run_cli(quick_search("runs/j9", "beta", 2), tmp_path)
    assert beta.returncode == 2, beta.stdout + beta.stderr
    message = beta.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "belongs to study 'alpha'" in message and "--run-dir" in message
    assert (run_dir / "trials" / "00000" / "result.json").read_text() == first_result
    assert (run_dir / "best" / "best.json").read_text() == best
    assert json.loads(first_result)["study"] == "alpha"
    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    assert [s.study_name for s in storage.get_all_studies()] == ["alpha"]

    again = run_cli(quick_search("runs/j9", "alpha", 3), tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [t.state for t in load_trials(run_dir, "alpha")] == [TrialState.COMPLETE] * 3


def test_a_prepared_trial_sent_before_its_start_was_stored_is_repeated_not_run_again(
    tmp_path: Path,
) -> None:
    # A controller killed right after sending a prepared trial (hyperfleet.controller.prepared)
    # leaves it enqueued, though its worker made its folder: the resume ends it as interrupted
    # and repeats it under a number of its own. One never sent (no folder) simply runs.
    run_dir, journal, study = earlier_study(tmp_path)
    marks = {RUN_MARK: own_mark(run_dir)}
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=marks))
    (run_dir / "trials" / "00000").mkdir(parents=True)  # trial 0 was sent, and started

    result = run_cli(quick_on(journal, run_dir, 3, "--plain"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trial 0 was left running: marked interrupted" in result.stdout
    trials = journal_trials(journal)
    assert trials[0].state == TrialState.FAIL
    assert trials[0].system_attrs[FAIL_KIND] == "interrupted"
    assert trials[1].state == TrialState.COMPLETE  # taken from the queue as it was
    assert [t.state for t in trials[2:]] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs.get(RETRY_OF) for t in trials[2:]].count(0) == 1
