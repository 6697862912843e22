"""Trials created with the marks of where they run, in the record that creates them.

``study.ask()`` creates a trial with no attributes; the controller then marks where it runs
(run, slot, worker). Written afterwards, the marks cost three more writes per trial: three more
records in a journal, three more round trips and commits on a database, each of them through
the controller, the study's only writer. The storages the controller opens (a journal,
:class:`hyperfleet.store.journal.PlacingJournalStorage`, and a database, :class:`PlacingRDBStorage`)
take the marks inside :meth:`PlacesTrials.placing` and write them with the trial. A trial
``ask`` takes from the queue (``enqueue_trial``) already exists: the caller sees that the marks
are missing and writes them itself. What is stored is the same either way.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
from collections.abc import Iterator, Sequence
from typing import Any

from optuna._typing import JSONSerializable
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import FrozenTrial, TrialState


class PlacesTrials:
    """What a storage mixes in to create the trials ``ask`` makes inside :meth:`placing` with
    the given system attributes."""

    _placement: dict[str, Any] | None = None

    @contextlib.contextmanager
    def placing(self, system_attrs: dict[str, Any]) -> Iterator[None]:
        self._placement = system_attrs
        try:
            yield
        finally:
            self._placement = None

    def _placed(self, template_trial: FrozenTrial | None) -> FrozenTrial | None:
        """The template of a trial created now: the placement's, for a plain new trial."""
        if template_trial is None and self._placement is not None:
            return running_trial(self._placement)
        return template_trial


class PlacingRDBStorage(PlacesTrials, _CachedStorage):
    """Optuna's database storage as ``optuna.create_study(storage=url)`` opens it (its
    ``RDBStorage`` behind the cache Optuna puts in front of it), creating a trial and its
    placement in one transaction, and handing back a trial it has just created, that nothing
    wrote to since, without reading it again (:func:`created_trial`)."""

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        self._unwritten: set[int] = set()  # created here, written to by no one here since

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, self._placed(template_trial))
        self._unwritten.add(trial_id)
        return trial_id

    def just_created(self, trial_id: int) -> FrozenTrial | None:
        """The trial as the transaction that created it wrote it, which Optuna's cache keeps;
        None once anything was written to it here (a sampler's ``before_trial`` may write), or
        when the cache no longer holds it."""
        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            if where is None or trial_id not in self._unwritten:
                return None
            study_id, number = where
            return copy.deepcopy(self._studies[study_id].trials.get(number))

    # Every write to a trial: it is no longer as created.

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        self._unwritten.discard(trial_id)
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        self._unwritten.discard(trial_id)
        return super().set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._unwritten.discard(trial_id)
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._unwritten.discard(trial_id)
        super().set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: JSONSerializable) -> None:
        self._unwritten.discard(trial_id)
        super().set_trial_system_attr(trial_id, key, value)


def created_trial(storage: BaseStorage, trial_id: int) -> FrozenTrial:
    """A trial as stored, one that ``storage`` has just created: a database storage hands back
    what its transaction wrote, when nothing was written to the trial since, instead of reading
    it again (six queries and a commit); otherwise, and on any other storage, it is read."""
    if isinstance(storage, PlacingRDBStorage):
        created = storage.just_created(trial_id)
        if created is not None:
            return created
    return storage.get_trial(trial_id)


def running_trial(
    system_attrs: dict[str, Any] | None = None, number: int = -1, trial_id: int = -1
) -> FrozenTrial:
    """A new trial as ``create_new_trial`` writes it (running, no parameters yet), with
    ``system_attrs``; the number and id are the storage's to give (-1) unless said."""
    return FrozenTrial(
        number=number,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs=dict(system_attrs or {}),
        intermediate_values={},
        trial_id=trial_id,
    )
