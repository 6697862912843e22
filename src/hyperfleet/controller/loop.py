"""The controller: one process that owns the studies, asks and tells, and keeps every slot busy.

One thread, one loop. Each step gives every free slot a trial of the study the fair-share
policy picks (see :mod:`hyperfleet.controller.policy`), then waits for the first of: a worker's
message (a trial call to answer, a result), a worker's exit, a trial's deadline, a stop request,
or the next display tick. Nothing waits for a batch.

A single search is a campaign of one study that may use every slot.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import psutil
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.cluster.hub import (
    LOST,
    ClusterSettings,
    NodeDraining,
    NodeHub,
    NodeJoined,
    NodeLeft,
    NodeLink,
)
from hyperfleet.cluster.pools import NodePlanner, NodePool, on_node
from hyperfleet.cluster.readings import node_gpus
from hyperfleet.cluster.remote import RemoteWorker
from hyperfleet.config import RunSettings
from hyperfleet.controller import ahead, checkpoints
from hyperfleet.controller import bookkeeping as books
from hyperfleet.controller.autopack import Change
from hyperfleet.controller.calls import check_call_allowed
from hyperfleet.controller.commits import Committer, Effects
from hyperfleet.controller.fleetpack import FleetPack
from hyperfleet.controller.policy import ShareBook, StudyDemand, pick
from hyperfleet.controller.prepared import (
    NextTrial,
    NextTrials,
    ask_new,
    claim_queued,
    create_queued,
    queued_trial,
    start_queued,
)
from hyperfleet.controller.sampling import Prepared, Suggestions, suggests_slowly
from hyperfleet.controller.waiting import Waiter
from hyperfleet.display.events import EventSink
from hyperfleet.display.format import duration
from hyperfleet.display.runstate import NodeView, RunState, SlotView, StudyView, TrialRecord
from hyperfleet.display.snapshot import last_update
from hyperfleet.errors import HyperfleetError, ObjectiveError, WorkerError
from hyperfleet.resources.inventory import Inventory
from hyperfleet.resources.monitor import GpuMonitor
from hyperfleet.resources.shapes import Ledger, Pool
from hyperfleet.resources.slots import Slot
from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.store import schema
from hyperfleet.store.files import FileWriter
from hyperfleet.store.journal import PlacingJournalStorage, commit
from hyperfleet.store.journal import close as close_storage
from hyperfleet.store.rundir import NO_ROOM, RunDir, RunDirGone
from hyperfleet.store.storage import is_private_journal
from hyperfleet.workers.handle import Worker, WorkerHandle, stop_workers
from hyperfleet.workers.protocol import (
    Call,
    Finished,
    Loaded,
    LoadFailed,
    ObjectiveSpec,
    Ready,
    Reply,
    RunTrial,
    StudyInfo,
)

if TYPE_CHECKING:
    from hyperfleet.objective.refit import RefitOutcome

TICK_SECONDS = 1.0
ENQUEUING = frozenset({"enqueue_trial", "add_trial", "add_trials"})  # study calls that queue
CLOSED = object()  # what reading a closed worker connection gives
LOOK_AGAIN_SECONDS = 0.001  # how often long work looks for new remote results (_glance)
FULL_COLLECTION_SECONDS = 60.0  # see Controller._keep_collector_off
PREPARE_SECONDS = 0.002  # the most a step spends preparing next trials (controller.prepared)
MAX_START_FAILURES = 3  # a slot whose worker dies this often before it is ready is given up
NEVER_RAN = "interrupted: its worker exited before the trial reached it; it runs again"
# A worker killed by a stop signal hyperfleet did not send (see workers.handle): the job's
# end (scancel, a time limit, a preemption) signals every process of the job at once, and the
# controller's own SIGTERM may come a little after its workers died of theirs. Its trial ends
# as interrupted if the run starts stopping (or the worker's node goes) within this many
# seconds, else as the crash it was: a worker killed by hand while the run goes on.
OUTSIDE_STOP_SECONDS = 3.0
WAIT_NOTE_AFTER = 10.0  # seconds before the first note on what a run still waits for
# A drained node's trials still running this long (and the kill grace) before it goes are
# ended as interrupted: in time for their end and their logs to come back.
DRAIN_MARGIN_SECONDS = 2.0
WAIT_NOTE_EVERY = 60.0  # and between the notes after it


@dataclass(frozen=True)
class StudyPlan:
    """One study of the run: how to open it, its objective, where it may run and its budget."""

    name: str
    spec: ObjectiveSpec
    open_study: Callable[[], optuna.Study]
    folder: RunDir  # its trial folders go in folder/trials/<number>/
    slots: tuple[str, ...]  # the slots it may use
    n_trials: int | None = None
    # Seconds of the study's own clock, which runs while it has a trial running, over every
    # run (see StudyRun.time_used).
    timeout: float | None = None
    weight: float = 1.0
    priority: int = 0
    stage: int = 0  # order in a sequential run
    stage_name: str = ""  # the campaign file's name for the stage, for the live view
    # The study's trials already in storage, read without creating anything (None: no such
    # study yet); lets a run whose budget is already reached say so without starting workers.
    stored_trials: Callable[[], list[FrozenTrial] | None] = lambda: None
    # The seconds of its time budget it used in earlier runs, read the same way.
    stored_time_used: Callable[[], float] = lambda: 0.0


@dataclass
class StudyRun:
    """A study while it runs: the opened study and what counts against its budget."""

    plan: StudyPlan
    view: StudyView
    study: optuna.Study | None = None
    # Finished trials that count against the budget; the running ones are in the share book.
    finished: int = 0
    # A storage other controllers may write (not this run directory's own journal): the
    # finished trials are then recounted from storage, theirs included.
    shared: bool = False
    best_checkpoint: Path | None = None  # the best trial's, kept by --keep-checkpoints best
    # The time budget's clock: it runs while at least one of the study's trials runs, so a
    # study waiting for its stage, for a slot or for the next run uses none of it. Earlier
    # runs' time is kept in the storage with the study (bookkeeping.TIME_USED_ATTR).
    time_before: float = 0.0  # seconds used by earlier runs
    time_this_run: float = 0.0  # seconds of the periods that ended in this run
    clock_since: float | None = None  # monotonic start of the period going on now
    running: int = 0  # trials running now
    # Its trials in storage when the run started (None: no such study yet).
    stored: list[FrozenTrial] | None = None
    loaded_once: bool = False  # its objective loaded in some worker in this run
    load_failure: str = ""  # why its objective could not be loaded, once the run went on
    released: bool = False  # its workers were told to drop its objective
    # The parameters its complete trials all suggested, with their distributions: those sampled
    # when a trial is sent (see controller.ahead). None: no trial complete yet.
    space: ahead.Space | None = None
    # The storage may hold enqueued trials other than the prepared ones (see
    # controller.prepared): they go first, so no next trial is prepared until they are gone.
    queue_unknown: bool = True

    def time_used(self, now: float) -> float:
        going_on = now - self.clock_since if self.clock_since is not None else 0.0
        return self.time_before + self.time_this_run + going_on

    def trial_started(self, now: float) -> None:
        self.running += 1
        if self.clock_since is None:
            self.clock_since = now

    def trial_ended(self, now: float) -> None:
        self.running -= 1
        if self.running == 0 and self.clock_since is not None:
            self.time_this_run += now - self.clock_since
            self.clock_since = None

    def time_left(self, now: float) -> float | None:
        timeout = self.plan.timeout
        return None if timeout is None else max(0.0, timeout - self.time_used(now))


@dataclass
class ActiveTrial:
    run: StudyRun
    trial: optuna.Trial
    record: TrialRecord
    started: float  # monotonic
    deadline: float | None
    end_kind: str = ""  # set when the controller itself ends the trial (timeout, interrupted)
    end_reason: str = ""
    # Steps an earlier attempt reported: the repeat's own reports of them are left out.
    inherited_steps: set[int] = field(default_factory=set)
    stop_asked: bool = False  # should_stop() answered True: it may end as interrupted
    suggestions: ahead.Ahead = field(default_factory=dict)  # sent with the trial
    # Sent to its worker: the send waits for the trial's start to be committed, and a worker
    # that exits before that never had the trial.
    delivered: bool = True


@dataclass(frozen=True)
class OutsideStop:
    """A trial whose worker a stop signal from outside killed: its end waits (see
    OUTSIDE_STOP_SECONDS) until ``until``, or until the run or its node stops."""

    kind: str
    reason: str
    signal: str
    until: float  # monotonic


@dataclass
class Launch:
    """A trial on its way to a slot: the message, and what the loop keeps once it is sent."""

    run: StudyRun
    trial: optuna.Trial
    record: TrialRecord
    message: RunTrial
    inherited: set[int]


@dataclass
class Outcome:
    """How the run ended: "completed" (budget or time reached), "stopped" or "failed".

    ``study`` is the first study (the only one of a single search); ``studies`` holds them all.
    ``refits`` says, by study name, how each refit went and where its output is (``.folder``).
    """

    status: str
    message: str = ""
    study: optuna.Study | None = None
    counts: dict[str, int] = field(default_factory=dict)
    studies: list[optuna.Study] = field(default_factory=list)
    refits: dict[str, RefitOutcome] = field(default_factory=dict)


class Controller:
    def __init__(
        self,
        plans: list[StudyPlan],
        pool: Pool,
        settings: RunSettings,
        run_dir: RunDir,
        sinks: list[EventSink],
        run_name: str = "",
        sequential: bool = False,
        *,
        files: FileWriter,
        cluster: ClusterSettings | None = None,
        node_planner: NodePlanner | None = None,
    ) -> None:
        used = {name for plan in plans for name in plan.slots}
        self._slots = [slot for slot in pool.slots if slot.name in used]
        self._runs = {plan.name: StudyRun(plan, _study_view(plan)) for plan in plans}
        self._ledger = Ledger(pool.needs)
        self._book = ShareBook()
        self._cost = {slot.name: _slot_cost(slot) for slot in self._slots}
        self._sequential = sequential
        self._settings = settings
        self._run_dir = run_dir
        self._sinks = sinks
        self._workers: dict[str, Worker] = {}
        # Many machines: the agents' nodes, and which node each remote slot is on.
        self._cluster, self._node_planner = cluster, node_planner
        self._hub: NodeHub | None = None
        self._slot_links: dict[str, NodeLink] = {}
        # Nodes their engine takes back (Ray's drain): no new trial goes there; and when the
        # trials still running on each are ended (monotonic), until that is done.
        self._drained: set[str] = set()
        self._drain_cuts: dict[str, float] = {}
        self._active: dict[str, ActiveTrial] = {}
        self._kill_at: dict[str, float] = {}
        self._outside_stops: dict[str, OutsideStop] = {}  # their trials are still in _active
        # Slots whose worker loads a study's objective for the trial it gets next: they hold
        # the slot's resources and share as that trial will.
        self._loading: dict[str, StudyRun] = {}
        # Slots waiting for a trial a slow sampler prepares off the loop's thread (see
        # controller/sampling.py): like loading ones, they hold their resources and share.
        self._sampling: dict[str, StudyRun] = {}
        self._start_failures: dict[str, int] = {}
        self._dead_slots: set[str] = set()
        self._opened = False
        # When the controller before this one last wrote status.json: a trial it left running
        # was running until about then (read before this run writes its own).
        self._last_alive: float | None = None
        self._stop_level = 0
        self._announced_level = 0
        self._hard_stop_at: float | None = None
        self._deadline: float | None = None
        self._waited_out = ""  # what the run still waited for when its timeout passed
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._waiter = Waiter()
        self._suggestions = Suggestions(self._wake)
        self._monitor = GpuMonitor(_gpus_of(self._slots))
        packing = settings.packing
        packed = [slot for slot in self._slots if slot.name in pool.packed]
        # Auto packing: this machine's GPUs, and each node's once it joins (see _add_node).
        self._autopack: FleetPack | None = None
        if packing is not None:
            self._autopack = FleetPack()
            self._autopack.add("", packed, packing, _spare_cores(self._slots))
        self._cpu: dict[str, psutil.Process] = {}
        # What users and workers see of the storage's new records waits for them to be durable:
        # one commit at a time, on the committer's thread, then these run in order (_flush).
        self._pending = Effects()
        self._committer = Committer(self._wake)
        self._files = files  # the caller's: the best/ folders wait on it too
        self._frozen_before = gc.get_freeze_count() > 0  # see _keep_collector_off
        self._full_collection_at = time.monotonic() + FULL_COLLECTION_SECONDS
        self._trial_folders: set[Path] = set()  # the trials/ folders made so far
        # Each busy slot's next trial, prepared while it runs (see controller.prepared): the
        # slots still to prepare one for, and the trials sent before their slot's result was
        # recorded.
        self._next = NextTrials()
        self._to_prepare: deque[str] = deque()
        # Remote workers with news that a glance between pieces of other work found: their
        # prepared next trials are sent; the rest of their news waits for the next step.
        self._glanced: list[RemoteWorker] = []
        self._glance_waiter = Waiter()  # its own poll set: the step's holds more
        self._looked = 0.0  # when the agents' connections were last looked at
        self._sent_next: dict[str, Launch] = {}
        self.state = RunState(
            run_name=run_name or run_dir.path.name,
            run_dir=str(run_dir.path),
            timeout=settings.timeout,
        )
        self.state.slots = [SlotView(s.name, s.kind, s.gpus, s.cores) for s in self._slots]
        self.state.studies = [run.view for run in self._runs.values()]
        self.state.sequential = sequential

    # ----- stopping, from signal handlers or other threads -------------------------------

    def request_stop(self, hard: bool = False, grace: float | None = None) -> None:
        """Level 1: start no new trials. Level 2 (``hard``): end running trials as interrupted.

        With ``grace``, a hard stop follows the soft one after that many seconds (SIGTERM).
        Safe to call from a signal handler: it only sets fields and wakes the loop.
        """
        self._stop_level = 2 if hard else max(self._stop_level, 1)
        if grace is not None and self._hard_stop_at is None:
            self._hard_stop_at = time.monotonic() + grace
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    @property
    def stop_level(self) -> int:
        return self._stop_level

    @property
    def stopped_in_a_hurry(self) -> bool:
        """Stopped hard (a second Ctrl+C) or by SIGTERM: what follows the run should not wait."""
        return self._stop_level >= 2 or self._hard_stop_at is not None

    @property
    def run_dir(self) -> Path:
        return self._run_dir.path

    @property
    def study(self) -> optuna.Study | None:
        """The first study, once the first studies' objectives loaded and it was opened."""
        return next(iter(self._runs.values())).study

    @property
    def studies(self) -> dict[str, optuna.Study]:
        """Every opened study, by name, in the order they were given."""
        return {name: run.study for name, run in self._runs.items() if run.study is not None}

    def announce(self, text: str) -> None:
        """A one-line notice to every view (screen, run.log)."""
        self._emit("on_message", text)

    # ----- the loop ------------------------------------------------------------------------

    def run(self) -> Outcome:
        started = time.monotonic()
        if self._settings.timeout is not None:
            self._deadline = started + self._settings.timeout
        try:
            self._read_stored()
            if self._budgets_already_reached():
                self.state.nothing_to_run = True
                self._open_studies(announce=False)  # said already
                return self._outcome()
            self._listen()
            for slot in self._slots:
                # Starting many workers takes a while: a stop asked meanwhile starts no more.
                if self._stop_level:
                    break
                self._start_worker(slot)
            self._wait_until_loaded()
            if self._stop_level or self._waited_out:
                return self._outcome()
            self._open_studies()
            self._loop()
            self._flush(final=True)
            self._files.drain()  # every trial's files are there when the run returns
            for run in self._runs.values():
                self._sweep_checkpoints(run)
        finally:
            self._close()
        return self._outcome()

    def _open_studies(self, announce: bool = True) -> None:
        for run in self._runs.values():
            run.study = run.plan.open_study()
            self._prepare_study(run)
            if announce:
                self._announce_budget(run)
        self._opened = True
        self._emit("on_start")

    def _read_stored(self) -> None:
        self._last_alive = last_update(self._run_dir.path)
        for run in self._runs.values():
            run.stored = run.plan.stored_trials()
            run.space = ahead.space_of(run.stored or [])
            run.time_before = run.plan.stored_time_used() if run.stored is not None else 0.0

    def _budgets_already_reached(self) -> bool:
        """True when every study has all its trials already (and none left running): the run
        says so in one line per study instead of starting workers for nothing."""
        reached = []
        for run in self._runs.values():
            trials = run.stored
            if trials is None:
                return False
            label = self._study_label(run)
            timeout = run.plan.timeout
            if timeout is not None and run.time_before >= timeout:
                reached.append(
                    f"{label} already used {duration(run.time_before)} of its "
                    f"{duration(timeout)}: nothing to run; raise its timeout to run more"
                )
                continue
            if run.plan.n_trials is None:
                return False
            if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
                return False  # leftovers to mark, or repeats and experiments still to run
            if books.repeats_due(trials, self._settings.retry):
                return False  # failed trials (a named experiment) the retry policy repeats
            used = schema.budget_used(trials)
            if used < run.plan.n_trials:
                return False
            reached.append(
                f"{label} already has {used} of its {run.plan.n_trials} trials: nothing to "
                "run; raise n_trials (--n-trials) to run more"
            )
        for line in reached:
            self.announce(line)
        return True

    def _wait_until_loaded(self) -> None:
        """Open no storage before the objective of a study that starts first has loaded in a
        worker: bad input writes nothing. Those are all the studies with work left, or in a
        sequential run those of the first stage with work left. The first trial starts as soon
        as one of them has loaded (a campaign's first trial does not wait for every data set);
        the others go on loading, and a study whose objective fails then stops alone. What it
        waits for is said now and then, and the run's timeout ends the wait."""
        started = time.monotonic()
        next_note = started + WAIT_NOTE_AFTER
        while not any(run.loaded_once for run in self._first_studies()):
            if self._stop_level:
                return
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                self._waited_out = self._what_it_waits_for()
                return
            if now >= next_note:
                waited = duration(now - started)
                self.announce(f"still waiting after {waited}: {self._what_it_waits_for()}")
                next_note = now + WAIT_NOTE_EVERY
            first = [run for run in self._first_studies() if not run.load_failure]
            for run in first:
                if self._all_dead(run.plan.slots):
                    raise WorkerError(
                        f"every worker that could run study {run.plan.name!r} died while "
                        f"starting; see the logs in {self._run_dir.workers_dir}."
                    )
            self._preload(first)
            self._step(timeout=TICK_SECONDS)

    def _what_it_waits_for(self) -> str:
        if self._hub is not None and not self._workers:
            refused = self._hub.refused_nodes()
            if refused:
                return (
                    f"every node that joined was not used ({', '.join(refused)}; the run log "
                    "says why)"
                )
            return (
                "no node has joined; start an agent on each node (the command is in the line "
                "that says where the controller listens) and check that they can reach it"
            )
        names = ", ".join(run.plan.name for run in self._first_studies())
        return (
            f"no worker has loaded the objective of {names} yet; see the worker logs in "
            f"{self._run_dir.workers_dir}"
        )

    def _first_studies(self) -> list[StudyRun]:
        runs = [run for run in self._runs.values() if self._stored_work_left(run)]
        runs = runs or list(self._runs.values())
        if self._sequential:
            stage = min(run.plan.stage for run in runs)
            runs = [run for run in runs if run.plan.stage == stage]
        return runs

    def _stored_work_left(self, run: StudyRun) -> bool:
        """Whether the study has work left, judged from the storage before it is opened."""
        if run.time_left(time.monotonic()) == 0.0:
            return False
        trials, n_trials = run.stored, run.plan.n_trials
        if trials is None or n_trials is None:
            return True
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
            return True  # leftovers to repeat, or experiments to run
        return schema.budget_used(trials) < n_trials

    def _preload(self, first: list[StudyRun]) -> None:
        """Give each ready worker one of the first studies' objectives to load: one nobody
        holds yet, else (once per worker) the one the fewest hold, so that every slot is
        ready for a trial when the storage opens."""
        holders = {run.plan.name: 0 for run in first}
        for worker in self._workers.values():
            held = {*worker.loaded, worker.loading or ""}
            for study in held & holders.keys():
                holders[study] += 1
        for name, worker in self._workers.items():
            if not _takes_a_trial(worker):
                continue
            mine = [run for run in first if name in run.plan.slots]
            unheld = [run for run in mine if not holders[run.plan.name]]
            holds_one = any(run.plan.name in worker.loaded for run in mine)
            if not unheld and (holds_one or not mine):
                continue
            run = min(unheld or mine, key=lambda r: holders[r.plan.name])
            worker.load(run.plan.name)
            holders[run.plan.name] += 1
            self.state.slot(name).state = "loading"

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            self._announce_stop()
            self._settle_outside_stops()
            if self._stop_level >= 2:
                self._interrupt_running()
                return
            self._launch_sampled()
            self._launch_on_free_slots()
            self._release_done_studies()
            self._prepare_next()
            self._flush()
            busy = self._active or self._loading or self._sampling
            if not busy and not any(self._has_work(r) for r in self._runs.values()):
                return
            if self._hub is None and len(self._dead_slots) == len(self._slots):
                return
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick = now + TICK_SECONDS
            timeout = max(0.0, min(next_tick, self._next_deadline()) - now)
            self._step(timeout=0.0 if self._to_prepare else timeout)
            self._enforce_deadlines()

    def _flush(self, final: bool = False) -> None:
        """Commit what the storage was told (one ``fsync`` for a journal), then let what
        depends on it happen: trials sent to workers, trial files, run log lines.

        The commit runs on the committer's thread while the loop goes on (``final``: here, and
        waited for); what the loop writes meanwhile goes with the next commit. Nothing else
        waits for the disk: a trial's suggestions and attributes are committed with its end,
        since until then only its own objective has seen them (and a crash before that makes
        it an interrupted trial, which runs again)."""
        self._files.raise_failure()
        done = self._committer.finished(wait=final)
        if done is not None:
            self._run_effects(done)
        if self._committer.busy or (not self._pending and not final):
            return
        effects, self._pending = self._pending, Effects()
        storages = [study._storage for study in self.studies.values()]  # no public accessor
        if final:
            for storage in storages:
                commit(storage)
            self._run_effects(effects)
            return
        ready = self._committer.start(storages, effects)
        if ready is not None:  # nothing to commit: an in-memory or a database storage
            self._run_effects(ready)

    def _run_effects(self, effects: Effects) -> None:
        if effects.others:
            # Writing into a run folder that was deleted or moved would make a new one there.
            self._run_dir.check_now_and_then()
        for effect in [*effects.sends, *effects.others]:
            effect()
            self._glance()

    def _step(self, timeout: float) -> None:
        local = [(n, w) for n, w in self._workers.items() if isinstance(w, WorkerHandle)]
        waitables: list[Any] = [self._wake_r]
        if self._hub is not None:
            waitables.extend(self._hub.waitables())
            if self._hub.attention or self._glanced:
                timeout = 0.0  # news already in: from a glance, or a worker the loop ended
        for _, worker in local:
            waitables.extend(worker.waitables())
        ready = self._waiter.wait(waitables, timeout)
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
            self._take_node_events()
        self._take_local(local, ready)
        if self._hub is not None:
            self._take_remote(ready)

    def _take_local(self, local: list[tuple[str, WorkerHandle]], ready: list[Any]) -> None:
        received = [(n, h, self._read(h)) for n, h in local if h.conn in ready]
        sent = False
        for name, handle, message in received:
            if isinstance(message, Finished):  # prepared next trials leave first
                sent = self._start_next(name, handle, message) or sent
        if sent:
            # Hand this core to the workers just sent a trial before recording their results:
            # with as many busy processes as cores, a worker woken by its trial otherwise
            # waited for the rest of this step (on 2 cores, the median turnaround went from
            # 3.3-3.8 ms to 2.2-2.5 with it). With a core to spare this returns at once.
            os.sched_yield()
        ended = {
            name
            for name, handle, message in received
            if message is CLOSED or not self._handle_guarded(name, handle, message)
        }
        for name, handle in local:
            # An exit makes the connection (EOF) or the process's pidfd ready; without a pidfd
            # the process is asked at every step.
            if name in ended or handle.exit_fd is None or handle.exit_fd in ready:
                self._after_news(name, handle)

    def _take_remote(self, ready: list[Any]) -> None:
        """Handle the remote workers' news, with what glances found since the last step."""
        news, self._glanced = [*self._glanced, *self._remote_news(ready)], []
        self._looked = time.monotonic()
        for remote in news:
            name = remote.slot.name
            if self._workers.get(name) is remote:
                self._drain(name, remote)
                self._after_news(name, remote)
            self._glance()
            news += self._glanced  # handled in this step, like the rest
            self._glanced = []

    def _glance(self) -> None:
        """Between pieces of a long piece of work (a step that handles tens of results, the
        effects of a commit, preparing trials): once a millisecond, look at the agents'
        connections, and send the prepared next trial of each slot whose result came in
        meanwhile, instead of leaving the slot waiting until the work is done (at 512 slots,
        the 99th percentile of a slot's wait went from 22-26 ms to 7-11 ms)."""
        if self._hub is None or time.monotonic() - self._looked < LOOK_AGAIN_SECONDS:
            return
        ready = self._glance_waiter.wait(self._hub.waitables(), 0.0)
        self._glanced += self._remote_news(ready)
        self._looked = time.monotonic()

    def _remote_news(self, ready: list[Any]) -> list[RemoteWorker]:
        """The remote workers with news, once their prepared next trials are on their way."""
        assert self._hub is not None
        self._hub.pump(ready)  # remote workers' messages into their inboxes
        # Only the remote workers with news: at hundreds of slots, looking at each one at
        # every step would cost more than the step's own work.
        news = [w for w in self._hub.take_attention() if self._workers.get(w.slot.name) is w]
        for remote in news:  # prepared next trials leave first, together
            last = remote.conn.last()
            if isinstance(last, Finished):
                self._start_next(remote.slot.name, remote, last)
        self._hub.flush()
        return news

    def _after_news(self, name: str, worker: Worker) -> None:
        if self._workers.get(name) is worker and worker.has_exited():
            self._drain(name, worker)
            self._on_worker_exit(name, worker)

    def _drain(self, name: str, worker: Worker) -> None:
        """Handle every message the worker has sent; a worker that died sends EOF."""
        while worker.conn.poll() and self._receive(name, worker):
            pass

    def _receive(self, name: str, worker: Worker) -> bool:
        """Handle one message of a worker whose connection is ready; False once it is closed."""
        message = self._read(worker)
        return message is not CLOSED and self._handle_guarded(name, worker, message)

    def _read(self, worker: Worker) -> object:
        """One message of a worker whose connection is ready, or CLOSED. The loop takes one
        per step: its poll says so again if there are more, where asking the connection
        itself would build a poll of its own for each message."""
        try:
            return worker.conn.recv()
        except EOFError:
            return CLOSED
        except OSError as exc:
            _raise_if_no_room(exc)
            return CLOSED

    def _handle_guarded(self, name: str, worker: Worker, message: object) -> bool:
        """Handle a message; False when the worker's connection failed meanwhile."""
        try:
            self._handle(name, worker, message)
        except OSError as exc:
            _raise_if_no_room(exc)
            return False
        return True

    def _handle(self, name: str, worker: Worker, message: object) -> None:
        if isinstance(message, Call):
            self._answer(name, worker, message)
        elif isinstance(message, Finished):
            self._on_finished(name, worker, message)
        elif isinstance(message, Ready):
            if self._autopack is not None and self._autopack.leaving(name):
                return  # retired while it started: it reads the request to leave next
            worker.ready = True
            if self._autopack is not None:
                self._autopack.ready(name, time.monotonic())
            view = self.state.slot(name)
            view.state, view.pid = "idle", message.pid
        elif isinstance(message, Loaded):
            self._on_loaded(name, worker, message.study)
        elif isinstance(message, LoadFailed):
            self._on_load_failed(name, message)

    # ----- launching -----------------------------------------------------------------------

    def _has_work(self, run: StudyRun) -> bool:
        """May the study start another trial now (stop, deadlines, budget)?"""
        if self._stop_level or run.study is None or run.load_failure:
            return False
        now = time.monotonic()
        if self._deadline is not None and now >= self._deadline:
            return False
        if run.time_left(now) == 0.0:
            return False
        if self._all_dead(run.plan.slots):
            return False
        n_trials = run.plan.n_trials
        return n_trials is None or self._reserved(run) < n_trials

    def _reserved(self, run: StudyRun) -> int:
        """The study's trials that count against its budget: finished, running, and sent to a
        slot whose result before it is still to be recorded (see _start_next)."""
        sent = sum(1 for launch in self._sent_next.values() if launch.run is run)
        return run.finished + self._book.running(run.plan.name) + sent

    def _idle_slots(self) -> list[str]:
        """Idle slots with a ready worker, in the pool's order."""
        if len(self._active) + len(self._sampling) >= len(self._slots):
            return []  # every slot busy: at hundreds of slots, no need to look at each
        return [
            slot.name
            for slot in self._slots
            if (worker := self._workers.get(slot.name)) is not None
            and _takes_a_trial(worker)
            and not self._on_drained_node(slot.name)
            and slot.name not in self._active
            and slot.name not in self._sampling
        ]

    def _launch_on_free_slots(self) -> None:
        """Start trials on idle slots while the pool picks some. The idle slots are listed
        once, and after each launch only the slots that share a resource with the one just
        taken are looked at again: at hundreds of slots, listing and weighing them all for
        each launch cost more than the launch."""
        room = {name: self._room(name) for name in self._idle_slots()}
        if not any(fits for fits, _ in room.values()):
            return
        # Trial folders are made below (by the workers): not in a run folder made again at its
        # path. A study's first one makes its parent, and checks again right before.
        self._run_dir.check_now_and_then()
        self._recount_shared_budgets()
        allowed = {run.plan.name: frozenset(run.plan.slots) for run in self._runs.values()}
        while room:
            # Free slots fullest first (packing shares onto busy GPUs keeps whole ones free),
            # then those waiting for running trials to give resources back, nearest first;
            # sorting is stable, so equal loads keep the pool's order.
            free = sorted((n for n, (fits, _) in room.items() if fits), key=lambda n: -room[n][1])
            if not free:
                return
            blocked = sorted(
                (n for n, (fits, _) in room.items() if not fits), key=lambda n: room[n][1]
            )
            choice = pick(
                self._demands(allowed),
                free,
                self._book,
                self._cost,
                self._sequential,
                blocked_slots=blocked,
                overlaps=self._ledger.overlaps,
                loaded={name: self._workers[name].loaded for name in free},
            )
            if choice is None:
                return
            study_name, slot_name = choice
            worker, run = self._workers[slot_name], self._runs[study_name]
            if study_name in worker.loaded:
                self._launch(slot_name, worker, run)
            else:
                self._load_then_launch(slot_name, worker, run)
            del room[slot_name]
            for name in room:
                if self._ledger.overlaps(slot_name, name):
                    room[name] = self._room(name)

    def _room(self, name: str) -> tuple[bool, float]:
        """Whether the slot's resources are free now, and how full the fullest of them is."""
        return self._ledger.fits(name), self._ledger.load(name)

    def _demands(self, allowed: dict[str, frozenset[str]]) -> list[StudyDemand]:
        loading = {run.plan.name for run in self._loading.values()}
        return [
            StudyDemand(
                name=run.plan.name,
                slots=allowed[run.plan.name],
                has_work=self._has_work(run),
                weight=run.plan.weight,
                priority=run.plan.priority,
                stage=run.plan.stage,
                loading=run.plan.name in loading,
            )
            for run in self._runs.values()
        ]

    def _load_then_launch(self, name: str, worker: Worker, run: StudyRun) -> None:
        """The slot's first trial of this study: its worker loads the objective first, holding
        the slot's resources and share meanwhile; the trial starts once it has loaded."""
        worker.load(run.plan.name)
        self._loading[name] = run
        self._ledger.claim(name)
        self._book.start(run.plan.name, name, self._cost[name])
        view = self.state.slot(name)
        view.state, view.study = "loading", run.plan.name

    def _on_loaded(self, name: str, worker: Worker, study: str) -> None:
        worker.loading = None
        self._start_failures[name] = 0
        worker.loaded.add(study)
        run = self._runs[study]
        run.loaded_once = True
        view = self.state.slot(name)
        view.state, view.study = "idle", None
        if self._loading.pop(name, None) is not None:
            self._ledger.release(name)
            self._book.stop(name)
            # A worker auto packing retired while it loaded reads the request to leave next.
            if self._has_work(run) and not worker.leaving:
                self._launch(name, worker, run)
        if run.released:  # the study ended while this worker was loading it
            worker.release(study)

    def _release_done_studies(self) -> None:
        """Have the workers drop the objective (and its data set) of every study that has
        nothing left to run, so that a sequential run holds one stage's data at a time."""
        if self._stop_level:
            return  # everything is dropped at the end anyway
        loading = {run.plan.name for run in self._loading.values()}
        for run in self._runs.values():
            if run.released or run.running or run.plan.name in loading:
                continue
            if not self._budget_spent(run):
                continue
            run.released = True
            for worker in self._workers.values():
                if run.plan.name in worker.loaded:
                    worker.release(run.plan.name)

    def _budget_spent(self, run: StudyRun) -> bool:
        """Whether the study is done for good: its trials, its time or its objective."""
        if run.study is None:
            return False
        if run.load_failure or run.time_left(time.monotonic()) == 0.0:
            return True
        n_trials = run.plan.n_trials
        return n_trials is not None and run.finished >= n_trials

    def _recount_shared_budgets(self) -> None:
        """On a storage other controllers share, the study's finished trials are counted from
        storage before slots are handed out, so that several runs together keep to
        ``n_trials``. Trials the others are running are not counted: a RUNNING trial may be a
        dead controller's leftover that nobody resumes, and counting it would hold the budget
        back for ever; so the runs together can pass the budget by the trials the others have
        running at the end.

        Counting reads every trial of the study (a few milliseconds at 10,000 trials), once
        per round of hand-outs: a count kept between rounds would miss the others' trials.
        The run directory's own journal, the default, has no other writer and is not
        recounted."""
        for run in self._runs.values():
            if not run.shared or run.study is None or run.plan.n_trials is None:
                continue
            run.finished = schema.budget_used(run.study.get_trials(deepcopy=False))

    def _launch(self, name: str, worker: Worker, run: StudyRun) -> None:
        study = _opened(run)
        prepared_sample = None  # the sampler's part, computed off the loop's thread
        if suggests_slowly(study.sampler):
            prepared_sample = self._suggestions.take(run.plan.name)
            if prepared_sample is None:
                self._sample_then_launch(name, run)
                return
        placed = None if prepared_sample else self._take_prepared(name, worker, run)
        trial, stored = placed or self._ask_placed(study, name, worker.pid, prepared_sample)
        computed = prepared_sample is not None and prepared_sample.error is None
        launch = self._launch_of(run, trial, stored, computed)
        self._pending.sends.append(functools.partial(self._deliver, name, worker, launch.message))
        self._begin(name, launch, delivered=False)

    def _deliver(self, name: str, worker: Worker, message: RunTrial) -> None:
        """Send a launched trial to its worker, now that its start is committed; unless the
        worker is gone meanwhile, whose exit made the trial one that never ran."""
        active = self._active.get(name)
        if active is None or self._workers.get(name) is not worker:
            return
        if (active.run.plan.name, active.record.number) != (message.objective, message.number):
            return
        active.delivered = _send(worker, message)

    def _launch_of(
        self, run: StudyRun, trial: optuna.Trial, stored: FrozenTrial, computed: bool
    ) -> Launch:
        """The message that starts ``trial`` (``stored``: as the storage has it) and its record.
        ``computed``: its relative sample was computed off the loop's thread."""
        study = _opened(run)
        trial_dir = self._trial_dir(run, trial.number)
        experiment = stored.user_attrs.get(schema.EXPERIMENT_ATTR)
        if experiment is not None:
            run.plan.folder.link_experiment(str(experiment), trial_dir)
        repeats = schema.retry_of(stored) is not None
        inherited = books.inherit_history(study, trial, stored) if repeats else set()
        suggestions = self._sample_ahead(run, trial, stored, computed)
        message = _run_message(run, stored, trial.datetime_start, suggestions)
        return Launch(run, trial, _record_of(study, stored), message, inherited)

    def _trial_dir(self, run: StudyRun, number: int) -> Path:
        """The trial's folder, whose parent is made here for a study's first trial (the
        worker makes the trial's own)."""
        trial_dir = run.plan.folder.trial_dir(number)
        if trial_dir.parent not in self._trial_folders:
            self._run_dir.check_still_there()
            trial_dir.parent.mkdir(parents=True, exist_ok=True)
            self._trial_folders.add(trial_dir.parent)
        return trial_dir

    def _begin(self, name: str, launch: Launch, delivered: bool = True) -> None:
        """Count a trial sent (or about to be: not ``delivered``) to the slot as running
        there."""
        run, trial, record = launch.run, launch.trial, launch.record
        record.slot = name
        now = time.monotonic()
        timeout = self._settings.trial_timeout
        self._active[name] = ActiveTrial(
            run,
            trial,
            record,
            now,
            now + timeout if timeout else None,
            inherited_steps=launch.inherited,
            suggestions=launch.message.suggestions,
            delivered=delivered,
        )
        self._ledger.claim(name)
        self._book.start(run.plan.name, name, self._cost[name])
        run.trial_started(now)
        left = run.time_left(now)
        if left is not None:  # for the view: when the budget runs out if trials keep running
            run.view.ends_at = time.time() + left
        view = self.state.slot(name)
        view.state, view.trial, view.study, view.since = (
            "busy",
            trial.number,
            record.study,
            time.time(),
        )
        view.experiment = record.experiment
        run.view.running = self._book.running(run.plan.name)
        self._pending.others.append(functools.partial(self._emit, "on_trial_start", record))
        if self._prepares(run):
            self._to_prepare.append(name)

    # ----- next trials, prepared while their slot runs (controller.prepared) ---------------

    def _prepares(self, run: StudyRun) -> bool:
        """Whether the study's next trials are prepared ahead: where their order cannot matter
        to the search (see controller.prepared)."""
        if self._stop_level or len(self._runs) != 1 or self._autopack is not None:
            return False
        if self._hub is None and len(self._slots) == 1:
            return False  # one slot: the trials study.optimize gives, in its order
        if run.plan.timeout is not None or self._deadline is not None:
            return False  # a prepared trial would outlive the time limit, enqueued
        return run.study is not None and ahead.samples_cheaply(run.study.sampler)

    def _prepare_next(self) -> None:
        """Prepare the next trials of busy slots that have none, for a few milliseconds per
        step at most, so that the workers' messages never wait behind many (at the start,
        every slot needs one)."""
        until = time.monotonic() + PREPARE_SECONDS
        while self._to_prepare and time.monotonic() < until:
            self._prepare_one(self._to_prepare.popleft())
            self._glance()

    def _prepare_one(self, name: str) -> None:
        active, worker = self._active.get(name), self._workers.get(name)
        if active is None or worker is None or name in self._next:
            return
        run = active.run
        if not self._prepares(run) or not self._queue_is_ours(run) or self._prepared_fill(run):
            return
        study = _opened(run)
        stored = create_queued(study, self._placement(name, worker.pid))
        self._trial_dir(run, stored.number)
        suggestions = self._sample_ahead(run, None, stored, False)
        message = _run_message(run, stored, None, suggestions)
        entry = NextTrial(run.plan.name, stored, worker.pid, message, run.space)
        self._next.add(name, entry)
        self._pending.others.append(functools.partial(setattr, entry, "committed", True))

    def _prepared_fill(self, run: StudyRun) -> bool:
        """Whether the study's prepared trials take what its budget has left."""
        n_trials = run.plan.n_trials
        prepared = self._next.count(run.plan.name)
        return n_trials is not None and self._reserved(run) + prepared >= n_trials

    def _queue_is_ours(self, run: StudyRun) -> bool:
        """Whether every enqueued trial of the study is a prepared one; looked up only after
        something else may have been enqueued (a repeat, the objective's enqueue_trial)."""
        if run.queue_unknown:
            study = _opened(run)
            waiting = study._storage.get_all_trials(
                study._study_id, deepcopy=False, states=(TrialState.WAITING,)
            )
            run.queue_unknown = any(not self._next.owns(t._trial_id) for t in waiting)
        return not run.queue_unknown

    def _start_next(self, name: str, worker: Worker, finished: Finished) -> bool:
        """Send the slot its prepared next trial now, before the result that freed it is
        recorded; :meth:`_on_finished` counts it as running once that is done."""
        entry, active = self._next.peek(name), self._active.get(name)
        if entry is None or active is None or name in self._sent_next:
            return False
        if not entry.committed or not self._goes_on(name, worker, active, finished, entry.pid):
            return False
        self._next.take(name)
        run, stored = active.run, entry.stored
        study = _opened(run)
        message = replace(entry.message, datetime_start=datetime.datetime.now())
        space = run.space
        if finished.outcome == "returned":  # it completes: the space narrows as its tell will
            space = ahead.narrowed(space, active.trial.distributions)
        if entry.space != space:  # trials ended meanwhile
            suggestions = self._sample_ahead(run, None, stored, False, space)
            message = replace(message, suggestions=suggestions)
        if run.shared:
            if not claim_queued(study, entry.trial_id):
                return False  # another process's ask took it: the slot gets one the usual way
            _send(worker, message)
        else:
            # The run directory's own journal: no other process takes its queued trials, and
            # this one no longer can, so the trial leaves before its start is written.
            _send(worker, message)
            if not claim_queued(study, entry.trial_id):  # cannot happen: a bug, not to hide
                raise RuntimeError(
                    f"hyperfleet: prepared trial {message.number} was started by another ask "
                    "although the run folder's journal has no other writer; this is a bug: run "
                    "the same command again to resume, and please report it"
                )
        trial = queued_trial(study, entry.trial_id)
        self._sent_next[name] = Launch(run, trial, _record_of(study, stored), message, set())
        return True

    def _goes_on(
        self, name: str, worker: Worker, active: ActiveTrial, finished: Finished, pid: int
    ) -> bool:
        """Whether the worker's result leaves it to run the study's next trial at once: a
        result the study takes, no stop, no reason to replace the worker."""
        run = active.run
        if self._stop_level or active.end_kind or name in self._kill_at or worker.pid != pid:
            return False
        if self._on_drained_node(name):
            return False
        if run.load_failure or run.plan.name not in worker.loaded:
            return False
        if not ahead.samples_cheaply(_opened(run).sampler):  # an AutoSampler moved on
            return False
        limit = self._settings.max_trials_per_worker
        if limit is not None and worker.trials_run + 1 >= limit:
            return False
        if finished.outcome == "pruned":
            return True
        if finished.outcome != "returned":
            return False
        values, _ = books.objective_values(_opened(run), finished.value)
        return values is not None

    def _take_prepared(
        self, name: str, worker: Worker, run: StudyRun
    ) -> tuple[optuna.Trial, FrozenTrial] | None:
        """A trial for a slot that frees up the usual way, where the study prepares trials:
        the slot's own prepared one, else a new one that leaves the other slots theirs
        (``study.ask()`` would take the oldest enqueued). None: ask as usual."""
        study = _opened(run)
        placement = self._placement(name, worker.pid)
        entry = self._next.take(name)
        if entry is not None:
            trial = start_queued(study, entry.trial_id)
            if trial is not None:
                return trial, _mark_placed(trial, placement)
        if run.queue_unknown or not self._next.count(run.plan.name):
            return None
        if self._prepared_fill(run):
            return None  # the budget's last trials are the prepared ones: take one of them
        trial = ask_new(study, placement)
        return trial, study._storage.get_trial(trial._trial_id)

    def _forget_next(self, name: str) -> None:
        """The slot's worker is gone: its prepared trial stays enqueued for any slot's ask."""
        self._next.take(name)

    def _sample_ahead(
        self,
        run: StudyRun,
        trial: optuna.Trial | None,
        stored: FrozenTrial,
        prepared: bool,
        space: ahead.Space | None = None,
    ) -> ahead.Ahead:
        """The suggestions sent with a trial, where trials run side by side (with one slot and
        no nodes, a seeded sampler gives the trials study.optimize gives: none are sent).
        ``prepared``: its relative sample was computed off the loop's thread. ``space``: the
        study's, unless said."""
        if self._hub is None and len(self._slots) == 1:
            return {}
        space = run.space if space is None else space
        return ahead.sample(_opened(run), trial, stored, space or {}, prepared)

    def _sample_then_launch(self, name: str, run: StudyRun) -> None:
        """A slow sampler's trial: prepared off the loop's thread while the slot waits, holding
        its resources and share; :meth:`_launch_sampled` starts it when ready."""
        self._suggestions.start(run.plan.name, _opened(run))
        self._sampling[name] = run
        self._ledger.claim(name)
        self._book.start(run.plan.name, name, self._cost[name])
        view = self.state.slot(name)
        view.state, view.study = "sampling", run.plan.name

    def _launch_sampled(self) -> None:
        """Start the trials prepared off the loop's thread, on the slots waiting for them (one
        computation per study at a time: the next starts once the last was taken). A stop, or
        the run's timeout, drops what is still being prepared."""
        now = time.monotonic()
        dropped = self._stop_level or (self._deadline is not None and now >= self._deadline)
        for name, run in list(self._sampling.items()):
            if not dropped and not self._suggestions.ready(run.plan.name):
                self._suggestions.start(run.plan.name, _opened(run))
                continue
            del self._sampling[name]
            self._ledger.release(name)
            self._book.stop(name)
            self.state.slot(name).state = "idle"
            worker = self._workers.get(name)  # replaced or parked meanwhile: None or new
            if worker is not None and _takes_a_trial(worker) and self._has_work(run):
                self._launch(name, worker, run)

    def _ask_placed(
        self, study: optuna.Study, slot: str, pid: int, prepared: Prepared | None = None
    ) -> tuple[optuna.Trial, FrozenTrial]:
        """A new trial, marked with where it runs, and the trial as stored (read once: its user
        attributes through ``trial.user_attrs`` would be deep-copied at every look). The marks
        go in the record that creates the trial when the storage can, else (a queued trial,
        another storage) in three more writes. ``prepared``: the sampler's part of the ask,
        computed off the loop's thread. A queued trial marked for another slot or run (a
        prepared one, see controller.prepared) gets the marks that differ."""
        placement = self._placement(slot, pid)
        storage = study._storage  # the study's storage has no public accessor
        ask = study.ask if prepared is None else functools.partial(prepared.ask, study)
        if isinstance(storage, PlacingJournalStorage):
            with storage.placing(placement):
                trial = ask()
        else:
            trial = ask()
        self._next.taken_elsewhere(trial._trial_id)
        return trial, _mark_placed(trial, placement)

    def _placement(self, slot: str, pid: int) -> dict[str, Any]:
        """The marks of where a trial runs, as its system attributes."""
        return {
            schema.RUN_ATTR: self._run_dir.identity,
            schema.SLOT_ATTR: slot,
            schema.PID_ATTR: pid,
        }

    # ----- answering trial calls -----------------------------------------------------------

    def _answer(self, name: str, worker: Worker, call: Call) -> None:
        if call.answered:
            self._record_answered(name, call)
            return
        active = self._active.get(name)
        try:
            if active is None:
                raise RuntimeError(f"hyperfleet: no trial is running for call {call.name!r}")
            check_call_allowed(call)
            if call.target == "study" and call.name in ENQUEUING:
                active.run.queue_unknown = True  # it goes before prepared trials
            reply = Reply(value=self._call_value(active, call))
        except OSError:
            raise  # the storage itself failed (a full disk): nothing more can be recorded
        except Exception as exc:  # the objective gets the very exception Optuna raised
            reply = Reply(error=exc)
        try:
            worker.conn.send(reply)
        except Exception as exc:  # an unpicklable value or error: say so instead
            worker.conn.send(Reply(error=RuntimeError(f"hyperfleet: cannot send reply: {exc}")))

    def _record_answered(self, name: str, call: Call) -> None:
        """Record a suggestion the worker took from those sent with its trial, through the
        trial's own suggest, with the sampler answering the value sent."""
        active = self._active.get(name)
        if active is None:
            return  # its trial ended meanwhile (a timeout): nothing left to record it on
        study = _opened(active.run)
        sampler = study.sampler
        study.sampler = ahead.Answers(sampler, active.suggestions)
        try:
            check_call_allowed(call)
            self._call_value(active, call)
        except OSError:
            raise  # the storage itself failed (a full disk): nothing more can be recorded
        except Exception as exc:  # not expected: the value was sampled for this very call
            self.announce(
                f"trial {active.trial.number}: its suggestion {call.args[:1]} could not be "
                f"recorded: {type(exc).__name__}: {exc}"
            )
        finally:
            study.sampler = sampler

    def _call_value(self, active: ActiveTrial, call: Call) -> Any:
        if call.target == "hyperfleet":  # should_stop, the only question for the controller
            return self._stop_asked(active)
        if call.name == "report" and _reported_step(call) in active.inherited_steps:
            return None  # an earlier attempt reported this step; its value stays, as in Optuna
        target: Any = active.trial if call.target.startswith("trial") else active.run.study
        attr = getattr(target, call.name)
        return attr if call.target.endswith("_attr") else attr(*call.args, **call.kwargs)

    def _stop_asked(self, active: ActiveTrial) -> bool:
        """True once SIGTERM has set a hard stop: the trial should save and stop. A first
        Ctrl+C lets running trials finish, so it answers False then."""
        asked = self.stopped_in_a_hurry or self._on_drained_node(active.record.slot)
        active.stop_asked = active.stop_asked or asked
        return asked

    # ----- ending trials -------------------------------------------------------------------

    def _on_finished(self, name: str, worker: Worker, finished: Finished) -> None:
        active = self._active.get(name)
        if active is None:
            return
        worker.trials_run += 1
        sent = self._sent_next.pop(name, None)
        failed = self._tell_finished(name, active, finished)
        if sent is not None:  # its next trial went already (_start_next): it runs now
            self._begin(name, sent)
        limit = self._settings.max_trials_per_worker
        if self._autopack is not None:
            ended = (active.started, time.monotonic())
            self._autopack.trial_ended(name, *ended, finished.gpu_peak_mib, failed)
            if self._autopack.leaving(name):
                self._park(name, worker, graceful=not failed)
                return
        if failed:
            # A failed trial may leave the process broken (a CUDA context after an OOM, half-set
            # globals, threads or children it started): its slot gets a fresh worker.
            self._retire_worker(name, worker)
        elif limit is not None and worker.trials_run >= limit and not self._stop_level:
            self._replace_worker(name, worker, graceful=True)

    def _tell_finished(self, name: str, active: ActiveTrial, finished: Finished) -> bool:
        """Record how the objective ended; True when the trial failed."""
        study = _opened(active.run)
        if finished.outcome == "pruned":
            self._tell(name, TrialState.PRUNED)
            return False
        if finished.outcome == "interrupted":
            self._tell_interrupted(name, active)
            return True
        if finished.outcome == "returned":
            values, problem = books.objective_values(study, finished.value)
            if values is not None:
                self._tell(name, TrialState.COMPLETE, values)
                return False
            self._tell(name, TrialState.FAIL, kind="error", reason=problem)
        elif finished.outcome == "error":
            kind = schema.classify_error(finished.error_type, finished.message)
            reason = f"{finished.error_type}: {finished.message}"
            if kind == "oom":
                on = schema.out_of_memory_on(finished.error_type, finished.message)
                reason = f"{schema.HOST_OOM_REASON if on == 'host' else 'out of memory'}: {reason}"
            elif finished.error_type == "SystemExit":
                reason = f"the objective called {finished.message}"
            self._tell(
                name, TrialState.FAIL, kind=kind, reason=reason, traceback_text=finished.traceback
            )
        else:
            self._tell(
                name,
                TrialState.FAIL,
                kind="error",
                reason=f"the result cannot be sent back: {finished.message}",
            )
        return True

    def _tell_interrupted(self, name: str, active: ActiveTrial) -> None:
        """The objective raised TrialInterrupted: an interruption (repeated, from its
        checkpoint) when the run is stopping, else an error, which a policy must allow to
        repeat: a trial that interrupts itself unasked would otherwise run for ever."""
        if active.stop_asked or self._stop_asked(active):
            why = "SIGTERM"
            if self._on_drained_node(name):
                why = f"node {self._slot_links[name].node} is taken back by its engine"
            reason = f"interrupted: it stopped when asked to ({why}); its next attempt continues"
            self._tell(name, TrialState.FAIL, kind="interrupted", reason=reason)
            return
        reason = (
            "TrialInterrupted: the objective raised it although hyperfleet did not ask the trial "
            "to stop; raise it only after hyperfleet.should_stop(trial) answers True"
        )
        self._tell(name, TrialState.FAIL, kind="error", reason=reason)

    def _on_worker_exit(self, name: str, worker: Worker) -> None:
        active = self._active.get(name)
        if active is not None:
            kind, reason = worker.exit_description()
            outside = worker.outside_signal() if kind == "crash" else ""
            if active.end_kind:
                kind, reason = active.end_kind, active.end_reason
            elif not active.delivered or worker.leaving:
                # The trial never ran on a live worker: not its fault, so it runs again and
                # does not count.
                kind, reason = "interrupted", NEVER_RAN
            elif outside or (kind == LOST and self._stop_level):
                # Stopped from outside: the job's end, unless the run goes on (see
                # OUTSIDE_STOP_SECONDS); a node lost while the run stops went with the job.
                until = time.monotonic() + OUTSIDE_STOP_SECONDS
                self._outside_stops[name] = OutsideStop(kind, reason, outside, until)
            if name not in self._outside_stops:
                self._tell(name, TrialState.FAIL, kind=kind, reason=reason)
        else:
            if self._loading.pop(name, None) is not None:
                self._ledger.release(name)
                self._book.stop(name)
            if self._sampling.pop(name, None) is not None:
                self._ledger.release(name)
                self._book.stop(name)
            if (not worker.ready or worker.loading is not None) and not worker.leaving:
                # Died starting or loading an objective (out of memory, a crash in a library):
                # a slot where this keeps happening is given up, not restarted for ever.
                self._start_failures[name] = self._start_failures.get(name, 0) + 1
        self._kill_at.pop(name, None)
        self._forget_next(name)
        worker.kill()
        del self._workers[name]
        if name in self._outside_stops:
            self._settle_outside_stops()  # at once if the run is stopping already
        else:
            self._after_worker_gone(name)

    def _settle_outside_stops(self) -> None:
        """End the trials whose worker a stop signal from outside killed: interrupted once the
        run stops or the worker's node goes (the job's end), a crash once the wait is over."""
        now = time.monotonic()
        for name, held in list(self._outside_stops.items()):
            link = self._slot_links.get(name)
            node_gone = link is not None and not link.alive
            if self._stop_level or node_gone:
                kind, reason = "interrupted", _stopped_from_outside(held, node_gone)
            elif now >= held.until:
                kind = held.kind
                reason = f"{held.reason}, sent from outside hyperfleet while the run went on"
            else:
                continue
            del self._outside_stops[name]
            self._tell(name, TrialState.FAIL, kind=kind, reason=reason)
            self._after_worker_gone(name)

    def _after_worker_gone(self, name: str) -> None:
        """The slot of a worker that is gone and whose trial ended: removed with its lost
        node, left to auto packing, given up, or given a fresh worker."""
        link = self._slot_links.get(name)
        if link is not None and not link.alive:
            self._remove_slot(name)
        elif self._autopack is not None and self._autopack.leaving(name):
            self._autopack.gone(name)  # retired by auto packing: not replaced
            self.state.slot(name).state = "stopped"
        elif self._start_failures.get(name, 0) >= MAX_START_FAILURES:
            self._give_up_slot(name, "its worker keeps dying before it is ready")
        elif not self._stop_level and not self._on_drained_node(name):
            self._start_worker(self._slot_named(name))

    def _tell(
        self,
        name: str,
        state: TrialState,
        values: Any = None,
        kind: str = "",
        reason: str = "",
        traceback_text: str = "",
    ) -> None:
        rerun = state == TrialState.FAIL and self._shared_out_of_memory(name, kind, reason)
        active = self._active.pop(name)
        self._ledger.release(name)
        self._book.stop(name)
        run = active.run
        study = _opened(run)
        frozen = books.store_end(study, active.trial, state, values, kind, reason, traceback_text)
        run.trial_ended(time.monotonic())
        if frozen.state == TrialState.COMPLETE:
            run.space = ahead.narrowed(run.space, frozen.distributions)
        if run.plan.timeout is not None:  # no extra write per trial for the others
            books.store_time_used(study, run.time_used(time.monotonic()))
        state = frozen.state
        kind = str(frozen.system_attrs.get(schema.KIND_ATTR, kind))
        if rerun:
            books.rerun_with_more_room(study, frozen)
        retried = rerun or (
            state == TrialState.FAIL
            and books.maybe_retry(study, frozen, kind, self._settings.retry)
        )
        if retried:
            run.queue_unknown = True  # the repeat is enqueued: it goes before prepared trials
        else:
            run.finished += 1
        record = books.record_from_frozen(study.study_name, frozen)
        record.slot = name
        self._mark_slot_idle(name, record)
        self.state.recent.appendleft(record)
        self._count_trial_end(run, frozen)
        if state in checkpoints.ENDED:
            self._release_checkpoint(run, frozen)
        trial_dir = run.plan.folder.trial_dir(frozen.number)
        write = functools.partial(books.write_trial_files, trial_dir, record, traceback_text)
        self._pending.others.append(functools.partial(self._files.submit, write))
        self._pending.others.append(functools.partial(self._emit, "on_trial_end", record))

    def _release_checkpoint(self, run: StudyRun, trial: FrozenTrial) -> None:
        """Remove the checkpoint folder of a chain that ended, unless --keep-checkpoints keeps
        it; once the storage has the trial's end (a controller killed before that repeats the
        trial, which needs the folder). The Pareto front is settled by the end-of-run sweep."""
        keep = self._settings.keep_checkpoints
        folder: Path | None = run.plan.folder.checkpoint_dir(schema.first_attempt(trial))
        if keep == "all" or (keep == "best" and len(_opened(run).directions) > 1):
            return
        if keep == "best" and run.view.best_number == trial.number:
            folder, run.best_checkpoint = run.best_checkpoint, folder  # the old best's goes
        if folder is None:
            return
        removal = functools.partial(checkpoints.remove, folder)
        self._pending.others.append(functools.partial(self._files.submit, removal))

    def _sweep_checkpoints(self, run: StudyRun) -> None:
        """Settle every ended chain's checkpoint folder at once (see controller.checkpoints).
        A run whose objective never asked for a folder pays one look at the disk."""
        if self._settings.keep_checkpoints == "all" or not run.plan.folder.checkpoints_dir.is_dir():
            return
        study = _opened(run)
        trials = study.get_trials(deepcopy=False)
        best = checkpoints.best_numbers(study, trials)
        checkpoints.sweep(
            run.plan.folder.checkpoints_dir, trials, self._settings.keep_checkpoints, best
        )
        if len(best) == 1:
            run.best_checkpoint = run.plan.folder.checkpoint_dir(
                schema.first_attempt(trials[next(iter(best))])
            )

    def _mark_slot_idle(self, name: str, record: TrialRecord) -> None:
        view = self.state.slot(name)
        view.state, view.trial, view.study, view.since = "idle", None, None, None
        view.experiment = ""
        view.trials_done += 1
        view.busy_seconds += record.duration or 0.0

    # ----- deadlines and stops -------------------------------------------------------------

    def _next_deadline(self) -> float:
        times = list(self._kill_at.values())
        if self._settings.trial_timeout:  # else no trial has a deadline: none to look at
            times += [a.deadline for a in self._active.values() if a.deadline is not None]
        for extra in (self._deadline, self._hard_stop_at):
            if extra is not None:
                times.append(extra)
        times.extend(self._drain_cuts.values())
        times += [held.until for held in self._outside_stops.values()]
        return min(times, default=time.monotonic() + TICK_SECONDS)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        if self._hard_stop_at is not None and now >= self._hard_stop_at:
            self._stop_level = 2
        timed = self._active.items() if self._settings.trial_timeout else ()
        for name, active in list(timed):
            if name in self._outside_stops:
                continue  # its worker is gone; its end waits for a stop
            if active.deadline is not None and now >= active.deadline and not active.end_kind:
                active.end_kind = "timeout"
                active.end_reason = (
                    f"timeout: ran past the per-trial limit of {self._settings.trial_timeout:g}s"
                )
                self._emit("on_message", f"trial {active.record.number} on {name} timed out")
                self._workers[name]._signal_group(signal.SIGTERM)
                self._kill_at[name] = now + self._settings.kill_grace
        for name, when in list(self._kill_at.items()):
            if now >= when and name in self._workers:
                self._workers[name]._signal_group(signal.SIGKILL)
        for node, when in list(self._drain_cuts.items()):
            if now >= when:
                del self._drain_cuts[node]
                self._interrupt_node(node)

    def _announce_stop(self) -> None:
        if self._stop_level == self._announced_level:
            return
        self._announced_level = self.state.stopping = self._stop_level
        if self._stop_level == 1 and self._hard_stop_at is not None:
            grace = max(0.0, self._hard_stop_at - time.monotonic())
            text = (
                f"stopping (SIGTERM): no new trials; running trials get {grace:.0f}s to "
                "finish, then they are terminated"
            )
        elif self._stop_level == 1:
            text = (
                "stopping: no new trials; running trials finish. "
                "Press Ctrl+C again to terminate them."
            )
        else:
            text = "stopping now: terminating running trials; the next run repeats them"
        self._emit("on_message", text)

    def _interrupt_running(self) -> None:
        """Hard stop: end running trials, marked "interrupted" so the next run repeats them."""
        self._settle_outside_stops()
        for name in list(self._active):
            self._workers[name]._signal_group(signal.SIGTERM)
        for name in list(self._active):
            worker = self._workers[name]
            worker.terminate(self._settings.kill_grace)
            self._tell(
                name, TrialState.FAIL, kind="interrupted", reason="interrupted: stopped by the user"
            )

    # ----- workers -------------------------------------------------------------------------

    def _start_worker(self, slot: Slot) -> None:
        specs = {
            run.plan.name: run.plan.spec
            for run in self._runs.values()
            if slot.name in run.plan.slots
        }
        link = self._slot_links.get(slot.name)
        if link is not None:
            self._workers[slot.name] = link.start_worker(slot, specs, str(self._run_dir.path))
        else:
            self._workers[slot.name] = WorkerHandle(
                slot, specs, self._run_dir.workers_dir, self._run_dir.path
            )
        view = self.state.slot(slot.name)
        view.state, view.pid = "starting", self._workers[slot.name].pid or None

    def _replace_worker(self, name: str, worker: Worker, graceful: bool) -> None:
        self._forget_next(name)
        if graceful:
            worker.shutdown()
        else:
            worker.kill()
        del self._workers[name]
        self._start_worker(self._slot_named(name))

    def _retire_worker(self, name: str, worker: Worker) -> None:
        """Kill the worker's whole process group; start a fresh one unless the run is stopping
        (or the worker's node is taken back)."""
        if self._stop_level or self._on_drained_node(name):
            worker.kill()
            del self._workers[name]
        else:
            self._replace_worker(name, worker, graceful=False)

    def _on_load_failed(self, name: str, failure: LoadFailed) -> None:
        run = self._runs[failure.study]
        if not self._opened and not self._another_may_start(run):
            # Show the user's own frames; a traceback without any says no more than the message.
            frames = failure.traceback.rstrip() if '  File "' in failure.traceback else ""
            where = f" (study {run.plan.name!r})" if len(self._runs) > 1 else ""
            raise ObjectiveError(
                f"the objective {run.plan.spec.describe()}{where} could not be loaded: "
                f"{failure.message}" + (f"\n{frames}" if frames else "")
            )
        if self._loading.pop(name, None) is not None:
            self._ledger.release(name)
            self._book.stop(name)
        worker = self._workers.get(name)
        if worker is not None:
            worker.loading = None  # it said why, and exits: not a worker dying unexplained
            worker.leaving = True  # with the objectives it holds: it takes no other trial
        if run.loaded_once:  # it loads elsewhere: this slot is what is wrong
            self._give_up_slot(name, f"the objective could not be loaded: {failure.message}")
            return
        # A later stage's objective: that study stops, the others go on. The worker exits
        # after a failed load, and the loop starts a fresh one.
        run.load_failure = failure.message
        self._emit(
            "on_message",
            f"study {run.plan.name} stopped: its objective {run.plan.spec.describe()} could "
            f"not be loaded: {failure.message}; see {self._run_dir.workers_dir}",
        )

    def _another_may_start(self, failed: StudyRun) -> bool:
        """Whether a study that starts first, other than ``failed``, may still load: the run
        then goes on without ``failed``; otherwise nothing can run and nothing is written."""
        return any(run is not failed and not run.load_failure for run in self._first_studies())

    def _give_up_slot(self, name: str, why: str) -> None:
        self._dead_slots.add(name)
        worker = self._workers.pop(name, None)
        if worker is not None:
            worker.kill()
        self.state.slot(name).state = "stopped"
        self._emit("on_message", f"slot {name} stopped: {why}")

    # ----- auto packing (see controller/autopack.py) ---------------------------------------

    def _pack_gpus(self) -> None:
        if self._autopack is None or self._stop_level:
            return
        pids = {name: worker.pid for name, worker in self._workers.items()}
        samples = {"": self.state.gpus, **{n: v.gpus for n, v in self.state.nodes.items()}}
        changes = self._autopack.tick(samples, pids, set(self._active), time.monotonic())
        for change in changes:
            self._apply(change)
        if changes:  # a GPU's auto-packed trials share it: each holds 1/n of it
            self._cost.update(self._autopack.costs())
        self._announce_packing()

    def _apply(self, change: Change) -> None:
        slot = change.slot
        if not change.start:
            worker = self._workers.get(slot.name)
            if worker is not None:
                self._park(slot.name, worker, graceful=True)
            return
        if all(s.name != slot.name for s in self._slots):  # new, not one retired before
            first = f"{slot.name.rpartition('#')[0]}#0"
            self._slots.append(slot)
            if first in self._slot_links:  # on a node: its worker starts there
                self._slot_links[slot.name] = self._slot_links[first]
            self._ledger.add(slot.name, together_with=first)  # the GPU's workers hold it as one
            self._cost[slot.name] = _slot_cost(slot)
            self.state.slots.append(SlotView(slot.name, slot.kind, slot.gpus, slot.cores))
            for run in self._runs.values():
                if first in run.plan.slots:
                    run.plan = replace(run.plan, slots=(*run.plan.slots, slot.name))
        self._start_worker(slot)

    def _park(self, name: str, worker: Worker, graceful: bool) -> None:
        """Retire a worker auto packing no longer wants; its slot may get one again later.
        An idle one is asked to leave, and its exit is handled (not waited for) like any."""
        if graceful:
            worker.leaving = True
            worker.ask_to_leave()
            return
        worker.kill()  # a failed trial's worker may be broken: it goes at once
        del self._workers[name]
        if self._autopack is not None:
            self._autopack.gone(name)
        self.state.slot(name).state = "stopped"

    def _shared_out_of_memory(self, name: str, kind: str, reason: str) -> bool:
        """A trial that ran out of memory beside others on its GPU runs again (see AutoPack);
        one out of the host's memory says nothing of its GPU."""
        autopack = self._autopack
        if autopack is None or kind != "oom" or self._stop_level:
            return False
        if reason.startswith(schema.HOST_OOM_REASON):
            return False
        gpu = autopack.gpu_of(name)
        sharing = sum(autopack.gpu_of(other) == gpu for other in self._active)
        rerun = autopack.out_of_memory(name, sharing)
        if rerun:
            number = self._active[name].record.number
            self.announce(
                f"trial {number} ran out of memory on {gpu} beside {sharing - 1} other "
                "trial(s): it runs again, with fewer beside it"
            )
        return rerun

    def _announce_packing(self) -> None:
        if self._autopack is None:
            return
        for text in self._autopack.take_messages():
            self.state.packing.append(text)
            self.announce(text)

    def _slot_named(self, name: str) -> Slot:
        return next(s for s in self._slots if s.name == name)

    def _close(self) -> None:
        with contextlib.suppress(OSError, RunDirGone):  # said already; stop all the same
            self._flush(final=True)
            self._files.drain()
        self._committer.close()
        for study in self.studies.values():
            with contextlib.suppress(OSError):
                close_storage(study._storage)  # the study's storage has no public accessor
        # All at once: idle workers leave together (a hard stop kills them), starting ones are
        # killed without waiting for their objective to load.
        local = [w for w in self._workers.values() if isinstance(w, WorkerHandle)]
        stop_workers(local, graceful=self._stop_level < 2)
        if self._hub is not None:
            self._hub.close()  # every agent stops its workers and exits
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()
        self._monitor.close()
        if not self._frozen_before:
            gc.unfreeze()  # the process's objects, collected as before (a notebook's too)
        self._waiter.close()
        self._glance_waiter.close()
        self._wake_r.close()
        self._wake_w.close()
        for view in self.state.slots:
            view.state = "stopped"

    # ----- nodes (many machines) -----------------------------------------------------------

    def _listen(self) -> None:
        """With a cluster, wait for agents; say where, and how to start one."""
        if self._cluster is None:
            return
        self._hub = NodeHub(
            self._cluster, self._run_dir.path, self._run_dir.identity, self._wake, self._files
        )
        for line in self._hub.start_messages():
            self.announce(line)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"n")

    def _all_dead(self, slots: tuple[str, ...]) -> bool:
        """Every one of these slots was given up. With a cluster, a study with no slot yet
        waits for nodes to join instead."""
        if self._hub is not None:
            return bool(slots) and all(name in self._dead_slots for name in slots)
        return all(name in self._dead_slots for name in slots)

    def _take_node_events(self) -> None:
        if self._hub is None:
            return
        for event in self._hub.take_events():
            if isinstance(event, NodeJoined):
                self._add_node(event)
            elif isinstance(event, NodeDraining):
                self._drain_node(event)
            elif isinstance(event, NodeLeft):
                self._node_lost(event.link.node)
                self.announce(
                    f"node {event.link.node} lost: it {event.reason}; its running trials run "
                    "again elsewhere"
                )
            else:
                self.announce(event.line())

    def _drain_node(self, event: NodeDraining) -> None:
        """The engine takes the node back: no new trial goes there, its running trials are
        asked to save and stop (``should_stop``), and those still running shortly before it
        goes are ended as interrupted; all run again elsewhere."""
        if event.node in self._drained:
            return
        self._drained.add(event.node)
        when = ""
        if event.deadline is not None:
            cut = event.deadline - self._settings.kill_grace - DRAIN_MARGIN_SECONDS
            self._drain_cuts[event.node] = cut
            when = f" in {max(0.0, event.deadline - time.monotonic()):.0f}s"
        self.announce(
            f"node {event.node} is taken back by its engine{when}: no new trials go there; "
            "its running trials finish, or save a checkpoint and run again elsewhere"
        )

    def _on_drained_node(self, slot: str) -> bool:
        link = self._slot_links.get(slot)
        return link is not None and link.node in self._drained

    def _interrupt_node(self, node: str) -> None:
        """A drained node goes soon: its trials still running end as interrupted now."""
        reason = (
            f"interrupted: node {node} was taken back by its engine before the trial ended; "
            "it runs again"
        )
        for name in [n for n in self._active if self._on_drained_node(n)]:
            if self._slot_links[name].node != node:
                continue
            worker = self._workers[name]
            worker._signal_group(signal.SIGTERM)
            worker.terminate(self._settings.kill_grace)
            self._tell(name, TrialState.FAIL, kind="interrupted", reason=reason)

    def _add_node(self, joined: NodeJoined) -> None:
        link = joined.link
        if self._node_planner is None or not link.alive or self._stop_level:
            return
        self._drop_node_slots(link.node)  # an earlier link of the same node, lost
        try:
            pool = on_node(link.node, self._node_planner(joined.inventory))
        except HyperfleetError as exc:
            self.announce(f"node {link.node} not used: {exc}")
            link.refuse(f"node {link.node} is not used: {exc}")
            return
        used = {name for names in pool.study_slots.values() for name in names}
        slots = [slot for slot in pool.slots if slot.name in used]
        for run in self._runs.values():
            extra = pool.study_slots.get(run.plan.name, ())
            run.plan = replace(run.plan, slots=run.plan.slots + extra)
        for slot in slots:
            self._slots.append(slot)
            self._ledger.add(slot.name, pool.needs[slot.name])
            self._cost[slot.name] = _slot_cost(slot)
            self._slot_links[slot.name] = link
            self.state.slots.append(SlotView(slot.name, slot.kind, slot.gpus, slot.cores))
            self._start_worker(slot)
        self._pack_node(link.node, slots, pool, joined.inventory)
        gpus = len({gpu for slot in slots for gpu in slot.gpus})
        cores = len(joined.inventory.cores)
        self.state.nodes[link.node] = NodeView(link.node, link.where, cores=cores)
        self.announce(
            f"node {link.node} joined from {link.where}: {len(slots)} slots, {gpus} GPUs, "
            f"{len(joined.inventory.cores)} cores; {link.run_folder_note()}"
        )

    def _pack_node(
        self, node: str, slots: list[Slot], pool: NodePool, inventory: Inventory
    ) -> None:
        """Auto packing grows the node's GPUs from its agent's readings, as this machine's."""
        packed = [slot for slot in slots if slot.packed]
        if pool.packing is None or not packed:
            return
        taken = {core for slot in slots for core in slot.cores}
        spare = tuple(sorted(set(inventory.cores) - taken))  # the node's, lent to added workers
        if self._autopack is None:
            self._autopack = FleetPack()
        self._autopack.add(node, packed, pool.packing, spare)

    def _node_lost(self, node: str) -> None:
        """The node's view says it is lost, and its GPUs are packed no more, unless it joined
        again meanwhile."""
        view = self.state.nodes.get(node)
        back = self._hub is not None and any(link.node == node for link in self._hub.links())
        if view is not None and not back:
            view.state, view.gpus, view.cpu_percent = "lost", {}, None
        if self._autopack is not None and not back:
            self._autopack.drop(node)

    def _read_nodes(self) -> None:
        """The nodes' newest readings into the run state (see cluster/readings.py); a GPU's
        health change on a node is said once, as the controller's own machine's."""
        if self._hub is None:
            return
        for link in self._hub.links():
            view, reading = self.state.nodes.get(link.node), link.reading
            if view is None or reading is None:
                continue
            view.state = "joined"
            view.gpus = node_gpus(reading, time.time() - (link.read_at or 0.0))
            view.cpu_percent = reading.cpu_percent
            view.memory_used_mib = reading.memory_used_mib
            view.memory_total_mib = reading.memory_total_mib
            view.updated = link.read_at
            for line in link.problems:
                self.announce(f"{link.node}/{line}")
            link.problems.clear()

    def _drop_node_slots(self, node: str) -> None:
        """Before a node's new link takes its slot names: the old link's workers end as lost
        now, if the loop has not handled them yet."""
        for name, link in list(self._slot_links.items()):
            if link.node != node:
                continue
            worker = self._workers.get(name)
            if worker is not None:
                link.lose("connected again")
                self._drain(name, worker)
                self._on_worker_exit(name, worker)
            elif name in self._outside_stops:  # its trial ends with the old link
                link.lose("connected again")
                self._settle_outside_stops()
            elif name in self._slot_links:
                self._remove_slot(name)

    def _remove_slot(self, name: str) -> None:
        """A lost node's slot leaves the pool (its trial was ended already)."""
        self._slot_links.pop(name, None)
        self._slots = [slot for slot in self._slots if slot.name != name]
        self._cost.pop(name, None)
        self._ledger.remove(name)
        self._dead_slots.discard(name)
        self._start_failures.pop(name, None)
        self.state.slots = [view for view in self.state.slots if view.name != name]
        for run in self._runs.values():
            if name in run.plan.slots:
                kept = tuple(slot for slot in run.plan.slots if slot != name)
                run.plan = replace(run.plan, slots=kept)

    # ----- study state ---------------------------------------------------------------------

    def _prepare_study(self, run: StudyRun) -> None:
        """Resume: fail what a dead controller left running, repeat what the policy allows."""
        study = _opened(run)
        private = is_private_journal(study._storage, self._run_dir.journal)
        folder = run.plan.folder
        leftovers = books.fail_interrupted_leftovers(
            study,
            self._run_dir.marks,
            private,
            started=lambda number: folder.existing_trial_dir(number).is_dir(),
            last_seen=lambda number: books.last_sign_of_life(
                folder.existing_trial_dir(number), self._last_alive
            ),
        )
        for trial in leftovers:
            label = self._trial_label(run, trial.number)
            self._emit("on_message", f"{label} was left running: marked interrupted")
        trials = study.get_trials(deepcopy=False)
        for trial in leftovers:  # the dead controller never wrote how these trials ended
            record = books.record_from_frozen(study.study_name, trials[trial.number])
            books.write_trial_files(run.plan.folder.existing_trial_dir(trial.number), record)
        retried = schema.retried_numbers(trials)
        for trial in trials:
            if trial.state == TrialState.FAIL and trial.number not in retried:
                kind = str(trial.system_attrs.get(schema.KIND_ATTR, "error"))
                repeated = books.maybe_retry(study, trial, kind, self._settings.retry)
                if repeated:
                    retried.add(trial.number)
                self._say_repeat(run, trial, kind, repeated)
        trials = study.get_trials(deepcopy=False)
        run.finished = schema.budget_used(trials)
        run.time_before = schema.time_used_of(study)
        in_memory = isinstance(study._storage, optuna.storages.InMemoryStorage)
        if isinstance(study.sampler, AutoSampler):  # says once which sampler it chose, and why
            study.sampler.on_choice = functools.partial(self._say_sampler, run)
        run.shared = not (private or in_memory)  # others could be writing the same study
        run.view.directions = tuple(d.name for d in study.directions)
        self._refresh_study_view(run, trials)
        self._sweep_checkpoints(run)

    def _say_sampler(self, run: StudyRun, line: str) -> None:
        self._emit("on_message", f"{self._study_label(run)}: {line}")

    def _say_repeat(self, run: StudyRun, trial: FrozenTrial, kind: str, repeated: bool) -> None:
        """Whether a failed trial of an earlier run runs again; a named experiment that does
        not is said too, with the retry rule that would repeat it."""
        label = self._trial_label(run, trial.number)
        experiment = trial.user_attrs.get(schema.EXPERIMENT_ATTR)
        if experiment is None:
            if repeated:
                self._emit("on_message", f"{label} ({kind}) will be repeated")
            return
        failed = f"experiment {experiment} ({label}) failed ({kind})"
        if repeated:
            self._emit("on_message", f"{failed} and will be repeated")
            return
        self._emit(
            "on_message",
            f"{failed} and is not repeated: the retry policy allows no more {kind} retries; "
            f'to repeat it, raise them (retry = "{kind}=1" in [campaign], or --retry {kind}=1)',
        )

    def _announce_budget(self, run: StudyRun) -> None:
        """What a resumed run (or one sharing its storage) has left of the study's budgets,
        trials and time, in one line."""
        n_trials, timeout = run.plan.n_trials, run.plan.timeout
        resumed = run.finished or (timeout is not None and run.time_before)
        if (n_trials is None and timeout is None) or not (resumed or run.shared):
            return
        used, left, done = [], [], False
        if n_trials is not None:
            used.append(f"{run.finished} of {n_trials} trials")
            left.append(f"{max(0, n_trials - run.finished)} trials")
            done = run.finished >= n_trials
        if timeout is not None:
            used.append(f"{duration(run.time_before)} of {duration(timeout)}")
            left.append(duration(timeout - run.time_before))
            done = done or run.time_before >= timeout
        rest = "nothing left to run" if done else f"this run adds up to {' and '.join(left)}"
        shared = "; trials of other runs on the same storage count too" if run.shared else ""
        self.announce(
            f"{self._study_label(run)}: {' and '.join(used)} used already, {rest}{shared}"
        )

    def _study_label(self, run: StudyRun) -> str:
        return f"study {run.plan.name}" if len(self._runs) > 1 else "the study"

    def _trial_label(self, run: StudyRun, number: int) -> str:
        return f"trial {number}" + (f" of {run.plan.name}" if len(self._runs) > 1 else "")

    def _refresh_study_view(
        self, run: StudyRun, trials: list[optuna.trial.FrozenTrial] | None = None
    ) -> None:
        study, view = _opened(run), run.view
        if trials is None:
            trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        view.complete = states.count(TrialState.COMPLETE)
        view.pruned = states.count(TrialState.PRUNED)
        failures = [t for t in trials if t.state == TrialState.FAIL]
        view.interrupted = sum(schema.is_interrupted(t) for t in failures)
        view.failed = len(failures) - view.interrupted
        view.running = self._book.running(run.plan.name)
        view.finished = run.finished
        best = _best_trial(study, trials)
        if best is not None:
            view.best_number, view.best_values = best.number, list(best.values)
            view.best_params = dict(best.params)

    def _count_trial_end(self, run: StudyRun, trial: FrozenTrial) -> None:
        """The study's counts and best trial after one more ended, without reading every
        trial again (that would cost more per trial the larger the study grows)."""
        view = run.view
        if trial.state == TrialState.COMPLETE:
            view.complete += 1
        elif trial.state == TrialState.PRUNED:
            view.pruned += 1
        elif trial.state == TrialState.FAIL and schema.is_interrupted(trial):
            view.interrupted += 1
        elif trial.state == TrialState.FAIL:
            view.failed += 1
        view.running = self._book.running(run.plan.name)
        view.finished = run.finished
        if trial.state != TrialState.COMPLETE or trial.values is None or len(trial.values) != 1:
            return
        if _CONSTRAINTS_KEY in trial.system_attrs:  # feasibility decides: let Optuna judge
            self._refresh_study_view(run)
        elif _improves(trial.values[0], view.best_values, _opened(run).direction):
            view.best_number, view.best_values = trial.number, list(trial.values)
            view.best_params = dict(trial.params)

    def _tick(self) -> None:
        self._keep_collector_off()
        self._glance()
        for run in self._runs.values():
            # Other processes may enqueue trials in a shared storage: looked up once a second,
            # they go before the next prepared trials (see controller.prepared).
            run.queue_unknown = run.queue_unknown or run.shared
        self.state.gpus = self._monitor.sample()
        for line in self._monitor.problems():  # a GPU lost (or back): said once
            self.announce(line)
        self._read_nodes()
        self._pack_gpus()
        for view in self.state.slots:
            view.cpu_percent = self._cpu_percent(view) if view.state == "busy" else None
        self.state.stopping = self._stop_level
        self._glance()
        self._emit("on_tick")

    def _keep_collector_off(self) -> None:
        """What survived the last second joins the collector's permanent generation: a full
        collection then goes through only what is new, where it went through every trial of
        the study (the journal's replay keeps each): 40-110 ms pauses at a 4,000-trial study,
        during which no slot got its next trial. Reference counting still frees those objects;
        the cycles among them that died since (measured: under two objects per trial) are
        collected once a minute, in one full pass, so that a long run does not keep them."""
        now = time.monotonic()
        if now >= self._full_collection_at:
            gc.unfreeze()
            gc.collect()
            self._full_collection_at = now + FULL_COLLECTION_SECONDS
        gc.freeze()

    def _cpu_percent(self, view: SlotView) -> float | None:
        worker = self._workers.get(view.name)
        if isinstance(worker, RemoteWorker):  # as its node's agent read it
            link = self._slot_links.get(view.name)
            reading = link.reading if link is not None else None
            return reading.workers_cpu.get(worker.id) if reading is not None else None
        if not isinstance(worker, WorkerHandle):  # none
            return None
        process = self._cpu.get(view.name)
        if process is None or process.pid != worker.pid:
            process = self._cpu[view.name] = psutil.Process(worker.pid)
            with contextlib.suppress(psutil.Error):
                process.cpu_percent()
            return None
        with contextlib.suppress(psutil.Error):
            return float(process.cpu_percent())
        return None

    def _emit(self, hook: str, *args: Any) -> None:
        for sink in self._sinks:
            getattr(sink, hook)(self.state, *args)

    def _outcome(self) -> Outcome:
        studies = list(self.studies.values())
        counts = {s.name.lower(): 0 for s in TrialState}
        for study in studies:
            for trial in study.get_trials(deepcopy=False):
                counts[trial.state.name.lower()] += 1
        counts = counts if studies else {}
        self.state.stopping = self._stop_level
        self._emit("on_end")
        first = studies[0] if studies else None
        if studies and self._slots and len(self._dead_slots) == len(self._slots):
            return Outcome(
                "failed", "every slot stopped; see the worker logs", first, counts, studies
            )
        failed = [run for run in self._runs.values() if run.load_failure]
        if failed:
            names = ", ".join(run.plan.name for run in failed)
            message = f"the objective of {names} could not be loaded; see the run log"
            return Outcome("failed", message, first, counts, studies)
        if self._waited_out:
            message = f"the run's timeout passed before any trial could start: {self._waited_out}"
            return Outcome("failed", message, first, counts, studies)
        if self._stop_level:
            return Outcome(
                "stopped", "stopped before the budget was reached", first, counts, studies
            )
        if counts.get("fail") and not counts.get("complete") and not counts.get("pruned"):
            return Outcome(
                "failed",
                "every trial failed; see the reasons in the trials/ folders",
                first,
                counts,
                studies,
            )
        return Outcome("completed", "", first, counts, studies)


def _study_view(plan: StudyPlan) -> StudyView:
    return StudyView(
        plan.name,
        (),
        n_trials=plan.n_trials,
        stage=plan.stage,
        stage_name=plan.stage_name,
        timeout=plan.timeout,
    )


def _stopped_from_outside(held: OutsideStop, node_gone: bool) -> str:
    """Why a trial whose worker was stopped from outside ended as interrupted."""
    if not held.signal:
        return "interrupted: its node was lost as the run was being stopped; it runs again"
    what = f"interrupted: its worker got {held.signal} from outside"
    if node_gone:
        return f"{what} and its node left (the node was stopped, or the job ended); it runs again"
    return (
        f"{what} as the run was being stopped (the job's end: scancel, a time limit, a "
        "preemption); it runs again"
    )


def _opened(run: StudyRun) -> optuna.Study:
    if run.study is None:
        raise RuntimeError(f"the study {run.plan.name!r} is not open yet")
    return run.study


def _slot_cost(slot: Slot) -> float:
    """What a trial on the slot holds, for fair shares: GPUs (fractions too), else cores."""
    if slot.kind == "gpu":
        return len(slot.gpus) * slot.gpu_share
    return float(max(1, len(slot.cores)))


def _best_trial(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> Any:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    if len(study.directions) > 1:
        return None
    return study.best_trial


def _spare_cores(slots: list[Slot]) -> tuple[int, ...]:
    """The cores this process may use that no slot has: auto packing lends them to the GPU
    workers it adds."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    taken = {core for slot in slots for core in slot.cores}
    return tuple(sorted(set(allowed) - taken))


def _gpus_of(slots: list[Slot]) -> tuple[Any, ...]:
    from hyperfleet.resources.inventory import Gpu

    seen: dict[int, Gpu] = {}
    for slot in slots:
        for index, uuid in zip(slot.gpus, slot.gpu_uuids, strict=False):
            seen.setdefault(index, Gpu(index=index, uuid=uuid, name="", kind=slot.gpu_kind))
    return tuple(seen.values())


_CONSTRAINTS_KEY = "constraints"  # where Optuna keeps a trial's constraint values


def _improves(value: float, best: list[float] | None, direction: StudyDirection) -> bool:
    if best is None:
        return True
    return value < best[0] if direction == StudyDirection.MINIMIZE else value > best[0]


def _reported_step(call: Call) -> int | None:
    """The step of a ``trial.report(value, step)`` call, as the objective passed it."""
    step: Any = call.kwargs.get("step", call.args[1] if len(call.args) > 1 else None)
    try:
        return int(step)
    except (TypeError, ValueError):
        return None  # Optuna's own report refuses it, with its own message


def _run_message(
    run: StudyRun,
    stored: FrozenTrial,
    start: datetime.datetime | None,
    suggestions: ahead.Ahead,
) -> RunTrial:
    study = _opened(run)
    return RunTrial(
        objective=run.plan.name,
        number=stored.number,
        trial_dir=str(run.plan.folder.trial_dir(stored.number)),
        datetime_start=start,
        study=StudyInfo(study.study_name, tuple(d.name for d in study.directions)),
        checkpoint_dir=str(run.plan.folder.checkpoint_dir(schema.first_attempt(stored))),
        suggestions=suggestions,
    )


def _record_of(study: optuna.Study, stored: FrozenTrial) -> TrialRecord:
    """A running trial's record, for the views and the events."""
    experiment = stored.user_attrs.get(schema.EXPERIMENT_ATTR)
    return TrialRecord(
        study=study.study_name,
        number=stored.number,
        slot="",  # the slot's name, once it runs there (_begin)
        state="RUNNING",
        start=time.time(),
        retry_of=schema.retry_of(stored),
        experiment=str(experiment) if experiment is not None else "",
    )


def _mark_placed(trial: optuna.Trial, placement: dict[str, Any]) -> FrozenTrial:
    """The trial as stored, once its marks of where it runs are the ones given (a queued trial
    was created with none, or with another slot's or run's)."""
    stored = trial.study._storage.get_trial(trial._trial_id)
    for key, value in placement.items():
        if stored.system_attrs.get(key) != value:
            books.set_system_attr(trial, key, value)
    return stored


def _raise_if_no_room(exc: OSError) -> None:
    """A dead worker's connection fails, and that is handled as its exit; a run folder that
    can no longer be written stops the run (see launch.run_search)."""
    if exc.errno in NO_ROOM or isinstance(exc, FileNotFoundError):
        raise exc


def _takes_a_trial(worker: Worker) -> bool:
    """Whether the worker may be given a trial: started, not loading an objective, and not
    about to exit (asked to leave, or after a failed load)."""
    return worker.ready and worker.loading is None and not worker.leaving


def _send(worker: Worker, message: RunTrial) -> bool:
    """Whether the message left; a worker that died meanwhile (its connection broken, or
    closed once its exit was handled) is noticed by the loop."""
    try:
        worker.conn.send(message)
    except OSError:  # ConnectionError, or "handle is closed"
        return False
    return True
