"""The controller's database storage writes a trial's placement with the trial, keeps the trials
it runs current in its cache as it writes them (so it hands them out without reading them
again), and still sees what other processes write to the same study. Each check compares with
what a fresh ``RDBStorage`` reads from the same database. SQLite here (no server needed);
tests/test_postgres.py runs whole searches on PostgreSQL."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

from hyperfleet.store.database import ControllerRDBStorage

MARKS = {"hyperfleet:run": "r", "hyperfleet:slot": "cpu#0", "hyperfleet:worker_pid": 42}


def _fields(trial: FrozenTrial) -> tuple[object, ...]:
    reports = {step: repr(value) for step, value in trial.intermediate_values.items()}  # NaN too
    return (
        trial.number, trial.state, trial.datetime_start, trial.datetime_complete, trial.params,
        trial.distributions, trial.user_attrs, trial.system_attrs, reports, trial.values,
        trial._trial_id,
    )  # fmt: skip


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def _read(url: str, trial_id: int) -> FrozenTrial:
    """The trial as another process reads it from the database."""
    return RDBStorage(url).get_trial(trial_id)


@contextmanager
def _statements(storage: ControllerRDBStorage) -> Iterator[list[str]]:
    """The SQL statements ``storage`` sends while the block runs."""
    sent: list[str] = []
    engine = storage._backend.engine

    def count(*args: object) -> None:
        sent.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_trial_asked_while_placing_is_created_with_its_marks_as_stored(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url))
    study = optuna.create_study(storage=storage)
    with storage.placing(MARKS):
        trial = study.ask()
    read = _read(url, trial._trial_id)
    assert read.system_attrs == MARKS
    with _statements(storage) as sent:
        held = storage.get_trial(trial._trial_id)
    assert _fields(held) == _fields(read)
    assert sent == []  # handed out from the cache, not read again


def test_a_running_trial_is_kept_as_written_and_a_finished_one_as_told(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url))
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.suggest_float("x", -1.0, 1.0)
    trial.suggest_int("layers", 1, 4)
    trial.set_user_attr("shape", (3, 4))  # stored as JSON: read back as a list
    trial.set_user_attr("epoch", 1)
    trial.set_user_attr("epoch", 2)  # written over
    storage.set_trial_system_attr(trial._trial_id, "grid_id", 3)  # as a sampler's before_trial
    trial.report(0.5, step=1)
    trial.report(float("inf"), step=2)
    storage.set_trial_intermediate_value(trial._trial_id, 2, float("nan"))  # written over
    with _statements(storage) as sent:
        trial.set_user_attr("lr", 0.1)
        trial.report(0.25, step=3)
    assert len(sent) == 2  # each write the statement alone, no read before it
    with _statements(storage) as sent:
        running = storage.get_trial(trial._trial_id)
    assert sent == []
    assert _fields(running) == _fields(_read(url, trial._trial_id))
    assert running.user_attrs == {"shape": [3, 4], "epoch": 2, "lr": 0.1}
    assert running.intermediate_values[1] == 0.5 and math.isnan(running.intermediate_values[2])

    study.tell(trial, 0.25)
    with _statements(storage) as sent:
        told = storage.get_trial(trial._trial_id)
    assert sent == []
    assert told.state == TrialState.COMPLETE and told.datetime_complete is not None
    assert _fields(told) == _fields(_read(url, trial._trial_id))  # the end time as stored


def test_a_trial_another_process_ended_is_not_told_again(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url))
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    RDBStorage(url).set_trial_state_values(trial._trial_id, TrialState.FAIL)  # as a stale sweep
    with pytest.raises(UpdateFinishedTrialError):
        study.tell(trial, 1.0)
    assert _read(url, trial._trial_id).state == TrialState.FAIL
    assert storage.get_trial(trial._trial_id).state == TrialState.FAIL  # read again


def test_a_copy_handed_out_does_not_change_what_is_held(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url))
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    storage.get_trial(trial._trial_id).user_attrs["changed"] = "by the caller"
    assert storage.get_trial(trial._trial_id).user_attrs == {}


def test_what_another_process_writes_is_seen_at_the_next_read_of_all_trials(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url), fresh_for=0.0)
    study = optuna.create_study(study_name="s", storage=storage)
    ours = study.ask()
    other = optuna.load_study(study_name="s", storage=RDBStorage(url))
    running = other.ask()
    finished = other.ask()
    other.tell(finished, 1.0)
    assert {t.number: t.state for t in study.get_trials()} == {
        ours.number: TrialState.RUNNING,
        running.number: TrialState.RUNNING,
        finished.number: TrialState.COMPLETE,
    }
    running.set_user_attr("epoch", 7)  # another process's running trial changes
    other.tell(running, 2.0)
    seen = {t.number: t for t in study.get_trials()}
    assert seen[running.number].user_attrs == {"epoch": 7}
    assert seen[running.number].value == 2.0


def test_nothing_new_elsewhere_costs_one_query(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url), fresh_for=0.0)
    study = optuna.create_study(storage=storage)
    for value in (1.0, 2.0):
        trial = study.ask()
        study.tell(trial, value)
    study.ask()
    study.get_trials()  # takes in what there is to take in
    with _statements(storage) as sent:
        trials = study.get_trials()
    assert len(sent) == 1 and sent[0].lstrip().upper().startswith("SELECT")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]


def test_a_trial_taken_from_the_queue_is_held_with_the_start_time_stored(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url))
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 0.5})
    trial = study.ask()
    assert trial.suggest_float("x", 0.0, 1.0) == 0.5
    with _statements(storage) as sent:
        held = storage.get_trial(trial._trial_id)
    assert sent == []
    assert held.state == TrialState.RUNNING
    assert _fields(held) == _fields(_read(url, trial._trial_id))


def test_a_write_that_fails_leaves_the_trial_to_be_read_again(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url))
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    with pytest.raises(ValueError):  # the same name, another distribution: refused
        storage.set_trial_param(trial._trial_id, "x", 2.0, IntDistribution(0, 5))
    with _statements(storage) as sent:
        read = storage.get_trial(trial._trial_id)
    assert sent  # no longer sure of its copy: read from the database
    assert read.distributions == {"x": FloatDistribution(0.0, 1.0)}


def test_reads_of_all_trials_in_quick_succession_ask_the_database_once(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url), fresh_for=3600.0)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    study.tell(trial, 1.0)
    study.get_trials()
    other = optuna.load_study(study_name="s", storage=RDBStorage(url))
    other.tell(other.ask(), 2.0)
    with _statements(storage) as sent:
        trials = study.get_trials()
    assert sent == []  # what another process wrote is seen later, as a sampler's reads go
    assert [t.value for t in trials] == [1.0]


def test_a_queued_trial_created_here_is_held_until_another_process_takes_it(url: str) -> None:
    storage = ControllerRDBStorage(RDBStorage(url), fresh_for=0.0)
    study = optuna.create_study(study_name="s", storage=storage)
    template = optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=MARKS)
    trial_id = storage.create_new_trial(study._study_id, template_trial=template)
    with _statements(storage) as sent:
        held = storage.get_trial(trial_id)
    assert sent == []
    assert held.state == TrialState.WAITING and held.datetime_start is None
    assert _fields(held) == _fields(_read(url, trial_id))

    other = optuna.load_study(study_name="s", storage=RDBStorage(url))
    taken = other.ask()  # takes the queued trial
    assert taken._trial_id == trial_id
    [seen] = study.get_trials()
    assert seen.state == TrialState.RUNNING
    assert _fields(storage.get_trial(trial_id)) == _fields(_read(url, trial_id))
