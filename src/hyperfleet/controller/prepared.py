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

import datetime
import functools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from hyperfleet.controller import ahead
from hyperfleet.controller import bookkeeping as books
from hyperfleet.controller.ahead import Space
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.outbox import send
from hyperfleet.controller.slot_table import ActiveTrial, Launch, SlotTable
from hyperfleet.controller.studies import StudyBook
from hyperfleet.controller.study_run import StudyRun, opened
from hyperfleet.controller.trial_making import (
    TrialFolders,
    mark_placed,
    placement,
    record_of,
    run_message,
    sample_ahead,
    side_by_side,
)
from hyperfleet.store.placing import running_trial
from hyperfleet.workers.handle import Worker
from hyperfleet.workers.protocol import Finished, RunTrial

PREPARE_SECONDS = 0.002  # the most a step spends preparing next trials


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


class Preparer:
    """Prepares each busy slot's next trial while it runs, and sends it the moment the slot's
    result comes in (see the module's docstring)."""

    def __init__(
        self,
        ctx: RunContext,
        slots: SlotTable,
        studies: StudyBook,
        folders: TrialFolders,
        glance: Callable[[], None],
    ) -> None:
        self.next = NextTrials()
        self._to_prepare: deque[str] = deque()  # busy slots still to prepare one for
        self._ctx, self._slots, self._studies, self._folders = ctx, slots, studies, folders
        self._glance = glance  # looks at the agents' connections during long work

    @property
    def wanted(self) -> bool:
        """Whether busy slots wait for their next trial to be prepared."""
        return bool(self._to_prepare)

    def prepares(self, run: StudyRun) -> bool:
        """Whether the study's next trials are prepared ahead: where their order cannot matter
        to the search."""
        ctx = self._ctx
        if ctx.stops.level or len(self._studies.runs) != 1 or ctx.autopack is not None:
            return False
        if not side_by_side(ctx, self._slots):
            return False  # one slot: the trials study.optimize gives, in its order
        if run.plan.timeout is not None or ctx.stops.deadline is not None:
            return False  # a prepared trial would outlive the time limit, enqueued
        if run.plan.callbacks:
            return False  # each trial's callbacks run before the next starts (study.stop())
        if run.study is None or isinstance(run.study._storage, _CachedStorage):
            # A database (the controller's is a ControllerRDBStorage, a _CachedStorage):
            # taking a trial from the queue costs a commit more than asking.
            return False
        return ahead.samples_cheaply(run.study.sampler)

    def began(self, name: str, run: StudyRun) -> None:
        """The slot runs a trial of ``run``: prepare its next one, where the study does."""
        if self.prepares(run):
            self._to_prepare.append(name)

    def prepare_some(self) -> None:
        """Prepare the next trials of busy slots that have none, for a few milliseconds per
        step at most, so that the workers' messages never wait behind many (at the start,
        every slot needs one)."""
        until = time.monotonic() + PREPARE_SECONDS
        while self._to_prepare and time.monotonic() < until:
            self._prepare_one(self._to_prepare.popleft())
            self._glance()

    def _prepare_one(self, name: str) -> None:
        active, worker = self._slots.active.get(name), self._slots.workers.get(name)
        if active is None or worker is None or name in self.next:
            return
        run = active.run
        if not self.prepares(run) or not self._queue_is_ours(run) or self.fill(run):
            return
        study = opened(run)
        stored = create_queued(study, placement(self._ctx.run_dir, name, worker.pid))
        self._folders.trial_dir(run, stored.number)
        suggestions = sample_ahead(run, None, stored, False, side_by_side(self._ctx, self._slots))
        message = run_message(run, stored, None, suggestions)
        entry = NextTrial(run.plan.name, stored, worker.pid, message, run.space)
        self.next.add(name, entry)
        self._ctx.after_commit(functools.partial(setattr, entry, "committed", True))

    def fill(self, run: StudyRun) -> bool:
        """Whether the study's prepared trials take what its budget has left."""
        n_trials = run.plan.n_trials
        prepared = self.next.count(run.plan.name)
        return n_trials is not None and self._studies.reserved(run) + prepared >= n_trials

    def _queue_is_ours(self, run: StudyRun) -> bool:
        """Whether every enqueued trial of the study is a prepared one; looked up only after
        something else may have been enqueued (a repeat, the objective's enqueue_trial)."""
        if run.queue_unknown:
            study = opened(run)
            waiting = study._storage.get_all_trials(
                study._study_id, deepcopy=False, states=(TrialState.WAITING,)
            )
            run.queue_unknown = any(not self.next.owns(t._trial_id) for t in waiting)
        return not run.queue_unknown

    def start_next(self, name: str, worker: Worker, finished: Finished) -> bool:
        """Send the slot its prepared next trial now, before the result that freed it is
        recorded; the trial's end (TrialEnds) counts it as running once that is done."""
        entry, active = self.next.peek(name), self._slots.active.get(name)
        if entry is None or active is None or name in self._slots.sent_next:
            return False
        if not entry.committed or not self._goes_on(name, worker, active, finished, entry.pid):
            return False
        self.next.take(name)
        run, stored = active.run, entry.stored
        study = opened(run)
        message = replace(entry.message, datetime_start=datetime.datetime.now())
        space = run.space
        if finished.outcome == "returned":  # it completes: the space narrows as its tell will
            space = ahead.narrowed(space, active.trial.distributions)
        if entry.space != space:  # trials ended meanwhile
            sides = side_by_side(self._ctx, self._slots)
            suggestions = sample_ahead(run, None, stored, False, sides, space)
            message = replace(message, suggestions=suggestions)
        if not self._claim_and_send(study, entry, worker, message, run.shared):
            return False
        trial = queued_trial(study, entry.trial_id)
        launch = Launch(run, trial, record_of(study, stored), message, set())
        self._slots.sent_next[name] = launch
        return True

    @staticmethod
    def _claim_and_send(
        study: optuna.Study, entry: NextTrial, worker: Worker, message: RunTrial, shared: bool
    ) -> bool:
        if shared:
            if not claim_queued(study, entry.trial_id):
                return False  # another process's ask took it: the slot gets one the usual way
            send(worker, message)
            return True
        # The run directory's own journal: no other process takes its queued trials, and
        # this one no longer can, so the trial leaves before its start is written.
        send(worker, message)
        if not claim_queued(study, entry.trial_id):  # cannot happen: a bug, not to hide
            raise RuntimeError(
                f"hyperfleet: prepared trial {message.number} was started by another ask "
                "although the run folder's journal has no other writer; this is a bug: run "
                "the same command again to resume, and please report it"
            )
        return True

    def _goes_on(
        self, name: str, worker: Worker, active: ActiveTrial, finished: Finished, pid: int
    ) -> bool:
        """Whether the worker's result leaves it to run the study's next trial at once: a
        result the study takes, no stop, no reason to replace the worker."""
        run = active.run
        if self._ctx.stops.level or active.end_kind or worker.pid != pid:
            return False
        if name in self._slots.kill_at or self._slots.on_drained_node(name):
            return False
        if run.load_failure or run.plan.name not in worker.loaded or opened(run)._stop_flag:
            return False
        if not ahead.samples_cheaply(opened(run).sampler):  # an AutoSampler moved on
            return False
        limit = self._ctx.settings.max_trials_per_worker
        if limit is not None and worker.trials_run + 1 >= limit:
            return False
        if finished.outcome == "pruned":
            return True
        if finished.outcome != "returned":
            return False
        values, _ = books.objective_values(opened(run), finished.value)
        return values is not None

    def take(
        self, name: str, worker: Worker, run: StudyRun
    ) -> tuple[optuna.Trial, FrozenTrial] | None:
        """A trial for a slot that frees up the usual way, where the study prepares trials:
        the slot's own prepared one, else a new one that leaves the other slots theirs
        (``study.ask()`` would take the oldest enqueued). None: ask as usual."""
        study = opened(run)
        marks = placement(self._ctx.run_dir, name, worker.pid)
        entry = self.next.take(name)
        if entry is not None:
            trial = start_queued(study, entry.trial_id)
            if trial is not None:
                return trial, mark_placed(trial, marks)
        if run.queue_unknown or not self.next.count(run.plan.name):
            return None
        if self.fill(run):
            return None  # the budget's last trials are the prepared ones: take one of them
        trial = ask_new(study, marks)
        return trial, study._storage.get_trial(trial._trial_id)

    def forget(self, name: str) -> None:
        """The slot's worker is gone: its prepared trial stays enqueued for any slot's ask. The
        study's queue then holds a trial that is no slot's, so no more are prepared until an
        ask has taken it (asks that leave the other slots' prepared trials alone would skip it:
        it would be left enqueued, or run as one trial more than the budget)."""
        entry = self.next.take(name)
        if entry is not None:
            self._studies.runs[entry.study].queue_unknown = True
