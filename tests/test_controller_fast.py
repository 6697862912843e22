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
import signal
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.config import RetryPolicy, RunSettings
from hyperfleet.controller import workforce
from hyperfleet.controller.loop import Controller, Outcome
from hyperfleet.controller.study_run import StudyPlan
from hyperfleet.controller.workforce import MAX_START_FAILURES
from hyperfleet.display.events import Event, Notice
from hyperfleet.errors import ObjectiveError, WorkerError
from hyperfleet.resources.shapes import single_pool
from hyperfleet.resources.slots import PoolOptions, plan_slots
from hyperfleet.store import schema
from hyperfleet.store.files import FileWriter
from hyperfleet.store.rundir import RunDir, RunOwner
from hyperfleet.store.storage import open_private_journal
from hyperfleet.workers.protocol import ObjectiveSpec
from support.fake_workers import (
    Behaviour,
    FakeFleet,
    Objective,
    WatchedSlotView,
    WorkerDies,
    current_worker,
    wait_until_killed,
    watch_slots,
)
from support.searches import cpu_slots

# A test that deadlocks fails in seconds instead of the suite's five minutes.
pytestmark = pytest.mark.timeout(20)
BARRIER_SECONDS = 5.0  # a barrier that is never full fails its trials instead of hanging
CRASH_REASON = "killed by SIGKILL (out of memory, or killed from outside)"


class Recorder:
    """The messages the run announced, in order."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def handle(self, event: Event) -> None:
        if isinstance(event, Notice):
            self.messages.append(event.text)


@dataclass
class Study:
    """One study of the run: its name, objective, budget and weight."""

    name: str
    objective: Objective
    n_trials: int
    weight: float = 1.0
    stage: int = 0  # its place in a sequential run


@dataclass
class Run:
    """A controller over fake workers, and what the test looks at once it ran."""

    controller: Controller
    fleet: FakeFleet
    recorder: Recorder
    slots: dict[str, WatchedSlotView]
    run_dir: RunDir
    files: FileWriter

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
    sequential: bool = False,
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
            stage=study.stage,
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
        recorder,
        sequential=sequential,
        files=files,
        start_worker=fleet,
    )
    watched = watch_slots(controller.state)
    return Run(controller, fleet, recorder, watched, run_dir, files)


def _single(tmp_path: Path, objective: Objective, n_trials: int, slots: int, **kwargs: Any) -> Run:
    return _controller(tmp_path, [Study("s", objective, n_trials)], slots, **kwargs)


def _together(count: int, then: Callable[[], None] | None = None) -> threading.Barrier:
    """A barrier for ``count`` trials; ``then`` runs once all are there, before any goes on."""
    return threading.Barrier(count, action=then, timeout=BARRIER_SECONDS)


def _states(view: WatchedSlotView) -> list[str]:
    """The slot's states in order, each repeat of the same state once."""
    return [state for state, _ in itertools.groupby(view.states)]


def _ran(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that ran, without those prepared for a slot's next turn and never sent."""
    return [t for t in trials if t.state != TrialState.WAITING]


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
        if current_worker().trials == [trial.number]:  # each slot's first trial: all at once
            first_three.wait()
        return x * x

    run = _single(tmp_path, objective, n_trials=9, slots=3, journal=journal)
    outcome = run.run()
    assert outcome.status == "completed", outcome.message
    trials = run.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 9
    assert outcome.counts["complete"] == 9 and outcome.counts["fail"] == 0
    assert {_attr(t, schema.SLOT_ATTR) for t in trials} == set(run.slots)
    assert all(t.value == t.params["x"] ** 2 for t in trials)
    # One worker per slot, which ran every trial of its slot.
    assert [len(run.fleet.on(name)) for name in run.slots] == [1, 1, 1]
    for trial in trials:
        (worker,) = run.fleet.on(_attr(trial, schema.SLOT_ATTR))
        assert _attr(trial, schema.PID_ATTR) == worker.pid
        assert trial.number in worker.trials
    assert sum(view.trials_done for view in run.slots.values()) == 9
    (view,) = run.controller.state.studies
    assert (view.complete, view.failed, view.finished) == (9, 0, 9)
    assert view.best_number == min(trials, key=lambda t: t.value or 0.0).number


def test_a_slot_goes_starting_idle_busy_idle(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0.0, 1.0)

    run = _single(tmp_path, objective, n_trials=3, slots=1)
    outcome = run.run()
    assert outcome.status == "completed", outcome.message
    (view,) = run.slots.values()
    # Started, ready, loading the objective before the storage opens, then a trial at a time;
    # every slot is stopped once the run is over.
    assert _states(view) == [
        "starting",
        "idle",
        "loading",
        "idle",
        *["busy", "idle"] * 3,
        "stopped",
    ]
    (worker,) = run.fleet.started
    assert view.pid == worker.pid
    assert view.trials_done == 3 and view.trial is None and view.study is None


def test_a_trial_s_calls_reach_the_controller_s_trial(tmp_path: Path) -> None:
    """What the objective does through its trial (attributes, reports, study questions) is
    answered by the controller's real trial and stored; a pruned trial ends as pruned."""

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("note", f"x={x:.2f}")
        for step in range(3):
            trial.report(x + step, step)
        assert trial.study.study_name == "s"
        if trial.number % 2:
            raise optuna.TrialPruned()
        return x

    run = _single(tmp_path, objective, n_trials=4, slots=1)
    assert run.run().status == "completed"
    trials = run.trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    for trial in trials:
        x = trial.params["x"]
        assert trial.user_attrs["note"] == f"x={x:.2f}"
        assert trial.intermediate_values == {0: x, 1: x + 1, 2: x + 2}
    (view,) = run.controller.state.studies
    assert (view.complete, view.pruned) == (2, 2)


# ----- a worker that dies --------------------------------------------------------------------


def test_a_worker_that_dies_mid_trial_fails_that_trial_alone(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 1:
            raise WorkerDies()  # the kernel's out-of-memory killer, or a kill -9
        return x

    run = _single(tmp_path, objective, n_trials=6, slots=2)
    outcome = run.run()
    assert outcome.status == "completed", outcome.message
    trials = run.trials()
    assert [t.state for t in trials] == [
        TrialState.FAIL if t.number == 1 else TrialState.COMPLETE for t in trials
    ]
    crashed = trials[1]
    assert _attr(crashed, schema.KIND_ATTR) == "crash"
    assert _attr(crashed, schema.REASON_ATTR) == CRASH_REASON
    assert "x" in crashed.params  # what it suggested before it died is kept
    result = json.loads((run.run_dir.trial_dir(1) / "result.json").read_text())
    assert (result["state"], result["fail_kind"]) == ("FAIL", "crash")
    # Not repeated (no retry rule for crashes), and it counts against the budget.
    assert len(trials) == 6 and outcome.counts["complete"] == 5
    # Its slot got a fresh worker, which ran that slot's later trials; the other slot kept its
    # own.
    slot = _attr(crashed, schema.SLOT_ATTR)
    dead, fresh = run.fleet.on(slot)
    (other,) = [w for w in run.fleet.started if w.slot.name != slot]
    assert dead.trials[-1] == 1 and dead.process.returncode == -9
    later = [t for t in trials if t.number > 1 and _attr(t, schema.SLOT_ATTR) == slot]
    assert [_attr(t, schema.PID_ATTR) for t in later] == [fresh.pid] * len(later)
    assert other.process.returncode == 0  # left when asked, at the run's end
    # The slot was idle once the crashed trial was told, then started its fresh worker.
    states = _states(run.slots[slot])
    fresh_start = states.index("starting", 1)
    assert states[fresh_start - 2 : fresh_start] == ["busy", "idle"]
    assert states[:fresh_start].count("busy") == len(dead.trials)
    assert states[-1] == "stopped"


def test_a_crashed_slot_s_prepared_trial_is_not_left_enqueued(tmp_path: Path) -> None:
    both = _together(2)
    fresh_ran = threading.Event()
    run: Run

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        me = current_worker()
        if me is run.fleet.on(me.slot.name)[0] and len(me.trials) == 1:  # each slot's first
            both.wait()
            if me.slot.name == "cpu#1":
                _wait_for_prepared_trial(trial, "cpu#1")
                raise WorkerDies()
            fresh_ran.wait(BARRIER_SECONDS)  # cpu#0 stays busy until cpu#1's fresh worker runs
        if me.slot.name == "cpu#1":
            fresh_ran.set()
        return x

    run = _single(tmp_path, objective, n_trials=6, slots=2)
    assert run.run().status == "completed"
    trials = run.trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 5 + ["FAIL"]


def _wait_for_prepared_trial(trial: optuna.Trial, slot: str) -> None:
    """Until the controller has prepared the slot's next trial: each look is a call the
    controller answers, and it prepares next trials between its answers."""
    for _ in range(10_000):
        for other in trial.study.get_trials(deepcopy=False):
            if other.state == TrialState.WAITING and _attr(other, schema.SLOT_ATTR) == slot:
                return
    raise AssertionError(f"no next trial was prepared for {slot}")


def test_the_jobs_end_interrupts_trials_whose_workers_it_killed(tmp_path: Path) -> None:
    """SIGTERM reaches the controller and, from outside, the workers: their trials end as
    interrupted (they run again, and do not count), not as crashes."""
    run: Run
    both = _together(2, then=lambda: run.controller.request_stop(grace=30.0))

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        both.wait()
        raise WorkerDies(signal.SIGTERM)

    run = _single(tmp_path, objective, n_trials=10, slots=2)
    assert run.run().status == "stopped"
    ran = _ran(run.trials())
    assert [_attr(t, schema.KIND_ATTR) for t in ran] == ["interrupted"] * 2
    assert all("the job's end" in _attr(t, schema.REASON_ATTR) for t in ran)
    assert all(w.outside_signal() == "SIGTERM" for w in run.fleet.started)


def test_a_worker_killed_from_outside_while_the_run_goes_on_is_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workforce, "OUTSIDE_STOP_SECONDS", 0.0)  # no wait for the run's own stop

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 0:
            raise WorkerDies(signal.SIGTERM)
        return x

    run = _single(tmp_path, objective, n_trials=3, slots=1)
    assert run.run().status == "completed"
    trials = run.trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]  # it counted
    assert _attr(trials[0], schema.KIND_ATTR) == "crash"
    assert _attr(trials[0], schema.REASON_ATTR) == (
        "killed by signal SIGTERM, sent from outside hyperfleet while the run went on"
    )


@pytest.mark.parametrize(
    ("raised", "kind", "reason"),
    [
        (ValueError("bad value"), "error", "ValueError: bad value"),
        (SystemExit(3), "crash", "the objective called sys.exit(3)"),
        (MemoryError("no room"), "oom", f"{schema.HOST_OOM_REASON}: MemoryError: no room"),
    ],
    ids=["error", "sys.exit", "host-oom"],
)
def test_an_objective_that_raises_fails_its_trial_with_the_reason(
    tmp_path: Path, raised: BaseException, kind: str, reason: str
) -> None:
    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        raise raised

    run = _single(tmp_path, objective, n_trials=1, slots=1)
    outcome = run.run()
    assert (outcome.status, outcome.message) == (
        "failed",
        "every trial failed; see the reasons in the trials/ folders",
    )
    (trial,) = run.trials()
    assert trial.state == TrialState.FAIL
    assert (_attr(trial, schema.KIND_ATTR), _attr(trial, schema.REASON_ATTR)) == (kind, reason)
    assert type(raised).__name__ in _attr(trial, schema.TRACEBACK_ATTR)


class OutOfMemoryError(RuntimeError):
    """Named as torch's CUDA out-of-memory error is."""


def test_a_gpu_out_of_memory_error_is_an_oom_failure(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    run = _single(tmp_path, objective, n_trials=1, slots=1)
    run.run()
    (trial,) = run.trials()
    assert _attr(trial, schema.KIND_ATTR) == "oom"
    assert _attr(trial, schema.REASON_ATTR) == (
        "out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )


def test_a_slot_whose_worker_keeps_dying_before_it_is_ready_is_given_up(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0.0, 1.0)

    def behaviour(slot: str, before: int) -> Behaviour:
        return Behaviour(starts=slot != "cpu#1")

    run = _single(tmp_path, objective, n_trials=4, slots=2, behaviour=behaviour)
    outcome = run.run()
    assert outcome.status == "completed", outcome.message
    assert len(run.fleet.on("cpu#1")) == MAX_START_FAILURES
    assert "slot cpu#1 stopped: its worker keeps dying before it is ready" in run.recorder.messages
    assert _states(run.slots["cpu#1"]) == ["starting", "stopped"]
    trials = run.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {_attr(t, schema.SLOT_ATTR) for t in trials} == {"cpu#0"}


def test_a_run_whose_every_worker_dies_while_starting_fails_before_opening_storage(
    tmp_path: Path,
) -> None:
    def objective(trial: optuna.Trial) -> float:
        return 0.0

    run = _single(
        tmp_path, objective, n_trials=2, slots=2, behaviour=lambda slot, before: Behaviour(False)
    )
    with pytest.raises(WorkerError, match="every worker that could run study 's' died"):
        run.run()
    assert len(run.fleet.started) == 2 * MAX_START_FAILURES
    assert run.controller.studies == {}  # never opened


def test_an_objective_that_cannot_load_stops_the_run_before_opening_storage(
    tmp_path: Path,
) -> None:
    def objective(trial: optuna.Trial) -> float:
        return 0.0

    failing = Behaviour(load_error="ModuleNotFoundError: No module named 'torch'")
    run = _single(tmp_path, objective, n_trials=2, slots=2, behaviour=lambda s, n: failing)
    with pytest.raises(ObjectiveError, match="could not be loaded: ModuleNotFoundError"):
        run.run()
    assert run.controller.studies == {}


# ----- retries -------------------------------------------------------------------------------


def test_the_retry_policy_repeats_a_crashed_trial_up_to_its_limit(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_int("n", 1, 100)
        raise WorkerDies()

    settings = RunSettings(n_trials=1, retry=RetryPolicy({"crash": 2}))
    run = _single(tmp_path, objective, n_trials=1, slots=1, settings=settings)
    outcome = run.run()
    assert outcome.status == "failed"
    trials = run.trials()
    # The original and two repeats, with the same parameters, each on a fresh worker.
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert [t.user_attrs.get(schema.RETRY_ATTR) for t in trials] == [None, 0, 1]
    assert trials[0].params == trials[1].params == trials[2].params
    assert [_attr(t, schema.KIND_ATTR) for t in trials] == ["crash"] * 3
    workers = run.fleet.started
    assert [_attr(t, schema.PID_ATTR) for t in trials] == [w.pid for w in workers[:3]]
    assert len({w.pid for w in workers}) == len(workers)
    # A failed trial's worker is replaced at once, the last one's too (it ran nothing).
    assert [w.trials for w in workers] == [[0], [1], [2], []]


def test_a_repeat_that_succeeds_completes_the_failed_trial_s_parameters(tmp_path: Path) -> None:
    attempts = itertools.count()

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if next(attempts) == 0:
            raise ValueError("flaky")
        return x

    settings = RunSettings(n_trials=1, retry=RetryPolicy({"error": 1}))
    run = _single(tmp_path, objective, n_trials=1, slots=1, settings=settings)
    outcome = run.run()
    assert outcome.status == "completed", outcome.message
    failed, repeat = run.trials()
    assert (failed.state, _attr(failed, schema.REASON_ATTR)) == (
        TrialState.FAIL,
        "ValueError: flaky",
    )
    assert repeat.state == TrialState.COMPLETE
    assert repeat.user_attrs[schema.RETRY_ATTR] == 0 and repeat.params == failed.params
    assert repeat.value == failed.params["x"]
    # The failed trial's worker was replaced: a failure may leave a process broken.
    assert len(run.fleet.started) == 2


def test_workers_are_recycled_after_max_trials_per_worker(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0.0, 1.0)

    settings = RunSettings(n_trials=6, max_trials_per_worker=2)
    run = _single(tmp_path, objective, n_trials=6, slots=1, settings=settings)
    assert run.run().status == "completed"
    # The third worker's replacement ran nothing: the budget was reached.
    workers = run.fleet.started
    assert [w.trials for w in workers] == [[0, 1], [2, 3], [4, 5], []]
    assert all(w.process.returncode == 0 for w in workers[:3])  # each left when asked
    pids = [_attr(t, schema.PID_ATTR) for t in run.trials()]
    assert pids == [w.pid for w in workers[:3] for _ in range(2)]


# ----- fair share ----------------------------------------------------------------------------


def test_a_campaign_shares_the_slots_by_weight(tmp_path: Path) -> None:
    """Weights 2:1 on six slots: 4:2 whenever every slot is busy. Each wave of six trials runs
    together (a barrier), so the trials' starts fall into waves of six, in order."""
    wave = _together(6)
    started: list[str] = []
    lock = threading.Lock()

    def objective_of(name: str) -> Objective:
        def objective(trial: optuna.Trial) -> float:
            with lock:
                started.append(name)
            wave.wait()
            return trial.suggest_float("x", 0.0, 1.0)

        return objective

    studies = [Study("a", objective_of("a"), 12, weight=2.0), Study("b", objective_of("b"), 12)]
    run = _controller(tmp_path, studies, slots=6, settings=RunSettings())
    outcome = run.run()
    assert outcome.status == "completed", outcome.message
    waves = [Counter(started[i : i + 6]) for i in range(0, len(started), 6)]
    # Once "a" has started its 12 trials, "b" takes every slot.
    assert waves == [Counter(a=4, b=2)] * 3 + [Counter(b=6)]
    for name in ("a", "b"):
        trials = run.trials(name)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 12
    assert outcome.counts["complete"] == 24


@pytest.mark.parametrize("sequential", [False, True], ids=["parallel", "sequential"])
def test_a_study_whose_objective_cannot_load_stops_alone(tmp_path: Path, sequential: bool) -> None:
    """The fake workers hold no objective for "broken": each load of it fails. In a sequential
    run it is the second stage, loaded once the first is done; the third runs all the same."""

    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0.0, 1.0)

    studies = [
        Study("fine", objective, 2, stage=0),
        Study("broken", objective, 2, stage=1),
        Study("after", objective, 2, stage=2),
    ]
    run = _controller(tmp_path, studies, slots=2, settings=RunSettings(), sequential=sequential)
    run.fleet.objectives.pop("broken")
    outcome = run.run()
    assert (outcome.status, outcome.message) == (
        "failed",
        "the objective of broken could not be loaded; see the run log",
    )
    assert any(m.startswith("study broken stopped: its objective") for m in run.recorder.messages)
    for name in ("fine", "after"):
        assert [t.state for t in run.trials(name)] == [TrialState.COMPLETE] * 2
    assert run.trials("broken") == []


# ----- stopping ------------------------------------------------------------------------------


def test_a_hard_stop_ends_running_trials_as_interrupted(tmp_path: Path) -> None:
    run: Run
    # Once both trials run, the stop is asked, as a second Ctrl+C does.
    both = _together(2, then=lambda: run.controller.request_stop(hard=True))

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        both.wait()
        wait_until_killed()
        return 0.0

    run = _single(tmp_path, objective, n_trials=10, slots=2)
    outcome = run.run()
    assert outcome.status == "stopped"
    # The trials prepared for the slots' next turn stay enqueued, for the next run.
    ran = [t for t in run.trials() if t.state != TrialState.WAITING]
    assert [t.state for t in ran] == [TrialState.FAIL] * 2
    for trial in ran:
        assert _attr(trial, schema.KIND_ATTR) == "interrupted"
        assert _attr(trial, schema.REASON_ATTR) == "interrupted: stopped by the user"
    assert "stopping now: terminating running trials; the next run repeats them" in (
        run.recorder.messages
    )
    # Their workers got SIGTERM, the signal a trial's processes get first.
    assert sorted(w.process.returncode or 0 for w in run.fleet.started) == [-15, -15]
    assert all(_states(view)[-1] == "stopped" for view in run.slots.values())


def test_a_soft_stop_lets_running_trials_finish_and_starts_no_more(tmp_path: Path) -> None:
    run: Run
    # Once both trials run, the stop is asked, as a first Ctrl+C does.
    both = _together(2, then=lambda: run.controller.request_stop())

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        both.wait()
        return x

    run = _single(tmp_path, objective, n_trials=10, slots=2)
    outcome = run.run()
    assert (outcome.status, outcome.message) == ("stopped", "stopped before the budget was reached")
    ran = [t for t in run.trials() if t.state != TrialState.WAITING]
    assert [t.state for t in ran] == [TrialState.COMPLETE] * 2
    assert sum(len(w.trials) for w in run.fleet.started) == 2


def test_a_trial_past_its_time_limit_ends_as_a_timeout(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        wait_until_killed()
        return 0.0

    settings = RunSettings(n_trials=1, trial_timeout=0.05)
    run = _single(tmp_path, objective, n_trials=1, slots=1, settings=settings)
    run.run()
    (trial,) = run.trials()
    assert trial.state == TrialState.FAIL
    assert _attr(trial, schema.KIND_ATTR) == "timeout"
    assert _attr(trial, schema.REASON_ATTR) == "timeout: ran past the per-trial limit of 0.05s"
