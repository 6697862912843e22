"""The statements that write a trial the controller holds as it is, in Optuna's tables.

Optuna's database storage writes a trial attribute, a parameter or a report through its ORM:
it reads the trial to check that it may still change, reads the row it may replace, then
writes (about 2 ms of CPU and three round trips per write, against half a millisecond for the
statement alone). The controller knows all of that already about the trials it runs
(:class:`hyperfleet.store.database.ControllerRDBStorage` holds them as written), so it sends
the write alone: an ``INSERT`` where the trial has no such row yet, an ``UPDATE`` where it has,
in the same columns and representations as Optuna's own writes. A change of state is an
``UPDATE`` that names the state it changes from, so a trial another process changed in the
meantime is left alone (no row matches) and read again.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages._rdb import models
from optuna.trial import TrialState

_TRIALS = models.TrialModel.__table__
_PARAMS = models.TrialParamModel.__table__
_VALUES = models.TrialValueModel.__table__
_REPORTS = models.TrialIntermediateValueModel.__table__
ATTRIBUTES = {
    "user": models.TrialUserAttributeModel.__table__,
    "system": models.TrialSystemAttributeModel.__table__,
}

_STUDIES = models.StudyModel.__table__

Statement = sqlalchemy.Insert | sqlalchemy.Update


def create(
    connection: sqlalchemy.Connection,
    study_id: int,
    state: TrialState,
    started: datetime.datetime | None,
    system_attrs: dict[str, Any],
) -> tuple[int, int]:
    """A new trial (running or waiting) with its system attributes, in the transaction of
    ``connection``, numbered as Optuna numbers it: inserted, then counted among the study's
    trials while the study's row is locked. Its id and number."""
    lock = sqlalchemy.select(_STUDIES.c.study_id).where(_STUDIES.c.study_id == study_id)
    if connection.execute(lock.with_for_update()).first() is None:
        raise KeyError(f"No study with study_id {study_id} exists.")  # as Optuna says it
    row = {"number": None, "study_id": study_id, "state": state, "datetime_start": started}
    key = connection.execute(sqlalchemy.insert(_TRIALS).values(row)).inserted_primary_key
    assert key is not None  # a single-row insert has one
    trial_id = int(key[0])
    before = (_TRIALS.c.study_id == study_id) & (_TRIALS.c.trial_id < trial_id)
    count = sqlalchemy.select(sqlalchemy.func.count(_TRIALS.c.trial_id)).where(before)
    number = int(connection.execute(count).scalar_one())
    numbered = sqlalchemy.update(_TRIALS).where(_TRIALS.c.trial_id == trial_id)
    connection.execute(numbered.values(number=number))
    if system_attrs:
        rows = [
            {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for key, value in system_attrs.items()
        ]
        connection.execute(sqlalchemy.insert(ATTRIBUTES["system"]), rows)
    return trial_id, number


def attribute(kind: str, trial_id: int, key: str, value: Any, exists: bool) -> Statement:
    """A user or system attribute, stored as JSON, as ``set_trial_*_attr`` stores it."""
    table = ATTRIBUTES[kind]
    row = {"value_json": json.dumps(value)}
    if exists:
        where = (table.c.trial_id == trial_id) & (table.c.key == key)
        return sqlalchemy.update(table).where(where).values(row)
    return sqlalchemy.insert(table).values(trial_id=trial_id, key=key, **row)


def parameter(
    trial_id: int, name: str, value_internal: float, distribution: BaseDistribution
) -> Statement:
    """A new parameter of the trial, as ``set_trial_param`` stores it."""
    return sqlalchemy.insert(_PARAMS).values(
        trial_id=trial_id,
        param_name=name,
        param_value=value_internal,
        distribution_json=distribution_to_json(distribution),
    )


def report(trial_id: int, step: int, value: float, exists: bool) -> Statement:
    """An intermediate value, as ``set_trial_intermediate_value`` stores it (NaN and infinities
    in their own representation)."""
    stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
    row = {"intermediate_value": stored, "intermediate_value_type": kind}
    if exists:
        where = (_REPORTS.c.trial_id == trial_id) & (_REPORTS.c.step == step)
        return sqlalchemy.update(_REPORTS).where(where).values(row)
    return sqlalchemy.insert(_REPORTS).values(trial_id=trial_id, step=step, **row)


def state_change(
    trial_id: int, held: TrialState, state: TrialState, now: datetime.datetime
) -> Statement:
    """The trial's new state, with its start (taken from the queue) or its end time, where it
    is still in the state the controller holds it in."""
    row: dict[str, Any] = {"state": state}
    if state == TrialState.RUNNING:
        row["datetime_start"] = now
    if state.is_finished():
        row["datetime_complete"] = now
    where = (_TRIALS.c.trial_id == trial_id) & (_TRIALS.c.state == held)
    return sqlalchemy.update(_TRIALS).where(where).values(row)


def values(trial_id: int, told: Sequence[float]) -> list[Statement]:
    """The trial's objective values, as the tell stores them (infinities in their own
    representation)."""
    rows: list[Statement] = []
    for objective, value in enumerate(told):
        stored, kind = models.TrialValueModel.value_to_stored_repr(value)
        rows.append(
            sqlalchemy.insert(_VALUES).values(
                trial_id=trial_id, objective=objective, value=stored, value_type=kind
            )
        )
    return rows
