"""The journal as the controller writes it: readable by plain Optuna at every moment, shared
safely with other writers, trials placed as they are created, and the queue of enqueued trials
looked up without a pass over the study."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.resources.inventory import Inventory
from hyperfleet.store.journal import GroupCommitBackend, PlacingJournalStorage, commit
from hyperfleet.store.storage import KernelFileLock, open_private_journal, open_shared_journal


def _plain_trials(path: Path, name: str = "s") -> list[optuna.trial.FrozenTrial]:
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _run_trials(study: optuna.Study, count: int, offset: float = 0.0) -> None:
    for i in range(count):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 10.0)
        trial.set_user_attr("i", i)
        study.tell(trial, x + offset)


def test_the_own_journal_reads_back_in_plain_optuna_before_and_after_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "optuna.journal"
    storage = open_private_journal(path)
    study = optuna.create_study(study_name="s", storage=storage)
    _run_trials(study, 5)

    # Written, not yet committed: readers see it already (the kernel has it).
    before = _plain_trials(path)
    commit(storage)
    after = _plain_trials(path)

    ours = study.get_trials()
    for seen in (before, after):
        assert [(t.number, t.state, t.params, t.value, t.user_attrs) for t in seen] == [
            (t.number, t.state, t.params, t.value, t.user_attrs) for t in ours
        ]
    assert path.read_bytes().endswith(b"\n")


def test_a_reopened_own_journal_continues_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "optuna.journal"
    first = optuna.create_study(study_name="s", storage=open_private_journal(path))
    _run_trials(first, 3)
    commit(first._storage)

    again = optuna.load_study(study_name="s", storage=open_private_journal(path))
    _run_trials(again, 2)

    assert [t.number for t in _plain_trials(path)] == [0, 1, 2, 3, 4]


def _other_writer(path: str, count: int) -> None:
    storage = JournalStorage(JournalFileBackend(path))  # Optuna's own backend and lock
    study = optuna.load_study(study_name="s", storage=storage)
    _run_trials(study, count, offset=100.0)


def test_a_shared_journal_interleaves_with_another_process_writing_it(tmp_path: Path) -> None:
    path = tmp_path / "shared.journal"
    storage = open_shared_journal(path, JournalFileSymlinkLock(str(path)))
    study = optuna.create_study(study_name="s", storage=storage)
    context = multiprocessing.get_context("spawn")
    other = context.Process(target=_other_writer, args=(str(path), 20))
    other.start()
    _run_trials(study, 20)
    other.join(timeout=60)
    assert other.exitcode == 0

    trials = _plain_trials(path)
    assert len(trials) == 40
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Our storage sees the other process's trials too, as Optuna's own would.
    assert len(study.get_trials()) == 40
    assert sum(t.value is not None and t.value >= 100 for t in study.get_trials()) == 20


def test_a_created_trial_carries_its_placement_in_the_record_that_creates_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "optuna.journal"
    storage = open_private_journal(path)
    assert isinstance(storage, PlacingJournalStorage)
    study = optuna.create_study(study_name="s", storage=storage)
    lines_before = path.read_bytes().count(b"\n")
    with storage.placing({"hyperfleet:slot": "cpu#0", "hyperfleet:worker_pid": 7}):
        trial = study.ask()

    assert path.read_bytes().count(b"\n") == lines_before + 1  # one record, not three
    stored = _plain_trials(path)[trial.number]
    assert stored.system_attrs == {"hyperfleet:slot": "cpu#0", "hyperfleet:worker_pid": 7}
    assert stored.state == TrialState.RUNNING
    # Outside placing(), a trial is created as Optuna creates it.
    plain = study.ask()
    assert storage.get_trial(plain._trial_id).system_attrs == {}


@pytest.mark.parametrize("shared", [False, True])
def test_enqueued_trials_are_taken_in_order_and_only_once(tmp_path: Path, shared: bool) -> None:
    path = tmp_path / "optuna.journal"
    backend = GroupCommitBackend(
        str(path), JournalFileSymlinkLock(str(path)) if shared else KernelFileLock(path), shared
    )
    study = optuna.create_study(study_name="s", storage=PlacingJournalStorage(backend))
    _run_trials(study, 3)
    study.enqueue_trial({"x": 1.0})
    study.enqueue_trial({"x": 2.0})

    first, second, fresh = study.ask(), study.ask(), study.ask()

    assert first.suggest_float("x", 0.0, 10.0) == 1.0
    assert second.suggest_float("x", 0.0, 10.0) == 2.0
    assert fresh.number == 5
    assert "fixed_params" not in study._storage.get_trial(fresh._trial_id).system_attrs
    study.enqueue_trial({"x": 3.0})  # the queue grows again after it emptied
    assert study.ask().suggest_float("x", 0.0, 10.0) == 3.0


def test_a_trial_enqueued_by_another_process_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "shared.journal"
    study = optuna.create_study(
        study_name="s", storage=open_shared_journal(path, JournalFileSymlinkLock(str(path)))
    )
    _run_trials(study, 2)
    assert study.ask().number == 2  # the queue was looked up once, and was empty

    other = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    other.enqueue_trial({"x": 4.0})

    assert study.ask().suggest_float("x", 0.0, 10.0) == 4.0


def _quick(trial: optuna.trial.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def test_a_run_lets_go_of_the_journal_file_at_its_end(tmp_path: Path) -> None:
    """A process that runs many searches (a notebook) keeps no descriptor per run."""
    path = tmp_path / "user.journal"
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="s", storage=storage)
    cores = tuple(sorted(os.sched_getaffinity(0)))
    hyperfleet.optimize(
        study, _quick, n_trials=2, run_dir=tmp_path / "run", display="quiet", report=False,
        inventory=Inventory(gpus=(), cores=cores), cpu_slots=1,
    )  # fmt: skip

    assert len(study.get_trials()) == 2
    open_files = {Path(f.path) for f in psutil.Process().open_files()}
    assert path not in open_files
