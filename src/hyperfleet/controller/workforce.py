"""The slots' workers, from start to exit: starting and replacing them, the objectives they load
and drop, what their exit means for the trial they ran, and auto packing's changes.

A worker that dies takes only its trial with it: the trial fails alone with the reason, or is
interrupted (and runs again) when the worker was stopped from outside as the run ends; the slot
gets a fresh worker, unless it keeps dying before it is ready.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from optuna.trial import TrialState

from hyperfleet.cluster.hub import LOST
from hyperfleet.controller.autopack import Change
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.prepared import Preparer
from hyperfleet.controller.slot_table import ActiveTrial, SlotState, SlotTable
from hyperfleet.controller.studies import StudyBook
from hyperfleet.controller.study_run import StudyRun
from hyperfleet.controller.trial_ends import TrialEnds
from hyperfleet.controller.trial_starts import TrialStarts, takes_a_trial
from hyperfleet.errors import ObjectiveError
from hyperfleet.resources.monitor import GpuSample
from hyperfleet.resources.slots import Slot
from hyperfleet.workers.handle import Worker, WorkerHandle
from hyperfleet.workers.protocol import Finished, LoadFailed, ObjectiveSpec, Ready

# Starts a worker on this machine: WorkerHandle, or a test's worker without a process.
StartWorker = Callable[[Slot, dict[str, ObjectiveSpec], Path, Path], Worker]
MAX_START_FAILURES = 3  # a slot whose worker dies this often before it is ready is given up
NEVER_RAN = "interrupted: its worker exited before the trial reached it; it runs again"
# A worker killed by a stop signal hyperfleet did not send (see workers.handle): the job's
# end (scancel, a time limit, a preemption) signals every process of the job at once, and the
# controller's own SIGTERM may come a little after its workers died of theirs. Its trial ends
# as interrupted if the run starts stopping (or the worker's node goes) within this many
# seconds, else as the crash it was: a worker killed by hand while the run goes on.
OUTSIDE_STOP_SECONDS = 3.0


@dataclass(frozen=True)
class OutsideStop:
    """A trial whose worker a stop signal from outside killed: its end waits (see
    OUTSIDE_STOP_SECONDS) until ``until``, or until the run or its node stops."""

    kind: str
    reason: str
    signal: str
    until: float  # monotonic


class Workforce:
    def __init__(
        self,
        ctx: RunContext,
        slots: SlotTable,
        studies: StudyBook,
        starts: TrialStarts,
        ends: TrialEnds,
        preparer: Preparer,
        start_local: StartWorker | None = None,
    ) -> None:
        self._ctx, self._slots, self._studies = ctx, slots, studies
        self._starts, self._ends, self._preparer = starts, ends, preparer
        self._start_local: StartWorker = start_local or WorkerHandle
        self.outside_stops: dict[str, OutsideStop] = {}  # their trials are still running

    # ----- starting ------------------------------------------------------------------------

    def start(self, slot: Slot) -> None:
        specs = {
            run.plan.name: run.plan.spec
            for run in self._studies.runs.values()
            if slot.name in run.plan.slots
        }
        link, run_dir = self._slots.links.get(slot.name), self._ctx.run_dir
        worker: Worker
        if link is not None:
            worker = link.start_worker(slot, specs, str(run_dir.path))
        else:
            worker = self._start_local(slot, specs, run_dir.workers_dir, run_dir.path)
        self._slots.workers[slot.name] = worker
        self._slots.move(slot.name, SlotState.STARTING).pid = worker.pid or None

    def on_ready(self, name: str, worker: Worker, ready: Ready) -> None:
        autopack = self._ctx.autopack
        if autopack is not None and autopack.leaving(name):
            return  # retired while it started: it reads the request to leave next
        worker.ready = True
        if autopack is not None:
            autopack.ready(name, time.monotonic())
        self._slots.move(name, SlotState.IDLE).pid = ready.pid

    def replace(self, name: str, worker: Worker, graceful: bool) -> None:
        self._preparer.forget(name)
        if graceful:
            worker.shutdown()
        else:
            worker.kill()
        del self._slots.workers[name]
        self.start(self._slots.named(name))

    def retire(self, name: str, worker: Worker) -> None:
        """Kill the worker's whole process group; start a fresh one unless the run is stopping
        (or the worker's node is taken back)."""
        if self._ctx.stops.level or self._slots.on_drained_node(name):
            worker.kill()
            del self._slots.workers[name]
        else:
            self.replace(name, worker, graceful=False)

    def give_up(self, name: str, why: str) -> None:
        self._slots.dead.add(name)
        worker = self._slots.workers.pop(name, None)
        if worker is not None:
            worker.kill()
        self._slots.move(name, SlotState.STOPPED)
        self._ctx.announce(f"slot {name} stopped: {why}")

    def after_trial(
        self, name: str, worker: Worker, active: ActiveTrial, finished: Finished, failed: bool
    ) -> None:
        """What the slot's worker does after its trial ended: retired by auto packing, or
        replaced after a failure (a failed trial may leave the process broken: a CUDA context
        after an OOM, half-set globals, threads or children it started) or after its limit of
        trials."""
        autopack = self._ctx.autopack
        if autopack is not None:
            ended = (active.started, time.monotonic())
            autopack.trial_ended(name, *ended, finished.gpu_peak_mib, failed)
            if autopack.leaving(name):
                self.park(name, worker, graceful=not failed)
                return
        limit = self._ctx.settings.max_trials_per_worker
        if failed:
            self.retire(name, worker)
        elif limit is not None and worker.trials_run >= limit and not self._ctx.stops.level:
            self.replace(name, worker, graceful=True)

    # ----- objectives ----------------------------------------------------------------------

    def preload(self, first: list[StudyRun]) -> None:
        """Give each ready worker one of the first studies' objectives to load: one nobody
        holds yet, else (once per worker) the one the fewest hold, so that every slot is
        ready for a trial when the storage opens."""
        holders = {run.plan.name: 0 for run in first}
        for worker in self._slots.workers.values():
            held = {*worker.loaded, worker.loading or ""}
            for study in held & holders.keys():
                holders[study] += 1
        for name, worker in self._slots.workers.items():
            if not takes_a_trial(worker):
                continue
            mine = [run for run in first if name in run.plan.slots]
            unheld = [run for run in mine if not holders[run.plan.name]]
            holds_one = any(run.plan.name in worker.loaded for run in mine)
            if not unheld and (holds_one or not mine):
                continue
            run = min(unheld or mine, key=lambda r: holders[r.plan.name])
            worker.load(run.plan.name)
            holders[run.plan.name] += 1
            self._slots.move(name, SlotState.LOADING)

    def on_loaded(self, name: str, worker: Worker, study: str) -> None:
        worker.loading = None
        self._slots.start_failures[name] = 0
        worker.loaded.add(study)
        run = self._studies.runs[study]
        run.loaded_once = True
        self._slots.move(name, SlotState.IDLE).study = None
        if self._slots.loading.get(name) is not None:
            self._slots.stop_holding(name)
            # A worker auto packing retired while it loaded reads the request to leave next.
            if self._studies.has_work(run) and not worker.leaving:
                self._starts.start(name, worker, run)
        if run.released:  # the study ended while this worker was loading it
            worker.release(study)

    def on_load_failed(self, name: str, failure: LoadFailed) -> None:
        run = self._studies.runs[failure.study]
        if not self._studies.opened and not self._studies.another_may_start(run):
            # Show the user's own frames; a traceback without any says no more than the message.
            frames = failure.traceback.rstrip() if '  File "' in failure.traceback else ""
            where = f" (study {run.plan.name!r})" if len(self._studies.runs) > 1 else ""
            raise ObjectiveError(
                f"the objective {run.plan.spec.describe()}{where} could not be loaded: "
                f"{failure.message}" + (f"\n{frames}" if frames else "")
            )
        if self._slots.loading.get(name) is not None:
            self._slots.stop_holding(name)
        worker = self._slots.workers.get(name)
        if worker is not None:
            worker.loading = None  # it said why, and exits: not a worker dying unexplained
            worker.leaving = True  # with the objectives it holds: it takes no other trial
        if run.loaded_once:  # it loads elsewhere: this slot is what is wrong
            self.give_up(name, f"the objective could not be loaded: {failure.message}")
            return
        # A later stage's objective: that study stops, the others go on. The worker exits
        # after a failed load, and the loop starts a fresh one.
        run.load_failure = failure.message
        self._ctx.announce(
            f"study {run.plan.name} stopped: its objective {run.plan.spec.describe()} could "
            f"not be loaded: {failure.message}; see {self._ctx.run_dir.workers_dir}"
        )

    def release_done_studies(self) -> None:
        """Have the workers drop the objective (and its data set) of every study that has
        nothing left to run, so that a sequential run holds one stage's data at a time."""
        if self._ctx.stops.level:
            return  # everything is dropped at the end anyway
        loading = {run.plan.name for run in self._slots.loading.values()}
        for run in self._studies.runs.values():
            if run.released or run.running or run.plan.name in loading:
                continue
            if not self._studies.budget_spent(run):
                continue
            run.released = True
            for worker in self._slots.workers.values():
                if run.plan.name in worker.loaded:
                    worker.release(run.plan.name)

    # ----- exits ---------------------------------------------------------------------------

    def on_exit(self, name: str, worker: Worker) -> None:
        """The worker is gone: its trial ends (or waits, if a stop signal from outside killed
        it), and its slot gets what comes next."""
        active = self._slots.active.get(name)
        if active is not None:
            self._end_trial_of(name, worker, active)
        else:
            self._slots.stop_holding(name)
            if (not worker.ready or worker.loading is not None) and not worker.leaving:
                # Died starting or loading an objective (out of memory, a crash in a library):
                # a slot where this keeps happening is given up, not restarted for ever.
                self._slots.start_failures[name] = self._slots.start_failures.get(name, 0) + 1
        self._slots.kill_at.pop(name, None)
        self._preparer.forget(name)
        worker.kill()
        del self._slots.workers[name]
        if name in self.outside_stops:
            self.settle_outside_stops()  # at once if the run is stopping already
        else:
            self._after_gone(name)

    def _end_trial_of(self, name: str, worker: Worker, active: ActiveTrial) -> None:
        kind, reason = worker.exit_description()
        outside = worker.outside_signal() if kind == "crash" else ""
        if active.end_kind:
            kind, reason = active.end_kind, active.end_reason
        elif not active.delivered or worker.leaving:
            # The trial never ran on a live worker: not its fault, so it runs again and does
            # not count.
            kind, reason = "interrupted", NEVER_RAN
        elif outside or (kind == LOST and self._ctx.stops.level):
            # Stopped from outside: the job's end, unless the run goes on (see
            # OUTSIDE_STOP_SECONDS); a node lost while the run stops went with the job.
            until = time.monotonic() + OUTSIDE_STOP_SECONDS
            self.outside_stops[name] = OutsideStop(kind, reason, outside, until)
            return
        self._ends.tell(name, TrialState.FAIL, kind=kind, reason=reason)

    def interrupt(self, names: list[str], reason: str) -> None:
        """End these slots' running trials as interrupted (they run again): their workers get
        SIGTERM together, then each is killed after the kill grace if it is still there."""
        for name in names:
            self._slots.workers[name]._signal_group(signal.SIGTERM)
        for name in names:
            self._slots.workers[name].terminate(self._ctx.settings.kill_grace)
            self._ends.tell(name, TrialState.FAIL, kind="interrupted", reason=reason)

    def settle_outside_stops(self) -> None:
        """End the trials whose worker a stop signal from outside killed: interrupted once the
        run stops or the worker's node goes (the job's end), a crash once the wait is over."""
        now = time.monotonic()
        for name, held in list(self.outside_stops.items()):
            node_gone = self._slots.link_lost(name)
            if self._ctx.stops.level or node_gone:
                kind, reason = "interrupted", _stopped_from_outside(held, node_gone)
            elif now >= held.until:
                kind = held.kind
                reason = f"{held.reason}, sent from outside hyperfleet while the run went on"
            else:
                continue
            del self.outside_stops[name]
            self._ends.tell(name, TrialState.FAIL, kind=kind, reason=reason)
            self._after_gone(name)

    def _after_gone(self, name: str) -> None:
        """The slot of a worker that is gone and whose trial ended: removed with its lost
        node, left to auto packing, given up, or given a fresh worker."""
        autopack = self._ctx.autopack
        if self._slots.link_lost(name):
            self.remove_slot(name)
        elif autopack is not None and autopack.leaving(name):
            autopack.gone(name)  # retired by auto packing: not replaced
            self._slots.move(name, SlotState.STOPPED)
        elif self._slots.start_failures.get(name, 0) >= MAX_START_FAILURES:
            self.give_up(name, "its worker keeps dying before it is ready")
        elif not self._ctx.stops.level and not self._slots.on_drained_node(name):
            self.start(self._slots.named(name))

    def remove_slot(self, name: str) -> None:
        """A lost node's slot leaves the pool (its trial was ended already)."""
        self._slots.remove(name)
        for run in self._studies.runs.values():
            if name in run.plan.slots:
                kept = tuple(slot for slot in run.plan.slots if slot != name)
                run.plan = replace(run.plan, slots=kept)

    # ----- auto packing (see controller/autopack.py) ---------------------------------------

    def pack_gpus(self, gpus: Mapping[str, dict[int, GpuSample]]) -> None:
        """Let auto packing grow or shrink each GPU's workers from its newest readings
        (``gpus``: by node, "" for this machine)."""
        autopack = self._ctx.autopack
        if autopack is None or self._ctx.stops.level:
            return
        pids = {name: worker.pid for name, worker in self._slots.workers.items()}
        busy = set(self._slots.active)
        changes = autopack.tick(gpus, pids, busy, time.monotonic())
        for change in changes:
            self._apply(change)
        if changes:  # a GPU's auto-packed trials share it: each holds 1/n of it
            self._slots.cost.update(autopack.costs())
        for text in autopack.take_messages():
            self._ctx.state.packing.append(text)
            self._ctx.announce(text)

    def _apply(self, change: Change) -> None:
        slot = change.slot
        if not change.start:
            worker = self._slots.workers.get(slot.name)
            if worker is not None:
                self.park(slot.name, worker, graceful=True)
            return
        if not self._slots.knows(slot.name):  # new, not one retired before
            first = f"{slot.name.rpartition('#')[0]}#0"
            self._slots.add(slot, self._slots.links.get(first))  # on a node: it starts there
            # The GPU's workers hold it as one.
            self._slots.ledger.add(slot.name, together_with=first)
            for run in self._studies.runs.values():
                if first in run.plan.slots:
                    run.plan = replace(run.plan, slots=(*run.plan.slots, slot.name))
        self.start(slot)

    def park(self, name: str, worker: Worker, graceful: bool) -> None:
        """Retire a worker auto packing no longer wants; its slot may get one again later.
        An idle one is asked to leave, and its exit is handled (not waited for) like any."""
        if graceful:
            worker.leaving = True
            worker.ask_to_leave()
            return
        worker.kill()  # a failed trial's worker may be broken: it goes at once
        del self._slots.workers[name]
        if self._ctx.autopack is not None:
            self._ctx.autopack.gone(name)
        self._slots.move(name, SlotState.STOPPED)


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
