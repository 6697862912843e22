"""What every part of the controller shares: the run's settings and folder, the state the views
show, the stop level, the effects that wait for the next commit, and the one way out to the views.

The parts (slots, studies, trial starts and ends, workers, nodes) each keep their own records;
this is the little they all read. Everything runs on the loop's thread, except
:meth:`Stops.request`, which a signal handler may call (it only sets fields).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hyperfleet.cluster.hub import NodeHub
from hyperfleet.config import RunSettings
from hyperfleet.controller.commits import Effect, Effects
from hyperfleet.controller.fleetpack import FleetPack
from hyperfleet.display.events import Event, EventSink, Notice
from hyperfleet.display.runstate import RunState
from hyperfleet.store.files import FileWriter
from hyperfleet.store.rundir import RunDir


@dataclass
class Stops:
    """How far the run is from its end: the stop level users asked for, the hard stop a grace
    period leads to, and the run's own timeout."""

    level: int = 0  # 1: start no new trials; 2: end running trials as interrupted
    announced: int = 0  # the level the views were told of
    hard_at: float | None = None  # monotonic: when a soft stop becomes a hard one (SIGTERM)
    deadline: float | None = None  # monotonic: the run's timeout
    waited_out: str = ""  # what the run still waited for when its timeout passed

    def request(self, hard: bool, grace: float | None) -> None:
        self.level = 2 if hard else max(self.level, 1)
        if grace is not None and self.hard_at is None:
            self.hard_at = time.monotonic() + grace

    @property
    def in_a_hurry(self) -> bool:
        """Stopped hard (a second Ctrl+C) or by SIGTERM: what follows should not wait."""
        return self.level >= 2 or self.hard_at is not None

    def timed_out(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class RunContext:
    settings: RunSettings
    run_dir: RunDir
    files: FileWriter  # the caller's: the best/ folders wait on it too
    state: RunState
    sink: EventSink  # every event goes to it (see hyperfleet.display.events)
    sequential: bool
    wake: Callable[[], None]  # wakes the loop from another thread
    stops: Stops = field(default_factory=Stops)
    # What users and workers see of the storage's new records waits for them to be durable:
    # one commit at a time, on the committer's thread, then these run in order.
    pending: Effects = field(default_factory=Effects)
    hub: NodeHub | None = None  # many machines: the agents' connections
    autopack: FleetPack | None = None  # auto packing of this machine's and nodes' GPUs

    @property
    def clustered(self) -> bool:
        return self.hub is not None

    def emit(self, event: Event) -> None:
        """The one way out to the views (screen, run.log, status.json)."""
        self.sink.handle(event)

    def announce(self, text: str) -> None:
        """A one-line notice to every view."""
        self.emit(Notice(self.state, text))

    def after_commit(self, effect: Effect) -> None:
        """Run ``effect`` once what the storage was told so far is durable."""
        self.pending.others.append(effect)

    def emit_after_commit(self, event: Event) -> None:
        self.after_commit(functools.partial(self.emit, event))
