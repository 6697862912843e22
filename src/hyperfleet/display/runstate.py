"""The run's state as the controller sees it: what every view (live, plain log, status) renders.

The controller is the only one that changes it; views read it between loop steps, in the
controller's own thread, so no locking is needed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hyperfleet.resources.monitor import GpuSample


@dataclass
class SlotView:
    name: str
    kind: str
    gpus: tuple[int, ...]
    cores: tuple[int, ...]
    state: str = "starting"  # starting, idle, busy, stopped
    pid: int | None = None
    trial: int | None = None
    study: str | None = None
    experiment: str = ""  # the named experiment of the trial it runs, if any
    since: float | None = None  # wall time the current trial started
    trials_done: int = 0
    busy_seconds: float = 0.0
    cpu_percent: float | None = None  # CPU use of the trial's processes, for CPU slots


@dataclass
class NodeView:
    """A node an agent joined the run from, with its newest readings (see
    :mod:`hyperfleet.cluster.readings`); the controller's own machine is not one."""

    name: str
    where: str = ""  # the address it joined from
    state: str = "joined"  # joined, lost
    cores: int = 0
    gpus: dict[int, GpuSample] = field(default_factory=dict)  # by the node's GPU index
    cpu_percent: float | None = None  # the whole node's, of all its cores
    memory_used_mib: int | None = None
    memory_total_mib: int | None = None
    updated: float | None = None  # wall time of its newest reading


@dataclass
class TrialRecord:
    study: str
    number: int
    slot: str
    state: str  # RUNNING, COMPLETE, PRUNED, FAIL
    params: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    reason: str = ""
    fail_kind: str = ""
    start: float = 0.0  # wall time
    end: float | None = None
    retry_of: int | None = None
    experiment: str = ""  # the named experiment (or grid point) the trial runs, if any

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class StudyView:
    name: str
    directions: tuple[str, ...]
    n_trials: int | None = None
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # failed trials, the interrupted ones apart
    interrupted: int = 0  # failed as "interrupted": run again, never counted
    running: int = 0
    finished: int = 0  # what counts against the budget
    best_number: int | None = None
    best_values: list[float] | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    stage: int = 0  # its place in a sequential campaign
    stage_name: str = ""  # what the campaign file calls that stage ("" without one)
    timeout: float | None = None  # its own time budget, counted from its first trial
    ends_at: float | None = None  # wall time its timeout runs out, once its first trial started


@dataclass
class TrialClock:
    """The time at least one trial ran this run, from the trials' start and end times as the
    views hear of them: what a slot's busy share is of (start-up, and a wait with no trial
    running, do not count as the slots' idle time). Constant work per trial."""

    running: int = 0
    since: float = 0.0  # when the trials now running began to run without a gap
    total: float = 0.0  # the time before that

    def started(self, at: float) -> None:
        if self.running == 0:
            self.since = at
        self.running += 1

    def ended(self, at: float) -> None:
        if self.running == 0:
            return  # a trial that started before this run's views heard of it
        self.running -= 1
        if self.running == 0:
            self.total += max(0.0, at - self.since)

    def seconds(self, now: float) -> float:
        return self.total + (max(0.0, now - self.since) if self.running else 0.0)


@dataclass
class RunState:
    run_name: str
    run_dir: str
    started: float = field(default_factory=time.time)
    timeout: float | None = None
    slots: list[SlotView] = field(default_factory=list)
    studies: list[StudyView] = field(default_factory=list)
    recent: deque[TrialRecord] = field(default_factory=lambda: deque(maxlen=50))
    gpus: dict[int, GpuSample] = field(default_factory=dict)  # the controller's machine's
    nodes: dict[str, NodeView] = field(default_factory=dict)  # other machines, by node name
    stopping: int = 0  # 0 running, 1 finishing running trials, 2 terminating them
    packing: list[str] = field(default_factory=list)  # auto packing's decisions, in order
    sequential: bool = False  # stages run one after another
    # Every budget was reached before this run began: it runs nothing, so it neither says it
    # runs on the slots nor replaces the last run's status.json and summary.md with its own.
    nothing_to_run: bool = False
    _index: dict[str, SlotView] = field(default_factory=dict, repr=False, compare=False)
    _indexed: list[SlotView] | None = field(default=None, repr=False, compare=False)

    def slot(self, name: str) -> SlotView:
        # Through an index, rebuilt when the list was replaced or gained a slot: the controller
        # looks slots up several times per trial, and a scan of hundreds each time added up.
        view = self._index.get(name)
        if view is None or self._indexed is not self.slots:
            self._index = {s.name: s for s in self.slots}
            self._indexed = self.slots
            view = self._index[name]
        return view

    @property
    def elapsed(self) -> float:
        return time.time() - self.started
