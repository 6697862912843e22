"""Next trials prepared while their slot still runs the one before, so that a slot whose trial
ends starts the next one at once.

Without them a slot whose trial ends waits for the controller to tell the result, ask the next
trial and commit both (a few milliseconds, more when other slots' results came first). So while
a slot runs a trial, the controller creates the slot's next trial in the storage as an enqueued
(``WAITING``) trial that carries its placement, off the slot's way. When the slot's trial ends,
the controller marks that trial ``RUNNING`` (its start time is then, as for any enqueued trial
``study.ask()`` takes) and sends it, before it records the result that just came in.

Only where the order cannot matter to the search: a single study whose sampler does not learn
from results (Optuna's random sampler), with several slots, no time limit and no automatic GPU
packing. A sampler that learns would see one more trial without a result per slot.

Nothing is lost and nothing is left ``RUNNING``:

- a prepared trial is committed before it is sent, like any other;
- its start is committed with the step's writes (on the run directory's own journal it is sent
  before its start is even written: no other process takes its queued trials). A controller
  killed in between leaves it enqueued with its folder made by its worker: the next run ends
  it as interrupted and repeats it, as any trial left running (bookkeeping's
  ``fail_interrupted_leftovers``), rather than running it again under the same number;
- a stop leaves the prepared trials not sent enqueued: the next run (or any Optuna process)
  takes them first;
- the budget counts them, so a run never creates more than ``n_trials``;
- a prepared trial that some other ``ask`` took first (another process on a shared storage, or
  this controller for a slot whose own was not ready) is simply not used again;
- trials enqueued otherwise (a repeat, the objective's ``enqueue_trial``, another process on a
  shared storage, looked up once a second) stop the preparing until they have been taken.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState, create_trial

from hyperfleet.controller.ahead import Space
from hyperfleet.store.journal import running_trial
from hyperfleet.workers.protocol import RunTrial


@dataclass
class NextTrial:
    study: str  # the study's name in the run
    stored: FrozenTrial  # as created
    pid: int  # the worker it was placed on
    message: RunTrial  # what starts it, but for its start time
    space: Space | None  # the study's space its suggestions were sampled from
    committed: bool = False  # on disk: it may be sent

    @property
    def trial_id(self) -> int:
        return self.stored._trial_id


class NextTrials:
    """The prepared trials, one per slot at most."""

    def __init__(self) -> None:
        self._by_slot: dict[str, NextTrial] = {}
        self._slot_of: dict[int, str] = {}  # trial id -> slot
        self._count: Counter[str] = Counter()  # by study

    def __contains__(self, slot: str) -> bool:
        return slot in self._by_slot

    def count(self, study: str) -> int:
        return self._count[study]

    def add(self, slot: str, entry: NextTrial) -> None:
        """Keep ``entry`` as the slot's next trial."""
        self._by_slot[slot] = entry
        self._slot_of[entry.trial_id] = slot
        self._count[entry.study] += 1

    def take(self, slot: str) -> NextTrial | None:
        """The slot's prepared trial, no longer kept here."""
        entry = self._by_slot.pop(slot, None)
        if entry is not None:
            del self._slot_of[entry.trial_id]
            self._count[entry.study] -= 1
        return entry

    def owns(self, trial_id: int) -> bool:
        return trial_id in self._slot_of

    def peek(self, slot: str) -> NextTrial | None:
        return self._by_slot.get(slot)

    def taken_elsewhere(self, trial_id: int) -> None:
        """An ``ask`` took this trial from the queue: it is no longer a slot's next one."""
        slot = self._slot_of.get(trial_id)
        if slot is not None:
            self.take(slot)


def create_queued(study: optuna.Study, placement: dict[str, Any]) -> FrozenTrial:
    """A new enqueued trial, its placement in the creating record, as the storage holds it."""
    template = create_trial(state=TrialState.WAITING, system_attrs=placement)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return study._storage.get_trial(trial_id)


def start_queued(study: optuna.Study, trial_id: int) -> optuna.Trial | None:
    """Start an enqueued trial as ``study.ask()`` does (its start time is now); None when some
    other ``ask`` took it first."""
    return queued_trial(study, trial_id) if claim_queued(study, trial_id) else None


def claim_queued(study: optuna.Study, trial_id: int) -> bool:
    """Mark an enqueued trial running, as ``study.ask()`` does when it takes one from the
    queue (its start time is now); False when some other ``ask`` took it first."""
    try:
        return bool(study._storage.set_trial_state_values(trial_id, TrialState.RUNNING))
    except UpdateFinishedTrialError:
        return False


def queued_trial(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """The trial object of a claimed one, as ``study.ask()`` returns it."""
    study._thread_local.cached_all_trials = None  # as ask() does: samplers read trials afresh
    return optuna.Trial(study, trial_id)


def ask_new(study: optuna.Study, placement: dict[str, Any]) -> optuna.Trial:
    """A new trial, as ``study.ask()`` makes one when nothing is enqueued, with its placement in
    the creating record; it leaves the enqueued trials (the other slots' prepared ones) alone."""
    trial_id = study._storage.create_new_trial(
        study._study_id, template_trial=running_trial(placement)
    )
    study._thread_local.cached_all_trials = None
    return optuna.Trial(study, trial_id)
