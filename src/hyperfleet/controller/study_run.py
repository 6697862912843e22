"""A study of the run: its plan (how to open it, its objective, where it may run, its budget)
and its state while it runs (the opened study, what counts against its budget, its clock)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.controller import ahead
from hyperfleet.display.runstate import StudyView
from hyperfleet.store import schema
from hyperfleet.store.rundir import RunDir
from hyperfleet.workers.protocol import ObjectiveSpec

Callback = Callable[[optuna.Study, FrozenTrial], None]


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
    # Optuna's callbacks, called with (study, frozen_trial) as each trial ends (see
    # controller.callbacks).
    callbacks: tuple[Callback, ...] = ()


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
    budget_count: schema.BudgetCount = field(default_factory=schema.BudgetCount)  # when shared
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
    stop_said: bool = False  # study.stop() was called, and the views were told

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


def opened(run: StudyRun) -> optuna.Study:
    if run.study is None:
        raise RuntimeError(f"the study {run.plan.name!r} is not open yet")
    return run.study
