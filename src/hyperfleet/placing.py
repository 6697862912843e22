"""Trials created with the marks of where they run, in the record that creates them.

``study.ask()`` creates a trial with no attributes; the controller then marks where it runs
(run, slot, worker). Written afterwards, the marks cost three more writes per trial: three more
records in a journal, three more round trips and commits on a database, each of them through
the controller, the study's only writer. The storages the controller opens (a journal,
:class:`hyperfleet.journal.PlacingJournalStorage`, and a database, :class:`PlacingRDBStorage`)
take the marks inside :meth:`PlacesTrials.placing` and write them with the trial. A trial
``ask`` takes from the queue (``enqueue_trial``) already exists: the caller sees that the marks
are missing and writes them itself. What is stored is the same either way.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
from collections.abc import Iterator
from typing import Any

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
    placement in one transaction."""

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return super().create_new_trial(study_id, self._placed(template_trial))

    def just_created(self, trial_id: int) -> FrozenTrial | None:
        """The trial as the transaction that created it wrote it, which Optuna's cache keeps
        (it reads an unfinished trial afresh from the database, though: a sampler's or another
        process's writes may follow). None once the cache no longer holds it."""
        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            if where is None:
                return None
            study_id, number = where
            return copy.deepcopy(self._studies[study_id].trials.get(number))


def created_trial(storage: BaseStorage, trial_id: int) -> FrozenTrial:
    """A trial that ``storage`` has just created and nothing has written to since, as stored:
    a database storage hands back what its transaction wrote instead of reading it again (six
    queries and a commit), any other storage reads it."""
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
