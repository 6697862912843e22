"""A database storage opened by hyperfleet writes a trial's placement with the trial, and hands
back a trial it just created as stored without reading it again, until something writes to it.
SQLite here (no server needed); tests/test_postgres.py runs whole searches on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from hyperfleet.store.placing import PlacingRDBStorage, created_trial

MARKS = {"hyperfleet:run": "r", "hyperfleet:slot": "cpu#0", "hyperfleet:worker_pid": 42}


def _fields(trial: FrozenTrial) -> tuple[object, ...]:
    return (
        trial.number, trial.state, trial.datetime_start, trial.params, trial.user_attrs,
        trial.system_attrs, trial.intermediate_values, trial.values, trial._trial_id,
    )  # fmt: skip


def test_a_trial_asked_while_placing_is_created_with_its_marks_as_stored(tmp_path: Path) -> None:
    storage = PlacingRDBStorage(RDBStorage(f"sqlite:///{tmp_path / 'study.db'}"))
    study = optuna.create_study(storage=storage)
    with storage.placing(MARKS):
        trial = study.ask()
    read = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}").get_trial(trial._trial_id)
    assert read.system_attrs == MARKS
    assert _fields(created_trial(storage, trial._trial_id)) == _fields(read)


def test_a_trial_written_to_since_its_creation_is_read_again(tmp_path: Path) -> None:
    storage = PlacingRDBStorage(RDBStorage(f"sqlite:///{tmp_path / 'study.db'}"))
    study = optuna.create_study(storage=storage)
    with storage.placing(MARKS):
        trial = study.ask()
    trial.set_user_attr("note", "written by the objective")
    storage.set_trial_system_attr(trial._trial_id, "grid_id", 3)  # as a sampler's before_trial
    stored = created_trial(storage, trial._trial_id)
    assert stored.user_attrs == {"note": "written by the objective"}
    assert stored.system_attrs == {**MARKS, "grid_id": 3}
