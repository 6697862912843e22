"""Trials created with the marks of where they run, in the record that creates them.

``study.ask()`` creates a trial with no attributes; the controller then marks where it runs
(run, slot, worker). Written afterwards, the marks cost three more writes per trial: three more
records in a journal, three more round trips and commits on a database, each of them through
the controller, the study's only writer. The storages the controller opens (a journal,
:class:`hyperfleet.store.journal.PlacingJournalStorage`, and a database,
:class:`hyperfleet.store.database.ControllerRDBStorage`)
take the marks inside :meth:`PlacesTrials.placing` and write them with the trial. A trial
``ask`` takes from the queue (``enqueue_trial``) already exists: the caller sees that the marks
are missing and writes them itself. What is stored is the same either way.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

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
