"""The controller: one process that owns the studies, asks and tells, and keeps every slot busy.

One thread, one loop. Each step gives every free slot a trial of the study the fair-share
policy picks (see :mod:`hyperfleet.controller.policy`), then waits for the first of: a worker's
message (a trial call to answer, a result), a worker's exit, a trial's deadline, a stop request,
or the next display tick. Nothing waits for a batch.

A single search is a campaign of one study that may use every slot.

The loop's parts, each in its own module, share a
:class:`~hyperfleet.controller.context.RunContext`:

- :mod:`~hyperfleet.controller.slot_table`: every slot's state, worker and claims;
- :mod:`~hyperfleet.controller.studies`: the studies, their budgets, views and resumption;
- :mod:`~hyperfleet.controller.trial_starts`: handing trials out, and the one way one starts
  (with :mod:`~hyperfleet.controller.prepared` and :mod:`~hyperfleet.controller.slow_samplers`);
- :mod:`~hyperfleet.controller.trial_ends`: the one way a trial ends;
- :mod:`~hyperfleet.controller.answers`: what objectives call on their trial and study;
- :mod:`~hyperfleet.controller.workforce`: the workers' lives, and auto packing's changes;
- :mod:`~hyperfleet.controller.receiving`: waiting for news and dispatching each message;
- :mod:`~hyperfleet.controller.node_fleet`: the nodes of many machines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from hyperfleet.cluster.hub import ClusterSettings
from hyperfleet.cluster.pools import NodePlanner
from hyperfleet.config import RunSettings
from hyperfleet.controller.answers import CallAnswers
from hyperfleet.controller.collector import CollectorPauses
from hyperfleet.controller.commits import Committer, Effects
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.fleetpack import FleetPack
from hyperfleet.controller.node_fleet import NodeFleet
from hyperfleet.controller.prepared import Preparer
from hyperfleet.controller.receiving import Receiver
from hyperfleet.controller.sampler_pools import SamplerPools
from hyperfleet.controller.slot_table import SlotTable
from hyperfleet.controller.studies import StudyBook
from hyperfleet.controller.study_run import StudyPlan, StudyRun
from hyperfleet.controller.trial_ends import TrialEnds
from hyperfleet.controller.trial_making import TrialFolders
from hyperfleet.controller.trial_starts import TrialStarts
from hyperfleet.controller.waiting import Wakeup
from hyperfleet.controller.workforce import StartWorker, Workforce
from hyperfleet.display.events import EventSink, RunEnded, RunStarted, Tick
from hyperfleet.display.format import duration
from hyperfleet.display.runstate import RunState
from hyperfleet.errors import WorkerError
from hyperfleet.resources.inventory import Gpu
from hyperfleet.resources.monitor import GpuMonitor
from hyperfleet.resources.shapes import Ledger, Pool
from hyperfleet.resources.slots import Slot
from hyperfleet.store.files import FileWriter
from hyperfleet.store.journal import close as close_storage
from hyperfleet.store.journal import commit
from hyperfleet.store.rundir import RunDir, RunDirGone
from hyperfleet.workers.handle import stop_workers

if TYPE_CHECKING:
    from hyperfleet.objective.refit import RefitOutcome

TICK_SECONDS = 1.0
WAIT_NOTE_AFTER = 10.0  # seconds before the first note on what a run still waits for
WAIT_NOTE_EVERY = 60.0  # and between the notes after it


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
    # What a callback raised (the first): hyperfleet.optimize raises it, as study.optimize does.
    error: BaseException | None = None


class Controller:
    def __init__(
        self,
        plans: list[StudyPlan],
        pool: Pool,
        settings: RunSettings,
        run_dir: RunDir,
        sink: EventSink,
        run_name: str = "",
        sequential: bool = False,
        *,
        files: FileWriter,
        cluster: ClusterSettings | None = None,
        node_planner: NodePlanner | None = None,
        start_worker: StartWorker | None = None,
    ) -> None:
        used = {name for plan in plans for name in plan.slots}
        slots = [slot for slot in pool.slots if slot.name in used]
        self.state = RunState(
            run_name=run_name or run_dir.path.name,
            run_dir=str(run_dir.path),
            timeout=settings.timeout,
            sequential=sequential,
        )
        self._wakeup = Wakeup()
        ctx = RunContext(settings, run_dir, files, self.state, sink, sequential, self._wakeup.wake)
        self._ctx = ctx
        self._slots = SlotTable(slots, Ledger(pool.needs), self.state)
        self._studies = StudyBook(plans, ctx, self._slots)
        self._receiver = Receiver(ctx, self._slots, self._wakeup)
        folders = TrialFolders(run_dir)
        self._preparer = Preparer(ctx, self._slots, self._studies, folders, self._receiver.glance)
        pools = SamplerPools(ctx, _sampling_processes(settings), len(plans))
        self._starts = TrialStarts(ctx, self._slots, self._studies, self._preparer, folders, pools)
        self._ends = TrialEnds(ctx, self._slots, self._studies, self._starts)
        self._workforce = Workforce(
            ctx, self._slots, self._studies, self._starts, self._ends, self._preparer, start_worker
        )
        self._nodes = NodeFleet(
            ctx,
            self._slots,
            self._studies,
            self._workforce,
            self._receiver.drain,
            cluster,
            node_planner,
            pools,
        )
        answers = CallAnswers(ctx, self._slots, self._studies, self._ends)
        self._receiver.connect(
            self._preparer, answers, self._ends, self._workforce, self._nodes.take_events
        )
        self._monitor = GpuMonitor(_gpus_of(slots))
        if settings.packing is not None:
            # Auto packing: this machine's GPUs, and each node's once it joins.
            ctx.autopack = FleetPack()
            packed = [slot for slot in slots if slot.name in pool.packed]
            ctx.autopack.add("", packed, settings.packing, _spare_cores(slots))
        self._committer = Committer(self._wakeup.wake)
        self._collector = CollectorPauses()

    # ----- stopping, from signal handlers or other threads -------------------------------

    def request_stop(self, hard: bool = False, grace: float | None = None) -> None:
        """Level 1: start no new trials. Level 2 (``hard``): end running trials as interrupted.

        With ``grace``, a hard stop follows the soft one after that many seconds (SIGTERM).
        Safe to call from a signal handler: it only sets fields and wakes the loop.
        """
        self._ctx.stops.request(hard, grace)
        self._wakeup.wake()

    @property
    def stop_level(self) -> int:
        return self._ctx.stops.level

    @property
    def stopped_in_a_hurry(self) -> bool:
        """Stopped hard (a second Ctrl+C) or by SIGTERM: what follows the run should not wait."""
        return self._ctx.stops.in_a_hurry

    @property
    def run_dir(self) -> Path:
        return self._ctx.run_dir.path

    @property
    def study(self) -> optuna.Study | None:
        """The first study, once the first studies' objectives loaded and it was opened."""
        return next(iter(self._studies.runs.values())).study

    @property
    def studies(self) -> dict[str, optuna.Study]:
        """Every opened study, by name, in the order they were given."""
        return self._studies.studies

    def announce(self, text: str) -> None:
        """A one-line notice to every view (screen, run.log)."""
        self._ctx.announce(text)

    # ----- the run -------------------------------------------------------------------------

    def run(self) -> Outcome:
        stops = self._ctx.stops
        if self._ctx.settings.timeout is not None:
            stops.deadline = time.monotonic() + self._ctx.settings.timeout
        try:
            self._studies.read_stored()
            if self._studies.budgets_already_reached():
                self.state.nothing_to_run = True
                self._open_studies(announce=False)  # said already
                return self._outcome()
            self._nodes.listen()
            for slot in list(self._slots.slots):
                # Starting many workers takes a while: a stop asked meanwhile starts no more.
                if stops.level:
                    break
                self._workforce.start(slot)
            self._wait_until_loaded()
            if stops.level or stops.waited_out:
                return self._outcome()
            self._open_studies()
            self._loop()
            self._flush(final=True)
            self._ctx.files.drain()  # every trial's files are there when the run returns
            for run in self._studies.runs.values():
                self._studies.sweep_checkpoints(run)
        finally:
            self._close()
        return self._outcome()

    def _open_studies(self, announce: bool = True) -> None:
        self._studies.open_all(announce)
        self._ctx.emit(RunStarted(self.state))

    def _wait_until_loaded(self) -> None:
        """Open no storage before the objective of a study that starts first has loaded in a
        worker: bad input writes nothing. Those are all the studies with work left, or in a
        sequential run those of the first stage with work left. The first trial starts as soon
        as one of them has loaded (a campaign's first trial does not wait for every data set);
        the others go on loading, and a study whose objective fails then stops alone. What it
        waits for is said now and then, and the run's timeout ends the wait."""
        started = time.monotonic()
        next_note = started + WAIT_NOTE_AFTER
        stops = self._ctx.stops
        while not any(run.loaded_once for run in self._studies.first_studies()):
            if stops.level:
                return
            now = time.monotonic()
            if stops.timed_out(now):
                stops.waited_out = self._what_it_waits_for()
                return
            if now >= next_note:
                waited = duration(now - started)
                self.announce(f"still waiting after {waited}: {self._what_it_waits_for()}")
                next_note = now + WAIT_NOTE_EVERY
            first = [run for run in self._studies.first_studies() if not run.load_failure]
            self._check_first_can_start(first)
            self._workforce.preload(first)
            self._receiver.step(timeout=TICK_SECONDS)

    def _check_first_can_start(self, first: list[StudyRun]) -> None:
        for run in first:
            if self._slots.all_dead(run.plan.slots, self._ctx.clustered):
                raise WorkerError(
                    f"every worker that could run study {run.plan.name!r} died while "
                    f"starting; see the logs in {self._ctx.run_dir.workers_dir}."
                )

    def _what_it_waits_for(self) -> str:
        note = self._nodes.waiting_note()
        if note is not None:
            return note
        names = ", ".join(run.plan.name for run in self._studies.first_studies())
        return (
            f"no worker has loaded the objective of {names} yet; see the worker logs in "
            f"{self._ctx.run_dir.workers_dir}"
        )

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            self._announce_stop()
            self._workforce.settle_outside_stops()
            if self._ctx.stops.level >= 2:
                self._interrupt_running()
                return
            self._starts.start_sampled()
            self._starts.fill_free_slots()
            self._workforce.release_done_studies()
            self._preparer.prepare_some()
            self._flush()
            if self._all_done():
                return
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick = now + TICK_SECONDS
            timeout = max(0.0, min(next_tick, self._next_deadline()) - now)
            self._receiver.step(timeout=0.0 if self._preparer.wanted else timeout)
            self._enforce_deadlines()

    def _all_done(self) -> bool:
        """Nothing runs and nothing is left to start, or every slot here was given up."""
        slots = self._slots
        busy = slots.active or slots.loading or slots.sampling
        if not busy and not any(self._studies.has_work(r) for r in self._studies.runs.values()):
            return True
        return not self._ctx.clustered and len(slots.dead) == len(slots.slots)

    def _flush(self, final: bool = False) -> None:
        """Commit what the storage was told (one ``fsync`` for a journal), then let what
        depends on it happen: trials sent to workers, trial files, run log lines.

        The commit runs on the committer's thread while the loop goes on (``final``: here, and
        waited for); what the loop writes meanwhile goes with the next commit. Nothing else
        waits for the disk: a trial's suggestions and attributes are committed with its end,
        since until then only its own objective has seen them (and a crash before that makes
        it an interrupted trial, which runs again)."""
        ctx = self._ctx
        ctx.files.raise_failure()
        done = self._committer.finished(wait=final)
        if done is not None:
            self._run_effects(done)
        if self._committer.busy or (not ctx.pending and not final):
            return
        effects, ctx.pending = ctx.pending, Effects()
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
            self._ctx.run_dir.check_now_and_then()
        for effect in [*effects.sends, *effects.others]:
            effect()
            self._receiver.glance()

    # ----- deadlines and stops -------------------------------------------------------------

    def _next_deadline(self) -> float:
        slots, stops = self._slots, self._ctx.stops
        times = list(slots.kill_at.values())
        if self._ctx.settings.trial_timeout:  # else no trial has a deadline: none to look at
            times += [a.deadline for a in slots.active.values() if a.deadline is not None]
        times += [t for t in (stops.deadline, stops.hard_at) if t is not None]
        times.extend(self._nodes.drain_cuts.values())
        times += [held.until for held in self._workforce.outside_stops.values()]
        pool_wait_ends = self._starts.pool_wait_ends()  # a slot waits for a sampler process
        if pool_wait_ends is not None:
            times.append(pool_wait_ends)
        return min(times, default=time.monotonic() + TICK_SECONDS)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        stops, slots = self._ctx.stops, self._slots
        if stops.hard_at is not None and now >= stops.hard_at:
            stops.level = 2
        if self._ctx.settings.trial_timeout:
            self._time_out_trials(now)
        for name, when in list(slots.kill_at.items()):
            if now >= when and name in slots.workers:
                slots.workers[name]._signal_group(signal.SIGKILL)
        self._nodes.cut_drained(now)

    def _time_out_trials(self, now: float) -> None:
        """Terminate the trials past the per-trial limit (killed after the kill grace)."""
        limit = self._ctx.settings.trial_timeout
        for name, active in list(self._slots.active.items()):
            if name in self._workforce.outside_stops:
                continue  # its worker is gone; its end waits for a stop
            if active.deadline is not None and now >= active.deadline and not active.end_kind:
                active.end_kind = "timeout"
                active.end_reason = f"timeout: ran past the per-trial limit of {limit:g}s"
                self.announce(f"trial {active.record.number} on {name} timed out")
                self._slots.workers[name]._signal_group(signal.SIGTERM)
                self._slots.kill_at[name] = now + self._ctx.settings.kill_grace

    def _announce_stop(self) -> None:
        stops = self._ctx.stops
        if stops.level == stops.announced:
            return
        stops.announced = self.state.stopping = stops.level
        if stops.level == 1 and stops.hard_at is not None:
            grace = max(0.0, stops.hard_at - time.monotonic())
            text = (
                f"stopping (SIGTERM): no new trials; running trials get {grace:.0f}s to "
                "finish, then they are terminated"
            )
        elif stops.level == 1:
            text = (
                "stopping: no new trials; running trials finish. "
                "Press Ctrl+C again to terminate them."
            )
        else:
            text = "stopping now: terminating running trials; the next run repeats them"
        self.announce(text)

    def _interrupt_running(self) -> None:
        """Hard stop: end running trials, marked "interrupted" so the next run repeats them."""
        self._workforce.settle_outside_stops()
        self._workforce.interrupt(list(self._slots.active), "interrupted: stopped by the user")

    # ----- once a second -------------------------------------------------------------------

    def _tick(self) -> None:
        self._collector.tick()
        self._receiver.glance()
        for run in self._studies.runs.values():
            # Other processes may enqueue trials in a shared storage: looked up once a second,
            # they go before the next prepared trials (see controller.prepared).
            run.queue_unknown = run.queue_unknown or run.shared
        self.state.gpus = self._monitor.sample()
        for line in self._monitor.problems():  # a GPU lost (or back): said once
            self.announce(line)
        self._nodes.read()
        gpus = {"": self.state.gpus, **{n: v.gpus for n, v in self.state.nodes.items()}}
        self._workforce.pack_gpus(gpus)
        for view in self.state.slots:
            view.cpu_percent = self._slots.cpu_percent(view.name) if view.state == "busy" else None
        self.state.stopping = self._ctx.stops.level
        self._receiver.glance()
        self._ctx.emit(Tick(self.state))

    # ----- the end -------------------------------------------------------------------------

    def _close(self) -> None:
        with contextlib.suppress(OSError, RunDirGone):  # said already; stop all the same
            self._flush(final=True)
            self._ctx.files.drain()
        self._committer.close()
        self._starts.pools.close()
        for study in self.studies.values():
            with contextlib.suppress(OSError):
                close_storage(study._storage)  # the study's storage has no public accessor
        # All at once: idle workers leave together (a hard stop kills them), starting ones are
        # killed without waiting for their objective to load.
        local = [worker for _, worker in self._slots.local_workers()]
        stop_workers(local, graceful=self._ctx.stops.level < 2)
        if self._ctx.hub is not None:
            self._ctx.hub.close()  # every agent stops its workers and exits
        for worker in self._slots.workers.values():
            worker.close()
        self._slots.workers.clear()
        self._monitor.close()
        self._collector.close()
        self._receiver.close()
        self._wakeup.close()
        self._slots.stop_all()

    def _outcome(self) -> Outcome:
        studies = list(self.studies.values())
        counts = {s.name.lower(): 0 for s in TrialState}
        for study in studies:
            for trial in study.get_trials(deepcopy=False):
                counts[trial.state.name.lower()] += 1
        counts = counts if studies else {}
        self.state.stopping = self._ctx.stops.level
        self._ctx.emit(RunEnded(self.state))
        first = studies[0] if studies else None
        status, message = self._ending(studies, counts)
        outcome = Outcome(status, message, first, counts, studies)
        outcome.error = self._ends.callbacks.error
        return outcome

    def _ending(self, studies: list[optuna.Study], counts: dict[str, int]) -> tuple[str, str]:
        """How the run ended, and why (see Outcome)."""
        if studies and self._slots.every_slot_dead():
            return "failed", "every slot stopped; see the worker logs"
        failed = [run for run in self._studies.runs.values() if run.load_failure]
        if failed:
            names = ", ".join(run.plan.name for run in failed)
            return "failed", f"the objective of {names} could not be loaded; see the run log"
        waited_out = self._ctx.stops.waited_out
        if waited_out:
            return "failed", f"the run's timeout passed before any trial could start: {waited_out}"
        error = self._ends.callbacks.error
        if error is not None:
            return "failed", f"a callback raised {type(error).__name__}: {error}"
        if self._ctx.stops.level:
            return "stopped", "stopped before the budget was reached"
        stopped = [run.plan.name for run in self._studies.stopped_by_study()]
        if stopped:
            names = ", ".join(stopped)
            return "stopped", f"study.stop() was called ({names}) before the budget was reached"
        if counts.get("fail") and not counts.get("complete") and not counts.get("pruned"):
            return "failed", "every trial failed; see the reasons in the trials/ folders"
        return "completed", ""


def _sampling_processes(settings: RunSettings) -> int:
    """The run's sampler processes: as many as asked, none by default (see
    controller.sampler_pool); started only for the studies whose sampler uses them (TPE)."""
    return settings.sampling_processes or 0


def _spare_cores(slots: list[Slot]) -> tuple[int, ...]:
    """The cores this process may use that no slot has: auto packing lends them to the GPU
    workers it adds."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    taken = {core for slot in slots for core in slot.cores}
    return tuple(sorted(set(allowed) - taken))


def _gpus_of(slots: list[Slot]) -> tuple[Gpu, ...]:
    seen: dict[int, Gpu] = {}
    for slot in slots:
        for index, uuid in zip(slot.gpus, slot.gpu_uuids, strict=False):
            seen.setdefault(index, Gpu(index=index, uuid=uuid, name="", kind=slot.gpu_kind))
    return tuple(seen.values())
