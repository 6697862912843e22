"""Every slot of the run as a small state machine, with its worker and what it holds.

A slot is in one of a few states (:class:`SlotState`), and every change of state goes through
:meth:`SlotTable.move`, which checks it against :data:`MOVES` and sets what the views show.
A slot that waits for a trial (its worker loads the study's objective, or a slow sampler
prepares the trial off the loop's thread) or runs one holds its resources (the ledger: GPUs,
cores) and its study's fair share (the share book) as the trial will; both are taken in one
place (:meth:`SlotTable.hold`, :meth:`SlotTable.begin`) and given back in one
(:meth:`SlotTable._let_go`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, cast

import optuna
import psutil

from hyperfleet.cluster.remote import RemoteWorker
from hyperfleet.controller import ahead
from hyperfleet.controller.policy import ShareBook
from hyperfleet.controller.study_run import StudyRun
from hyperfleet.display.runstate import RunState, SlotView, TrialRecord
from hyperfleet.resources.shapes import Ledger
from hyperfleet.resources.slots import Slot
from hyperfleet.workers.handle import Worker, WorkerHandle
from hyperfleet.workers.protocol import RunTrial

if TYPE_CHECKING:
    from hyperfleet.cluster.hub import NodeLink


class SlotState(str, Enum):
    """What a slot does now; the value is what the views show."""

    STARTING = "starting"  # its worker starts (or a fresh one replaces it)
    LOADING = "loading"  # its worker loads a study's objective
    IDLE = "idle"  # ready for a trial
    SAMPLING = "sampling"  # waits for a slow sampler (off the loop's thread) or a sampler process
    BUSY = "busy"  # runs a trial
    STOPPED = "stopped"  # given up, retired by auto packing, or the run ended


# The moves a slot may make. Any state may start a fresh worker or stop; the rest follow the
# worker's messages and the trials the loop hands out.
MOVES: dict[SlotState, frozenset[SlotState]] = {
    SlotState.STARTING: frozenset({SlotState.IDLE, SlotState.STARTING, SlotState.STOPPED}),
    SlotState.LOADING: frozenset({SlotState.IDLE, SlotState.STARTING, SlotState.STOPPED}),
    SlotState.IDLE: frozenset(SlotState),
    SlotState.SAMPLING: frozenset({SlotState.IDLE, SlotState.STARTING, SlotState.STOPPED}),
    SlotState.BUSY: frozenset({SlotState.IDLE, SlotState.STARTING, SlotState.STOPPED}),
    SlotState.STOPPED: frozenset({SlotState.STARTING, SlotState.STOPPED}),
}


@dataclass
class ActiveTrial:
    """A trial running on a slot."""

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


@dataclass
class Launch:
    """A trial on its way to a slot: the message, and what the loop keeps once it is sent."""

    run: StudyRun
    trial: optuna.Trial
    record: TrialRecord
    message: RunTrial
    inherited: set[int]


class SlotTable:
    """The run's slots, their workers, their states and the claims they hold."""

    def __init__(self, slots: list[Slot], ledger: Ledger, state: RunState) -> None:
        self.slots = slots
        self.ledger = ledger
        self.book = ShareBook()
        self.cost = {slot.name: slot_cost(slot) for slot in slots}
        self.workers: dict[str, Worker] = {}
        # Many machines: which node each remote slot is on (a slot not listed is local).
        self.links: dict[str, NodeLink] = {}
        self.active: dict[str, ActiveTrial] = {}
        # Slots that hold their claims for a trial to come: their worker loads its study's
        # objective, or a slow sampler prepares it (see controller/slow_samplers.py).
        self.loading: dict[str, StudyRun] = {}
        self.sampling: dict[str, StudyRun] = {}
        # Trials sent to a slot before its last result was recorded (see controller.prepared).
        self.sent_next: dict[str, Launch] = {}
        self.start_failures: dict[str, int] = {}
        self.dead: set[str] = set()  # given up
        # When each slot's worker group gets SIGKILL (a trial past its deadline, terminated).
        self.kill_at: dict[str, float] = {}
        # Nodes their engine takes back (Ray's drain): no new trial goes there.
        self.drained: set[str] = set()
        self._states: dict[str, SlotState] = {slot.name: SlotState.STARTING for slot in slots}
        self._state = state
        self._cpu: dict[str, psutil.Process] = {}
        state.slots = [_view_of(slot) for slot in slots]

    # ----- states --------------------------------------------------------------------------

    def state_of(self, name: str) -> SlotState:
        return self._states[name]

    def move(self, name: str, to: SlotState) -> SlotView:
        """Change the slot's state (checked against MOVES); its view, for what else it shows."""
        now = self._states.get(name, SlotState.STARTING)
        if to not in MOVES[now]:
            raise RuntimeError(
                f"hyperfleet: slot {name} cannot go from {now.value} to {to.value}; this is a "
                "bug: run the same command again to resume, and please report it"
            )
        self._states[name] = to
        view = self._state.slot(name)
        view.state = to.value
        return view

    def stop_all(self) -> None:
        for name in self._states:
            self._states[name] = SlotState.STOPPED
        for view in self._state.slots:
            view.state = SlotState.STOPPED.value

    # ----- claims --------------------------------------------------------------------------

    def hold(self, name: str, run: StudyRun, state: SlotState) -> None:
        """The slot waits for a trial of ``run``: its worker loads the objective (LOADING) or a
        sampler prepares the trial (SAMPLING). It holds the trial's claims meanwhile."""
        waiting = self.loading if state == SlotState.LOADING else self.sampling
        waiting[name] = run
        self._claim(name, run)
        self.move(name, state).study = run.plan.name

    def stop_holding(self, name: str) -> StudyRun | None:
        """The wait for a trial is over (or its worker is gone): the claims go back."""
        run = self.loading.pop(name, None) or self.sampling.pop(name, None)
        if run is not None:
            self._let_go(name)
        return run

    def begin(self, name: str, active: ActiveTrial) -> SlotView:
        """The slot runs ``active``: it holds the trial's claims until :meth:`end`."""
        self.active[name] = active
        self._claim(name, active.run)
        return self.move(name, SlotState.BUSY)

    def end(self, name: str) -> ActiveTrial:
        """The slot's trial ended: its claims go back."""
        active = self.active.pop(name)
        self._let_go(name)
        return active

    def _claim(self, name: str, run: StudyRun) -> None:
        self.ledger.claim(name)
        self.book.start(run.plan.name, name, self.cost[name])

    def _let_go(self, name: str) -> None:
        self.ledger.release(name)
        self.book.stop(name)

    def room(self, name: str) -> tuple[bool, float]:
        """Whether the slot's resources are free now, and how full the fullest of them is."""
        return self.ledger.fits(name), self.ledger.load(name)

    # ----- membership ----------------------------------------------------------------------

    def add(self, slot: Slot, link: NodeLink | None = None) -> None:
        """A slot that joins the run (a node's, or one auto packing adds); its ledger entry is
        the caller's."""
        self.slots.append(slot)
        self.cost[slot.name] = slot_cost(slot)
        self._states[slot.name] = SlotState.STARTING
        if link is not None:
            self.links[slot.name] = link
        self._state.slots.append(_view_of(slot))

    def remove(self, name: str) -> None:
        """A lost node's slot leaves the pool (its trial was ended already)."""
        self.links.pop(name, None)
        self.slots = [slot for slot in self.slots if slot.name != name]
        self.cost.pop(name, None)
        self.ledger.remove(name)
        self.dead.discard(name)
        self.start_failures.pop(name, None)
        self._states.pop(name, None)
        self._state.slots = [view for view in self._state.slots if view.name != name]

    def named(self, name: str) -> Slot:
        return next(s for s in self.slots if s.name == name)

    def knows(self, name: str) -> bool:
        return any(s.name == name for s in self.slots)

    def local_workers(self) -> Iterator[tuple[str, WorkerHandle]]:
        """The workers on this machine (a slot without a node link)."""
        for name, worker in self.workers.items():
            if name not in self.links:  # started here, by Workforce.start: a handle
                yield name, cast(WorkerHandle, worker)

    def node_of(self, name: str) -> str | None:
        link = self.links.get(name)
        return link.node if link is not None else None

    def on_drained_node(self, name: str) -> bool:
        link = self.links.get(name)
        return link is not None and link.node in self.drained

    def link_lost(self, name: str) -> bool:
        """Whether the slot is on a node whose link is lost."""
        link = self.links.get(name)
        return link is not None and not link.alive

    def all_dead(self, names: tuple[str, ...], clustered: bool) -> bool:
        """Every one of these slots was given up. With a cluster, a study with no slot yet
        waits for nodes to join instead."""
        if clustered:
            return bool(names) and all(name in self.dead for name in names)
        return all(name in self.dead for name in names)

    def every_slot_dead(self) -> bool:
        return bool(self.slots) and len(self.dead) == len(self.slots)

    # ----- readings ------------------------------------------------------------------------

    def cpu_percent(self, name: str) -> float | None:
        """CPU use of the slot's worker and its trial's processes: as its node's agent read it,
        or read here (the first reading of a process only starts the count)."""
        worker = self.workers.get(name)
        if worker is None:
            return None
        link = self.links.get(name)
        if link is not None:
            reading, remote = link.reading, cast(RemoteWorker, worker)
            return reading.workers_cpu.get(remote.id) if reading is not None else None
        process = self._cpu.get(name)
        if process is None or process.pid != worker.pid:
            process = self._cpu[name] = psutil.Process(worker.pid)
            with contextlib.suppress(psutil.Error):
                process.cpu_percent()
            return None
        with contextlib.suppress(psutil.Error):
            return float(process.cpu_percent())
        return None


def slot_cost(slot: Slot) -> float:
    """What a trial on the slot holds, for fair shares: GPUs (fractions too), else cores."""
    if slot.kind == "gpu":
        return len(slot.gpus) * slot.gpu_share
    return float(max(1, len(slot.cores)))


def _view_of(slot: Slot) -> SlotView:
    return SlotView(slot.name, slot.kind, slot.gpus, slot.cores)
