"""TPE's sampler processes (hyperfleet.controller.sampler_pool): they sample ahead, the trials use
their values once each, the storage holds what the objectives suggested, and a run whose
processes die, or that has none, completes as without them."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import psutil
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.controller import sampler_pool
from hyperfleet.controller.sampler_pool import SamplerPool
from support.searches import optimize_on_cpu_slots

OBJECTIVES = Path(__file__).parent / "objectives"
N_TRIALS = 40
SPACE = {"x": FloatDistribution(-10.0, 10.0), "n": IntDistribution(0, 10)}


@pytest.fixture
def objectives(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))  # workers import it by name
    return importlib.import_module("pool_objective")


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The keys of the sets the controller took from its pools."""
    keys: list[tuple[int, int]] = []
    take = SamplerPool.take

    def noting(pool: SamplerPool, space: Any, slots: int) -> Any:
        chosen = take(pool, space, slots)
        if chosen is not None:
            keys.append(chosen.key)
        return chosen

    monkeypatch.setattr(sampler_pool.SamplerPool, "take", noting)
    return keys


def search(
    objective: Any, tmp: Path, slots: int = 2, processes: int | None = 1, **kwargs: Any
) -> tuple[list[FrozenTrial], Path]:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5, n_startup_trials=5))
    run_dir = tmp / "run"
    optimize_on_cpu_slots(
        study, objective, N_TRIALS, slots, run_dir, sampling_processes=processes, **kwargs
    )
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(N_TRIALS))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    for trial in trials:  # the storage holds what the objective suggested, nothing else
        assert trial.params == trial.user_attrs["seen"]
    return trials, run_dir


def sampler_logs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "workers").glob("sampler-*.log"))


def test_the_pools_values_are_sent_with_the_trials_and_used_once(
    objectives: ModuleType, taken: list[tuple[int, int]], tmp_path: Path
) -> None:
    trials, run_dir = search(objectives.fixed_space, tmp_path)

    assert len(sampler_logs(run_dir)) == 1
    sent = [t.user_attrs["sent"] for t in trials]
    # TPE sends nothing without the pool: every value sent with a trial came from a set.
    with_values = [s for s in sent if s]
    assert all(s == ["n", "x"] for s in with_values), sent
    # The pool starts with the run and knows the space after the first complete trial.
    assert len(taken) == len(with_values) >= N_TRIALS // 4, (len(taken), sent)
    assert len(set(taken)) == len(taken)  # no set used twice
    xs = [t.params["x"] for t in trials]
    assert len(set(xs)) == N_TRIALS  # each trial its own sample
    # The define-by-run parameter outside the space was a call, and is stored.
    assert all("extra" in t.params for t in trials if t.number % 3 == 0)
    # What TPE writes on a new trial (its relative sample) is there as in a plain ask.
    late = [t for t in trials[10:] if t.user_attrs["sent"]]
    assert late and all("tpe:relative_params:0" in t.system_attrs for t in late)


def signal_the_sampler_processes_at_trial_15(
    sig: int,
) -> Callable[[optuna.Study, FrozenTrial], None]:
    """A callback (it runs in the controller, this process) that sends ``sig`` to the pool's
    processes at trial 15's end."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.number != 15:
            return
        for child in psutil.Process().children():
            if "hyperfleet.sampling.replica" in " ".join(child.cmdline()):
                child.send_signal(sig)

    return callback


# The pool's processes die at trial 15's end.
kill_the_sampler_processes = signal_the_sampler_processes_at_trial_15(signal.SIGKILL)
# They stop (SIGSTOP: alive, delivering nothing, as a process that hangs); the run's end kills
# them.
stop_the_sampler_processes = signal_the_sampler_processes_at_trial_15(signal.SIGSTOP)


def test_a_killed_sampler_process_costs_only_speed(
    objectives: ModuleType, taken: list[tuple[int, int]], tmp_path: Path
) -> None:
    trials, run_dir = search(
        objectives.fixed_space, tmp_path, callbacks=[kill_the_sampler_processes]
    )

    assert taken, "the pool was used before it died"
    assert len(set(taken)) == len(taken)
    # The last trials were sampled by the controller: TPE sends nothing then.
    assert all(not t.user_attrs["sent"] for t in trials[-10:])
    log = (run_dir / "run.log").read_text()
    assert log.count("sampler processes died") == 1, log


def test_a_hung_sampler_process_costs_a_waits_time_and_no_more(
    objectives: ModuleType, taken: list[tuple[int, int]], tmp_path: Path
) -> None:
    started = time.monotonic()
    slots = sampler_pool.WAIT_FROM_SLOTS  # enough of them for slots to wait for sets
    trials, _ = search(
        objectives.fixed_space, tmp_path, slots=slots, callbacks=[stop_the_sampler_processes]
    )

    assert taken, "the pool was used before it hung"
    assert len(set(taken)) == len(taken)
    # The slots waited for its next sets once, a second at most; then the controller sampled.
    assert all(not t.user_attrs["sent"] for t in trials[-10:])
    hung = [t for t in trials if t.number > 15]
    starts = [t.datetime_start for t in hung if t.datetime_start is not None]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert max(gaps) < 1.0 + sampler_pool.WAIT_SECONDS, gaps
    assert sum(gap > sampler_pool.WAIT_SECONDS / 2 for gap in gaps) <= 1, gaps  # waited once
    assert time.monotonic() - started < 60


def test_a_run_with_the_pool_off_samples_on_the_controller(
    objectives: ModuleType, taken: list[tuple[int, int]], tmp_path: Path
) -> None:
    trials, run_dir = search(objectives.fixed_space, tmp_path, processes=0)

    assert sampler_logs(run_dir) == []
    assert taken == []
    assert all(not t.user_attrs["sent"] for t in trials)


def test_a_seeded_single_slot_run_starts_no_pool_and_gives_optunas_trials(
    objectives: ModuleType, taken: list[tuple[int, int]], tmp_path: Path
) -> None:
    trials, run_dir = search(objectives.fixed_space, tmp_path, slots=1, processes=2)

    assert sampler_logs(run_dir) == []
    assert taken == []
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5, n_startup_trials=5))
    plain.optimize(objectives.fixed_space, n_trials=N_TRIALS)
    assert [t.params for t in trials] == [t.params for t in plain.trials]


# A run of this many slots has one process keep two sets waiting at the controller.
TWO_SETS_SLOTS = 2 * sampler_pool.SLOTS_PER_SET


def wait_for_set(pool: SamplerPool, space: Any) -> sampler_pool.SuggestionSet:
    deadline = time.monotonic() + 60
    while (chosen := pool.take(space, TWO_SETS_SLOTS)) is None:
        assert time.monotonic() < deadline, "no set in a minute"
        time.sleep(0.02)
    return chosen


def wait_until_queued(pool: SamplerPool, count: int) -> None:
    """Until ``count`` sets wait at the controller (the queue of a run of ``TWO_SETS_SLOTS``
    holds 2, less the sets taken and not yet started)."""
    deadline = time.monotonic() + 30
    while len(pool._ready) < count:
        assert time.monotonic() < deadline, "the process did not fill its queue"
        time.sleep(0.02)


@contextlib.contextmanager
def running_pool(
    study: optuna.Study, tmp: Path, sampler: Any = None, wake: Any = lambda: None
) -> Iterator[SamplerPool]:
    """A pool of one sampler process for ``study``, hung up and reaped when the test ends."""
    pool = SamplerPool(study, sampler or study.sampler, 1, tmp, wake)
    try:
        yield pool
    finally:
        pool.hang_up()
        pool.reap(time.monotonic() + 5)


def finished_study(n: int) -> optuna.Study:
    # Independent TPE: no relative sample, the set's values are all for the space given.
    sampler = optuna.samplers.TPESampler(seed=1, multivariate=False)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", -10, 10) ** 2 + t.suggest_int("n", 0, 10), n)
    return study


def test_a_set_of_an_older_space_is_dropped(tmp_path: Path) -> None:
    study = finished_study(20)
    with running_pool(study, tmp_path) as pool:
        first = wait_for_set(pool, SPACE)
        assert set(first.others) == {"x", "n"} and first.relative.params == {}
        wait_until_queued(pool, 1)  # a set for this space waits at the controller
        narrower = {"x": SPACE["x"]}
        second = wait_for_set(pool, narrower)
        assert second.version == first.version + 1
        assert set(second.others) == {"x"}
        assert second.key != first.key


def test_a_set_sampled_before_tpes_startup_trials_ended_is_not_used_after(
    tmp_path: Path,
) -> None:
    study = finished_study(3)
    sampler = optuna.samplers.TPESampler(n_startup_trials=5, multivariate=False)
    with running_pool(study, tmp_path, sampler) as pool:
        early = wait_for_set(pool, SPACE)
        assert early.known == 3  # a random draw: TPE has not started modelling
        wait_until_queued(pool, 1)  # a set sampled from 3 trials waits at the controller
        for number in (3, 4):
            values = {"x": 1.0 + number, "n": number}
            trial = optuna.trial.create_trial(params=values, distributions=SPACE, value=1.0)
            trial.number = number
            pool.ended(trial)
        late = wait_for_set(pool, SPACE)
        assert late.known == 5


def test_a_dead_process_is_said_once_and_gives_no_more_sets(tmp_path: Path) -> None:
    study = finished_study(12)
    with running_pool(study, tmp_path) as pool:
        wait_for_set(pool, SPACE)
        pool._links[0].process.kill()
        deadline = time.monotonic() + 10
        while pool.alive:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert pool.newly_dead() == 1
        assert pool.newly_dead() == 0


def test_slots_wait_for_a_set_only_while_sets_come_and_one_that_comes_wakes_the_loop(
    tmp_path: Path,
) -> None:
    study = finished_study(12)
    woken = threading.Event()
    with running_pool(study, tmp_path, wake=woken.set) as pool:
        slots = sampler_pool.WAIT_FROM_SLOTS
        assert not pool.worth_waiting(SPACE, slots)  # nothing came yet: the controller samples
        taken = [wait_for_set(pool, SPACE)]
        assert pool.worth_waiting(SPACE, slots)
        assert not pool.worth_waiting(None, slots)  # no known space: no set will come
        pool.cores = 2  # the process and the controller each have a core
        assert not pool.worth_waiting(SPACE, slots - 1)  # few slots: the controller has time
        pool.cores = 1  # its sample would take the process's core: slots wait on few too
        assert pool.worth_waiting(SPACE, slots - 1)
        pool.cores = 2
        wait_until_queued(pool, 1)  # a set waits at the controller
        while (more := pool.take(SPACE, TWO_SETS_SLOTS)) is not None:
            taken.append(more)
        assert not woken.is_set()  # no slot waited: the loop was left alone
        pool.want(True)
        for number, chosen in enumerate(taken, start=12):  # the sets were used: sample more
            pool.started(number, chosen.key, chosen.others)
        assert woken.wait(30), "a set that came in while slots waited did not wake the loop"
        assert pool.ready(SPACE, TWO_SETS_SLOTS)
        wait_until_queued(pool, 2)  # the queue full: no set comes in after the wait ran out
        pool.want(False)
        woken.clear()
        pool.want(True)  # sets came in while no slot waited: the loop looks at them at once
        assert woken.is_set()
        pool.wait_ran_out()
        assert not pool.worth_waiting(SPACE, slots)  # until the next set comes in
