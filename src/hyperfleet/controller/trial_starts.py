"""Handing trials out to free slots, and the one way a trial starts on a slot.

Each round gives every free slot a trial of the study the fair-share policy picks (see
:mod:`hyperfleet.controller.policy`). A trial then starts through :meth:`TrialStarts.start`,
whatever made its parameters: a prepared next trial (:mod:`hyperfleet.controller.prepared`),
a slow sampler's suggestion computed off the loop's thread
(:mod:`hyperfleet.controller.slow_samplers`), values a sampler process made ready
(:mod:`hyperfleet.controller.sampler_pool`), or an ``ask`` now. Every start, the early one of a
prepared trial sent before its slot's result was recorded included, is counted as running on
its slot by :meth:`TrialStarts.begin`.
"""

from __future__ import annotations

import functools
import time

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.controller import ahead
from hyperfleet.controller import bookkeeping as books
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.outbox import send
from hyperfleet.controller.policy import StudyDemand, pick
from hyperfleet.controller.prepared import Preparer
from hyperfleet.controller.sampler_pool import WAIT_SECONDS, SamplerPool
from hyperfleet.controller.sampler_pools import SamplerPools
from hyperfleet.controller.slot_table import ActiveTrial, Launch, SlotState, SlotTable
from hyperfleet.controller.slow_samplers import Prepared, Suggestions, suggests_slowly
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
    with_others,
)
from hyperfleet.display.events import TrialStarted
from hyperfleet.store import schema
from hyperfleet.store.placing import PlacesTrials
from hyperfleet.workers.handle import Worker
from hyperfleet.workers.protocol import RunTrial


class TrialStarts:
    def __init__(
        self,
        ctx: RunContext,
        slots: SlotTable,
        studies: StudyBook,
        preparer: Preparer,
        folders: TrialFolders,
        pools: SamplerPools,
    ) -> None:
        self._ctx, self._slots, self._studies = ctx, slots, studies
        self._preparer, self._folders = preparer, folders
        self._suggestions = Suggestions(ctx.wake)
        self.pools = pools  # TPE's sampler processes
        # The slots waiting for a sampler process's set: until when, and for which pool.
        self._pool_waits: dict[str, tuple[float, SamplerPool]] = {}

    # ----- handing out ---------------------------------------------------------------------

    def fill_free_slots(self) -> None:
        """Start trials on idle slots while the pool picks some. The idle slots are listed
        once, and after each launch only the slots that share a resource with the one just
        taken are looked at again: at hundreds of slots, listing and weighing them all for
        each launch cost more than the launch."""
        slots = self._slots
        room = {name: slots.room(name) for name in self._idle_slots()}
        if not any(fits for fits, _ in room.values()):
            return
        # Trial folders are made below (by the workers): not in a run folder made again at its
        # path. A study's first one makes its parent, and checks again right before.
        self._ctx.run_dir.check_now_and_then()
        self._studies.recount_shared_budgets()
        runs = self._studies.runs
        allowed = {run.plan.name: frozenset(run.plan.slots) for run in runs.values()}
        while room:
            choice = self._pick(room, allowed)
            if choice is None:
                return
            study_name, slot_name = choice
            worker, run = slots.workers[slot_name], runs[study_name]
            if study_name in worker.loaded:
                self.start(slot_name, worker, run)
            else:
                self._load_then_start(slot_name, worker, run)
            del room[slot_name]
            for name in room:
                if slots.ledger.overlaps(slot_name, name):
                    room[name] = slots.room(name)

    def _pick(
        self, room: dict[str, tuple[bool, float]], allowed: dict[str, frozenset[str]]
    ) -> tuple[str, str] | None:
        """The study and slot of the next trial, or None. Free slots fullest first (packing
        shares onto busy GPUs keeps whole ones free), then those waiting for running trials to
        give resources back, nearest first; sorting is stable, so equal loads keep the pool's
        order."""
        free = sorted((n for n, (fits, _) in room.items() if fits), key=lambda n: -room[n][1])
        if not free:
            return None
        blocked = sorted((n for n, (fits, _) in room.items() if not fits), key=lambda n: room[n][1])
        slots = self._slots
        return pick(
            self._demands(allowed),
            free,
            slots.book,
            slots.cost,
            self._ctx.sequential,
            blocked_slots=blocked,
            overlaps=slots.ledger.overlaps,
            loaded={name: slots.workers[name].loaded for name in free},
        )

    def _idle_slots(self) -> list[str]:
        """Idle slots with a ready worker, in the pool's order."""
        slots = self._slots
        if len(slots.active) + len(slots.sampling) >= len(slots.slots):
            return []  # every slot busy: at hundreds of slots, no need to look at each
        # Busy slots first: at many slots nearly all are, and these two looks are the cheapest.
        return [
            slot.name
            for slot in slots.slots
            if slot.name not in slots.active
            and slot.name not in slots.sampling
            and (worker := slots.workers.get(slot.name)) is not None
            and takes_a_trial(worker)
            and not slots.on_drained_node(slot.name)
        ]

    def _demands(self, allowed: dict[str, frozenset[str]]) -> list[StudyDemand]:
        loading = {run.plan.name for run in self._slots.loading.values()}
        return [
            StudyDemand(
                name=run.plan.name,
                slots=allowed[run.plan.name],
                has_work=self._studies.has_work(run),
                weight=run.plan.weight,
                priority=run.plan.priority,
                stage=run.plan.stage,
                loading=run.plan.name in loading,
            )
            for run in self._studies.runs.values()
        ]

    def _load_then_start(self, name: str, worker: Worker, run: StudyRun) -> None:
        """The slot's first trial of this study: its worker loads the objective first, holding
        the slot's resources and share meanwhile; the trial starts once it has loaded."""
        worker.load(run.plan.name)
        self._slots.hold(name, run, SlotState.LOADING)

    # ----- the one way in ------------------------------------------------------------------

    def start(self, name: str, worker: Worker, run: StudyRun, may_wait: bool = True) -> None:
        """Start a trial of ``run`` on the slot: its slot's prepared one, one a slow sampler
        prepared off the loop's thread (the slot waits for it, if it is not ready), one whose
        values a sampler process made ready (the slot may wait for them: ``may_wait``), or a
        new one asked now. It is sent once its start is committed."""
        study = opened(run)
        prepared_sample = None  # the sampler's part, computed off the loop's thread
        pool = self.pools.pool(run, side_by_side(self._ctx, self._slots))
        pooled = pool.take(run.space, len(self._slots.slots)) if pool is not None else None
        if suggests_slowly(study.sampler):
            prepared_sample = self._suggestions.take(run.plan.name)
            if prepared_sample is None:
                self._sample_then_start(name, run)
                return
        elif pooled is not None:
            prepared_sample = pooled.relative
        elif (
            may_wait and pool is not None and pool.worth_waiting(run.space, len(self._slots.slots))
        ):
            self._wait_for_set(name, run, pool)
            return
        placed = None if prepared_sample else self._preparer.take(name, worker, run)
        trial, stored = placed or self._ask_placed(study, name, worker.pid, prepared_sample)
        computed = prepared_sample is not None and prepared_sample.error is None
        others = pooled.others if pooled is not None else {}
        launch = self._launch_of(run, trial, stored, computed, others)
        if pool is not None:
            key = pooled.key if pooled is not None else None
            pool.started(stored.number, key, launch.message.suggestions)
        self._ctx.pending.sends.append(
            functools.partial(self._deliver, name, worker, launch.message)
        )
        self.begin(name, launch, delivered=False)

    def _deliver(self, name: str, worker: Worker, message: RunTrial) -> None:
        """Send a started trial to its worker, now that its start is committed; unless the
        worker is gone meanwhile, whose exit made the trial one that never ran."""
        active = self._slots.active.get(name)
        if active is None or self._slots.workers.get(name) is not worker:
            return
        if (active.run.plan.name, active.record.number) != (message.objective, message.number):
            return
        active.delivered = send(worker, message)

    def _launch_of(
        self,
        run: StudyRun,
        trial: optuna.Trial,
        stored: FrozenTrial,
        computed: bool,
        others: ahead.Ahead,
    ) -> Launch:
        """The message that starts ``trial`` (``stored``: as the storage has it) and its record.
        ``computed``: its relative sample was computed off the loop's thread; ``others``: values
        a sampler process sampled for the space's other parameters."""
        study = opened(run)
        trial_dir = self._folders.trial_dir(run, trial.number)
        experiment = stored.user_attrs.get(schema.EXPERIMENT_ATTR)
        if experiment is not None:
            run.plan.folder.link_experiment(str(experiment), trial_dir)
        repeats = schema.retry_of(stored) is not None
        inherited = books.inherit_history(study, trial, stored) if repeats else set()
        sides = side_by_side(self._ctx, self._slots)
        suggestions = with_others(sample_ahead(run, trial, stored, computed, sides), others, stored)
        message = run_message(run, stored, trial.datetime_start, suggestions)
        return Launch(run, trial, record_of(study, stored), message, inherited)

    def begin(self, name: str, launch: Launch, delivered: bool = True) -> None:
        """Count a trial sent (or about to be: not ``delivered``) to the slot as running
        there."""
        run, trial, record = launch.run, launch.trial, launch.record
        record.slot = name
        now = time.monotonic()
        timeout = self._ctx.settings.trial_timeout
        active = ActiveTrial(
            run,
            trial,
            record,
            now,
            now + timeout if timeout else None,
            inherited_steps=launch.inherited,
            suggestions=launch.message.suggestions,
            delivered=delivered,
        )
        view = self._slots.begin(name, active)
        run.trial_started(now)
        left = run.time_left(now)
        if left is not None:  # for the view: when the budget runs out if trials keep running
            run.view.ends_at = time.time() + left
        view.trial, view.study, view.since = trial.number, record.study, time.time()
        view.experiment = record.experiment
        run.view.running = self._slots.book.running(run.plan.name)
        self._ctx.emit_after_commit(TrialStarted(self._ctx.state, record))
        self._preparer.began(name, run)

    # ----- slow samplers -------------------------------------------------------------------

    def _sample_then_start(self, name: str, run: StudyRun) -> None:
        """A slow sampler's trial: prepared off the loop's thread while the slot waits, holding
        its resources and share; :meth:`start_sampled` starts it when ready."""
        self._suggestions.start(run.plan.name, opened(run))
        self._slots.hold(name, run, SlotState.SAMPLING)

    def start_sampled(self) -> None:
        """Start the trials prepared off the loop's thread, and those whose set a sampler
        process delivered, on the slots waiting for them (one computation per study at a time:
        the next starts once the last was taken). A stop, or the run's timeout, drops what is
        still being prepared."""
        stops, slots = self._ctx.stops, self._slots
        dropped = stops.level or stops.timed_out(time.monotonic())
        self._forget_gone_waits()
        for name, run in list(slots.sampling.items()):
            if name in self._pool_waits:
                if not dropped and not self._set_came(name, run):
                    continue
                self._pool_waits.pop(name)[1].want(False)  # again below, if others wait
            elif not dropped and not self._suggestions.ready(run.plan.name):
                self._suggestions.start(run.plan.name, opened(run))
                continue
            slots.stop_holding(name)
            slots.move(name, SlotState.IDLE)
            worker = slots.workers.get(name)  # replaced or parked meanwhile: None or new
            if worker is not None and takes_a_trial(worker) and self._studies.has_work(run):
                self.start(name, worker, run, may_wait=False)
        for _, pool in self._pool_waits.values():
            pool.want(True)  # an ended wait may have cleared it for a pool others wait for

    def pool_wait_ends(self) -> float | None:
        """When the first slot's wait for a sampler process's set runs out, if any waits."""
        return min((until for until, _ in self._pool_waits.values()), default=None)

    def _wait_for_set(self, name: str, run: StudyRun, pool: SamplerPool) -> None:
        """No set is ready while the study's sampler processes deliver them: the slot waits
        for the next, holding its resources and share (see controller.sampler_pool)."""
        pool.want(True)
        self._pool_waits[name] = (time.monotonic() + WAIT_SECONDS, pool)
        self._slots.hold(name, run, SlotState.SAMPLING)

    def _set_came(self, name: str, run: StudyRun) -> bool:
        """Whether the slot's wait for a set is over: one is ready, the pool is gone, or the
        wait ran out, this slot's or another's (the controller samples the trial, and samples
        until sets come again)."""
        until, pool = self._pool_waits[name]
        if self.pools.pool(run, side_by_side(self._ctx, self._slots)) is not pool:
            return True
        if pool.ready(run.space, len(self._slots.slots)):
            return True
        if time.monotonic() >= until:
            pool.wait_ran_out()
            return True
        return not pool.worth_waiting(run.space, len(self._slots.slots))

    def _forget_gone_waits(self) -> None:
        """The waits of slots no longer held (their worker exited, a stop): none is left to
        start, and none keeps the loop's timeout short."""
        for name in [n for n in self._pool_waits if n not in self._slots.sampling]:
            self._pool_waits.pop(name)[1].want(False)

    def _ask_placed(
        self, study: optuna.Study, slot: str, pid: int, prepared: Prepared | None = None
    ) -> tuple[optuna.Trial, FrozenTrial]:
        """A new trial, marked with where it runs, and the trial as stored (read once: its user
        attributes through ``trial.user_attrs`` would be deep-copied at every look). The marks
        go in the record that creates the trial when the storage can, else (a queued trial,
        another storage) in three more writes. ``prepared``: the sampler's part of the ask,
        computed off the loop's thread. A queued trial marked for another slot or run (a
        prepared one, see controller.prepared) gets the marks that differ."""
        marks = placement(self._ctx.run_dir, slot, pid)
        storage = study._storage  # the study's storage has no public accessor
        ask = study.ask if prepared is None else functools.partial(prepared.ask, study)
        if isinstance(storage, PlacesTrials):
            with storage.placing(marks):
                trial = ask()
        else:
            trial = ask()
        self._preparer.next.taken_elsewhere(trial._trial_id)
        return trial, mark_placed(trial, marks)


def takes_a_trial(worker: Worker) -> bool:
    """Whether the worker may be given a trial: started, not loading an objective, and not
    about to exit (asked to leave, or after a failed load)."""
    return worker.ready and worker.loading is None and not worker.leaving
