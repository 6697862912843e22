"""The controller's database storage: Optuna's ``RDBStorage`` behind Optuna's cache, as
``optuna.create_study(storage=url)`` opens it, made economical for a process that writes a
whole fleet's trials alone.

Optuna's cache (``_CachedStorage``) keeps finished trials and reads every unfinished one again
at each ``get_all_trials`` (a sampler calls it several times per trial), and reads a running
trial in full (six queries) at each ``get_trial``: right for a process that shares its trials
with others, wasteful for the controller, which is the only writer of the trials it runs. So
this storage:

- creates a trial with the marks of where it runs in the transaction that creates it
  (:class:`hyperfleet.store.placing.PlacesTrials`), in five statements;
- keeps its own unfinished trials (created here, or taken here from the queue) current in the
  cache as it writes them, and hands them out from there: such a trial is written by its
  controller alone (its worker's writes go through the controller too);
- writes them with the statement alone (:mod:`hyperfleet.store.trial_writes`), where
  Optuna's storage reads the trial and the row before each write;
- keeps a finished trial as the tell wrote it, with the time it stored, so it is never read;
- checks for what other processes wrote with one query of trial ids and states, at most every
  :data:`FRESH_FOR` seconds, and reads in full only the trials it does not hold as they are:
  new ones, other processes' unfinished ones, and its own that another process changed.

A write that fails leaves the trial to be read again from the database, as Optuna's cache would.
Other processes' trials are seen as Optuna's cache sees them, at the next ``get_all_trials``,
or up to :data:`FRESH_FOR` seconds later.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy
from optuna._typing import JSONSerializable
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.store import trial_writes as writes
from hyperfleet.store.placing import PlacesTrials

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11

_TRIALS = models.TrialModel.__table__
_CREATE_ATTEMPTS = 5  # as Optuna's own trial creation
# A sampler reads all trials several times while it samples one trial; what other processes
# wrote is read again at most this often (seconds), so one sampling costs one query.
FRESH_FOR = 0.01


class ControllerRDBStorage(PlacesTrials, _CachedStorage):
    """Optuna's cached database storage, keeping the trials this process runs in the cache as
    it writes them (see the module's docstring)."""

    def __init__(self, backend: RDBStorage, fresh_for: float = FRESH_FOR) -> None:
        super().__init__(backend)
        self._fresh_for = fresh_for
        self._checked: dict[int, float] = {}  # study id: when others' writes were last read
        # Unfinished trials this process created or took from the queue, current in the cache.
        self._own: set[int] = set()
        self._reading: sqlalchemy.Connection | None = None  # see _read

    # Creating and reading.

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        template = self._placed(template_trial)
        if template is None or not _only_marked(template):
            # Any other template (a whole trial, as add_trial writes) is read back when asked.
            trial_id = super().create_new_trial(study_id, template)
            if template is None:
                with self._lock:
                    self._studies[study_id].unfinished_trial_ids.add(trial_id)
                    self._own.add(trial_id)
            return trial_id
        created = self._create_marked(study_id, template)
        with self._lock:
            self._studies.setdefault(study_id, _StudyInfo())
            self._add_trials_to_cache(study_id, [created])
            self._studies[study_id].unfinished_trial_ids.add(created._trial_id)
            self._own.add(created._trial_id)
        return created._trial_id

    def _create_marked(self, study_id: int, template: FrozenTrial) -> FrozenTrial:
        """A new running or waiting trial with system attributes (a placement), in one
        transaction of five statements (:func:`hyperfleet.store.trial_writes.create`; Optuna
        writes each attribute with a query and an insert of its own). Tried again after a
        deadlock, as Optuna does."""
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            try:
                with self._backend.engine.connect() as connection:
                    trial_id, number = writes.create(
                        connection,
                        study_id,
                        template.state,
                        template.datetime_start,
                        template.system_attrs,
                    )
                    connection.commit()
            except sqlalchemy.exc.OperationalError as exc:  # a deadlock, or worse
                if attempt == _CREATE_ATTEMPTS:
                    raise StorageInternalError(
                        f"creating a trial failed {_CREATE_ATTEMPTS} times: {exc}; check that "
                        "the database server is up and reachable, then run the same command "
                        "again to carry on"
                    ) from exc
                time.sleep(random.random() * 2.0)
                continue
            created = copy.deepcopy(template)
            created.number, created._trial_id = number, trial_id
            return created
        raise AssertionError("not reached")

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            if trial_id in self._own:
                return copy.deepcopy(self._cached(trial_id))  # the caller may change its copy
        return super().get_trial(trial_id)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        """Bring the cache up to date with what other processes wrote: one query for the ids of
        the trials that may have changed, then a full read of those this process does not hold
        as they are."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked.get(study_id, -math.inf) < self._fresh_for:
                return
            self._checked[study_id] = now
            study = self._studies.setdefault(study_id, _StudyInfo())
            unfinished = study.unfinished_trial_ids
            changed = self._changed_trials(study_id, study.last_finished_trial_id, unfinished)
            stale = {i for i, state in changed if not self._held_as(i, state)}
            if stale:
                self._read_in_full(study_id, study, stale)
            finished = [i for i, _ in changed if self._finished(i)]
            if finished:
                study.last_finished_trial_id = max(study.last_finished_trial_id, *finished)

    def _changed_trials(
        self, study_id: int, newer_than: int, unfinished: set[int]
    ) -> list[tuple[int, TrialState]]:
        """The id and state of every trial newer than the newest finished one read, or not
        finished when last read."""
        where = _TRIALS.c.trial_id > newer_than
        if unfinished:
            where = sqlalchemy.or_(where, _TRIALS.c.trial_id.in_(unfinished))
        columns = (_TRIALS.c.trial_id, _TRIALS.c.state)
        query = sqlalchemy.select(*columns).where(_TRIALS.c.study_id == study_id, where)
        return [(row[0], row[1]) for row in self._read(query)]

    def _held_as(self, trial_id: int, state: TrialState) -> bool:
        """Whether the cache holds the trial as it is: finished, or this process's own in the
        state it has. Another process may take a waiting trial from the queue (or fail a
        running one): the trial is no longer this process's own, and is read in full."""
        if self._finished(trial_id):
            return True
        if trial_id in self._own and self._cached(trial_id).state == state:
            return True
        self._own.discard(trial_id)
        return False

    def _read_in_full(self, study_id: int, study: _StudyInfo, trial_ids: set[int]) -> None:
        # Ids up to the newest asked for, and any newer: a trial created since is read too.
        trials = self._backend._get_trials(study_id, None, trial_ids, max(trial_ids))
        trials = [trial for trial in trials if trial._trial_id not in self._own]
        self._add_trials_to_cache(study_id, trials)
        for trial in trials:
            if trial.state.is_finished():
                study.unfinished_trial_ids.discard(trial._trial_id)
            else:
                study.unfinished_trial_ids.add(trial._trial_id)

    def _read(self, query: sqlalchemy.Executable) -> sqlalchemy.Result[Unpack[tuple[Any, ...]]]:
        """One query, outside a transaction, on a connection kept for these reads: no BEGIN
        and no ROLLBACK around it, no connection taken from the pool and reset for it. A
        connection that broke is opened again once."""
        for attempt in (1, 2):
            if self._reading is None:
                connection = self._backend.engine.connect()
                self._reading = connection.execution_options(isolation_level="AUTOCOMMIT")
            try:
                return self._reading.execute(query)
            except sqlalchemy.exc.DBAPIError as exc:
                self._reading.close()
                self._reading = None
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("not reached")

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["_reading"] = None  # a connection is not copied; the copy opens its own
        return state

    def _finished(self, trial_id: int) -> bool:
        return self._get_cached_trial(trial_id) is not None

    def _cached(self, trial_id: int) -> FrozenTrial:
        study_id, number = self._trial_id_to_study_id_and_number[trial_id]
        return self._studies[study_id].trials[number]

    # Writing. A trial of this process is written with the statement alone (see
    # hyperfleet.store.trial_writes), and the write is made to its cached copy too; any other
    # trial is written by Optuna's storage, and read again when asked for.

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        def written(trial: FrozenTrial) -> None:
            trial.params = {
                **trial.params,
                param_name: distribution.to_external_repr(param_value_internal),
            }
            trial.distributions = {**trial.distributions, param_name: distribution}

        def optunas() -> None:
            super(ControllerRDBStorage, self).set_trial_param(
                trial_id, param_name, param_value_internal, distribution
            )

        statement, known = None, None
        with self._lock:
            held = self._held(trial_id)
            if held is not None:
                study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
                known = self._studies[study_id].param_distribution.get(param_name)
        # Optuna checks the first parameter of a name against the study's, and leaves a
        # parameter the trial has alone: both are its storage's to write.
        if held is not None and known is not None and param_name not in held.params:
            check_distribution_compatibility(known, distribution)  # as Optuna: ValueError
            statement = writes.parameter(trial_id, param_name, param_value_internal, distribution)
        self._write_trial(trial_id, statement, written, optunas)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        def optunas() -> None:
            super(ControllerRDBStorage, self).set_trial_user_attr(trial_id, key, value)

        self._set_attribute("user", trial_id, key, value, optunas)

    def set_trial_system_attr(self, trial_id: int, key: str, value: JSONSerializable) -> None:
        def optunas() -> None:
            super(ControllerRDBStorage, self).set_trial_system_attr(trial_id, key, value)

        self._set_attribute("system", trial_id, key, value, optunas)

    def _set_attribute(
        self, kind: str, trial_id: int, key: str, value: Any, optunas: Callable[[], None]
    ) -> None:
        field = f"{kind}_attrs"

        def written(trial: FrozenTrial) -> None:
            setattr(trial, field, {**getattr(trial, field), key: _as_stored(value)})

        with self._lock:
            held = self._held(trial_id)
        statement = None
        if held is not None:
            statement = writes.attribute(kind, trial_id, key, value, key in getattr(held, field))
        self._write_trial(trial_id, statement, written, optunas)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        def written(trial: FrozenTrial) -> None:
            trial.intermediate_values = {**trial.intermediate_values, step: intermediate_value}

        def optunas() -> None:
            super(ControllerRDBStorage, self).set_trial_intermediate_value(
                trial_id, step, intermediate_value
            )

        with self._lock:
            held = self._held(trial_id)
        statement = None
        if held is not None:
            exists = step in held.intermediate_values
            statement = writes.report(trial_id, step, intermediate_value, exists)
        self._write_trial(trial_id, statement, written, optunas)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        with self._lock:
            held = self._held(trial_id)
        if held is not None and held.values is None and _may_change(held.state, state):
            return self._change_held_state(trial_id, held.state, state, values)
        changed = super().set_trial_state_values(trial_id, state, values)
        self._disown(trial_id)  # read again when asked for
        return changed

    def _change_held_state(
        self, trial_id: int, held: TrialState, state: TrialState, values: Sequence[float] | None
    ) -> bool:
        """The state (and values) of a trial this process holds, with the time the change
        takes place; False, as Optuna's storage, when another process took the trial from the
        queue first. A running trial that another process ended meanwhile is refused as
        Optuna's storage refuses it."""
        now = datetime.datetime.now()
        change = writes.state_change(trial_id, held, state, now)
        told = writes.values(trial_id, values) if values is not None else []

        def written(trial: FrozenTrial) -> None:
            trial.state = state
            if values is not None:
                trial.values = list(values)
            if state == TrialState.RUNNING:
                trial.datetime_start = now
            else:
                trial.datetime_complete = now

        if self._write_held(trial_id, [change, *told], written):
            if state.is_finished():
                with self._lock:
                    self._own.discard(trial_id)
                    study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
                    self._studies[study_id].unfinished_trial_ids.discard(trial_id)
            return True
        if state == TrialState.RUNNING:
            return False
        number = self._cached(trial_id).number
        raise UpdateFinishedTrialError(
            f"Trial#{number} has already finished and can not be updated."
        )

    def _write_trial(
        self,
        trial_id: int,
        statement: writes.Statement | None,
        written: Callable[[FrozenTrial], None],
        optunas: Callable[[], None],
    ) -> None:
        """A write to a trial: with ``statement`` alone where there is one (a trial this
        process holds), else, or when that finds the trial changed, by Optuna's storage
        (``optunas``), which says what is wrong with it."""
        if statement is not None and self._write_held(trial_id, [statement], written):
            return
        try:
            optunas()
        except BaseException:
            self._disown(trial_id)
            raise
        self._apply(trial_id, written)

    def _write_held(
        self,
        trial_id: int,
        statements: list[writes.Statement],
        written: Callable[[FrozenTrial], None],
    ) -> bool:
        """Send ``statements`` in one transaction and make the write to the cached copy. The
        first statement must change one row: if it changes none (another process changed the
        trial), nothing is written and the trial is read again; False then."""
        try:
            with self._backend.engine.connect() as connection:
                first = connection.execute(statements[0])
                if isinstance(statements[0], sqlalchemy.Update) and first.rowcount != 1:
                    connection.rollback()  # (an insert either adds its row or raises)
                    self._disown(trial_id)
                    return False
                for statement in statements[1:]:
                    connection.execute(statement)
                connection.commit()
        except sqlalchemy.exc.IntegrityError:
            self._disown(trial_id)  # the row was there already: not held as it is
            return False
        except sqlalchemy.exc.SQLAlchemyError as exc:
            self._disown(trial_id)
            raise StorageInternalError(
                f"writing trial {trial_id} failed: {exc}; check that the database server is "
                "up and reachable, then run the same command again to carry on"
            ) from exc
        self._apply(trial_id, written)
        return True

    def _apply(self, trial_id: int, written: Callable[[FrozenTrial], None]) -> None:
        """Make a write to the cached copy of a trial this process holds (a new copy: others
        may hold the old one)."""
        with self._lock:
            if trial_id in self._own:
                trial = copy.deepcopy(self._cached(trial_id))
                written(trial)
                self._replace(trial)

    def _held(self, trial_id: int) -> FrozenTrial | None:
        """The trial as this process holds it, if it is one of its own."""
        return self._cached(trial_id) if trial_id in self._own else None

    def _replace(self, trial: FrozenTrial) -> None:
        study_id, number = self._trial_id_to_study_id_and_number[trial._trial_id]
        self._studies[study_id].trials[number] = trial

    def _disown(self, trial_id: int) -> None:
        """Not sure of the cached copy any more: read the trial again at the next refresh."""
        with self._lock:
            self._own.discard(trial_id)


def _may_change(held: TrialState, state: TrialState) -> bool:
    """Whether this storage writes the change itself: a queued trial taken (or ended), a
    running one ended; anything else Optuna's storage decides."""
    if held == TrialState.WAITING:
        return state == TrialState.RUNNING or state.is_finished()
    return held == TrialState.RUNNING and state.is_finished()


def _as_stored(value: Any) -> Any:
    """An attribute's value as the database gives it back (stored as JSON: a tuple is a list)."""
    return json.loads(json.dumps(value))


def _only_marked(template: FrozenTrial) -> bool:
    """A template that holds a new trial's state (running or waiting) and system attributes,
    and nothing else, as the controller's trials are created."""
    return (
        template.state in (TrialState.RUNNING, TrialState.WAITING)
        and template.datetime_complete is None
        and not template.params
        and not template.user_attrs
        and not template.intermediate_values
        and template.values is None
    )
