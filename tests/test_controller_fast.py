"""The controller itself, driven with fake workers (tests/support/fake_workers.py): no process
starts, so each test takes milliseconds where the end-to-end tests of the same behaviours
(test_retry, test_failures, test_campaign_run, test_signals...) take seconds. They check the
same things: what the storage holds (trial states, failure kinds and reasons, repeats), the
run state's slot views and the run's outcome.

Synchronisation is by barriers inside the objectives (a barrier of n holds n trials running
together), never by sleeping."""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.config import RetryPolicy, RunSettings
from hyperfleet.controller import bookkeeping as books
from hyperfleet.controller.files import FileWriter
from hyperfleet.controller.loop import MAX_START_FAILURES, Controller, Outcome, StudyPlan
from hyperfleet.errors import ObjectiveError, WorkerError
from hyperfleet.events import EventSink
from hyperfleet.resources.shapes import single_pool
from hyperfleet.resources.slots import PoolOptions, plan_slots
from hyperfleet.rundir import RunDir, RunOwner
from hyperfleet.state import RunState
from hyperfleet.storage import open_private_journal
from hyperfleet.workers.protocol import ObjectiveSpec
from support.fake_workers import (
    Behaviour,
    FakeFleet,
    Objective,
    WatchedSlotView,
    WorkerDies,
    wait_until_killed,
    watch_slots,
)
from support.searches import cpu_slots

# A test that deadlocks fails in seconds instead of the suite's five minutes.
pytestmark = pytest.mark.timeout(20)
BARRIER_SECONDS = 5.0  # a barrier that is never full fails its trials instead of hanging
CRASH_REASON = "killed by SIGKILL (out of memory, or killed from outside)"


class Recorder(EventSink):
    """The messages the run announced, in order."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_message(self, state: RunState, text: str) -> None:
        self.messages.append(text)


@dataclass
class Study:
    """One study of the run: its name, objective, budget and weight."""

    name: str
    objective: Objective
    n_trials: int
    weight: float = 1.0


@dataclass
class Run:
    """A controller over fake workers, and what the test looks at once it ran."""

    controller: Controller
    fleet: FakeFleet
    recorder: Recorder
    slots: dict[str, WatchedSlotView]
    run_dir: RunDir
    files: FileWriter
    studies: dict[str, optuna.Study] = field(default_factory=dict)

    def run(self) -> Outcome:
        try:
            return self.controller.run()
        finally:
            self.files.close()
            assert self.fleet.all_ended(), "a fake worker was never closed"

    def trials(self, study: str = "s") -> list[FrozenTrial]:
        return self.controller.studies[study].get_trials()


def _open(name: str, run_dir: RunDir, journal: bool) -> Callable[[], optuna.Study]:
    sampler = optuna.samplers.RandomSampler(seed=0)
    if journal:  # the run folder's own journal, committed on the committer's thread
        return lambda: optuna.create_study(
            storage=open_private_journal(run_dir.journal),
            study_name=name,
            sampler=sampler,
            load_if_exists=True,
        )
    return lambda: optuna.create_study(study_name=name, sampler=sampler)


def _controller(
    tmp_path: Path,
    studies: Sequence[Study],
    slots: int,
    settings: RunSettings | None = None,
    behaviour: Callable[[str, int], Behaviour] = lambda slot, before: Behaviour(),
    journal: bool = False,
) -> Run:
    """A run of ``studies`` (one: a single search; more: a campaign) on ``slots`` CPU slots."""
    pool = single_pool(plan_slots(cpu_slots(slots), PoolOptions(cpu_slots=slots)))
    names = tuple(slot.name for slot in pool.slots)
    run_dir = RunDir(tmp_path / "run")
    single = len(studies) == 1
    run_dir.create(RunOwner("study", studies[0].name) if single else RunOwner("campaign", "c"))
    plans = [
        StudyPlan(
            name=study.name,
            spec=ObjectiveSpec("pickle", name=study.name),  # never loaded: the fakes run
            open_study=_open(study.name, run_dir, journal),
            folder=run_dir if single else run_dir.study_folder(study.name),
            slots=names,
            n_trials=study.n_trials,
            weight=study.weight,
        )
        for study in studies
    ]
    fleet = FakeFleet({study.name: study.objective for study in studies}, behaviour)
    recorder = Recorder()
    files = FileWriter()
    controller = Controller(
        plans,
        pool,
        settings or RunSettings(n_trials=studies[0].n_trials),
        run_dir,
        [recorder],
        files=files,
        start_worker=fleet,
    )
    watched = watch_slots(controller.state)
    return Run(controller, fleet, recorder, watched, run_dir, files)


def _single(
    tmp_path: Path, objective: Objective, n_trials: int, slots: int, **kwargs: Any
) -> Run:
    return _controller(tmp_path, [Study("s", objective, n_trials)], slots, **kwargs)


def _together(count: int) -> threading.Barrier:
    return threading.Barrier(count, timeout=BARRIER_SECONDS)


def _states(view: WatchedSlotView) -> list[str]:
    """The slot's states in order, each repeat of the same state once."""
    return [state for state, _ in itertools.groupby(view.states)]


def _attr(trial: FrozenTrial, key: str) -> Any:
    return trial.system_attrs.get(key)


# ----- every slot busy, the budget reached --------------------------------------------------


@pytest.mark.parametrize("journal", [False, True], ids=["in-memory", "journal"])
def test_every_slot_gets_a_trial_and_the_run_ends_with_n_trials_complete(
    tmp_path: Path, journal: bool
) -> None:
    first_three = _together(3)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        if trial.number < 3:
            first_three.wait()  # three trials at once: one on each slot
        return x * x

    run = _single(tmp_path, objective, n_trials=9, slots=3, journal=journal)
    outcome = run.run()
    assert outcome.status == "completed", outcome.message
    trials = run.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 9
    assert outcome.counts["complete"] == 9 and outcome.counts["fail"] == 0
    assert {_attr(t, books.SLOT_ATTR) for t in trials[:3]} == set(run.slots)
    assert all(t.value == t.params["x"] ** 2 for t in trials)
    # One worker per slot, which ran every trial of its slot.
    assert [len(run.fleet.on(name)) for name in run.slots] == [1, 1, 1]
    for trial in trials:
        (worker,) = run.fleet.on(_attr(trial, books.SLOT_ATTR))
        assert _attr(trial, books.PID_ATTR) == worker.pid
        assert trial.number in worker.trials
    assert sum(view.trials_done for view in run.slots.values()) == 9
    (view,) = run.controller.state.studies
    assert (view.complete, view.failed, view.finished) == (9, 0, 9)
    assert view.best_number == min(trials, key=lambda t: t.value or 0.0).number
