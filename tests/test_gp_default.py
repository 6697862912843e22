"""The default sampler and slow suggestions: ``auto`` picks GP or TPE by its rules, a GP
suggestion prepared off the controller's thread is the one a direct ask gives, and a search
with GP as the default runs to its budget on CPU slots. Tests that build a GP skip without
torch."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import hyperfleet
from hyperfleet.controller.loop import Outcome
from hyperfleet.controller.slow_samplers import Suggestions, suggests_slowly
from hyperfleet.resources.inventory import Inventory
from hyperfleet.sampling.auto_sampler import GP_MAX_TRIALS, GP_MIN_TRIAL_SECONDS, AutoSampler

OBJECTIVES = Path(__file__).parent / "objectives"
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="GP needs torch")
SPACE = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(-1.0, 1.0)}


def study_with(
    sampler: optuna.samplers.BaseSampler,
    finished: int = 10,
    space: dict[str, optuna.distributions.BaseDistribution] | None = None,
    directions: tuple[str, ...] = ("minimize",),
    seconds: float = 60.0,
) -> optuna.Study:
    """``finished`` trials told on a grid of ``space`` (x and y floats by default), each of
    which lasted ``seconds``."""
    study = optuna.create_study(sampler=sampler, directions=list(directions))
    space = SPACE if space is None else space
    end = datetime.datetime.now()
    for i in range(finished):
        params = {name: _point(d, i) for name, d in space.items()}
        values = [float(i % 7)] * len(directions)
        trial = create_trial(params=params, distributions=space, values=values)
        trial.datetime_start = end - datetime.timedelta(seconds=seconds)
        trial.datetime_complete = end
        study.add_trial(trial)
    return study


def _point(distribution: optuna.distributions.BaseDistribution, i: int) -> object:
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[i % len(distribution.choices)]
    assert isinstance(distribution, FloatDistribution)
    return distribution.low + (distribution.high - distribution.low) * ((i * 0.37) % 1.0)


def choice_of(sampler: AutoSampler, study: optuna.Study) -> tuple[str | None, list[str]]:
    lines: list[str] = []
    sampler.on_choice = lines.append
    study.ask()
    return sampler.choice, lines


@needs_torch
def test_auto_picks_gp_for_one_objective_a_fixed_numeric_space_and_a_small_budget() -> None:
    sampler = AutoSampler(seed=0, n_trials=50)
    choice, lines = choice_of(sampler, study_with(sampler))
    assert choice == "gp" and suggests_slowly(sampler)
    assert len(lines) == 1 and lines[0].startswith("sampler GP") and "2 numeric" in lines[0]


@pytest.mark.parametrize(
    ("n_trials", "space", "directions", "reason"),
    [
        (None, SPACE, ("minimize",), "no trial budget"),
        (GP_MAX_TRIALS + 1, SPACE, ("minimize",), f"a budget of {GP_MAX_TRIALS + 1} trials"),
        (50, {"m": CategoricalDistribution(["a", "b"])}, ("minimize",), "categorical"),
        (50, SPACE, ("minimize", "maximize"), "2 objectives"),
    ],
)
def test_auto_stays_on_tpe_where_gp_does_not_apply(
    n_trials: int | None,
    space: dict[str, optuna.distributions.BaseDistribution],
    directions: tuple[str, ...],
    reason: str,
) -> None:
    sampler = AutoSampler(seed=0, n_trials=n_trials)
    choice, lines = choice_of(sampler, study_with(sampler, space=space, directions=directions))
    assert choice == "tpe" and not suggests_slowly(sampler)
    assert len(lines) == 1 and lines[0].startswith("sampler TPE") and reason in lines[0]
    assert isinstance(sampler.current, optuna.samplers.TPESampler)


def test_auto_stays_on_tpe_for_quick_trials() -> None:
    sampler = AutoSampler(seed=0, n_trials=50)
    choice, lines = choice_of(sampler, study_with(sampler, seconds=GP_MIN_TRIAL_SECONDS / 2))
    assert choice == "tpe" and "trials of 5.0 s (median)" in lines[0]


def test_auto_stays_on_tpe_when_few_trials_are_left_for_many_running() -> None:
    sampler = AutoSampler(seed=0, n_trials=50)
    study = study_with(sampler)
    for _ in range(30):  # 30 slots busy: 9 trials left, under two rounds of them
        study.add_trial(create_trial(state=TrialState.RUNNING, params={}, distributions={}))
    choice, lines = choice_of(sampler, study)
    assert choice == "tpe" and "9 trials left for 31 running" in lines[0]


def test_auto_stays_on_tpe_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    sampler = AutoSampler(seed=0, n_trials=50)
    choice, lines = choice_of(sampler, study_with(sampler))
    assert choice == "tpe" and "torch is not installed" in lines[0]


def test_auto_waits_for_the_space_before_choosing() -> None:
    sampler = AutoSampler(seed=0, n_trials=50)
    choice, lines = choice_of(sampler, study_with(sampler, finished=9))
    assert choice is None and lines == []
    assert isinstance(sampler.current, optuna.samplers.TPESampler)  # its random start


@needs_torch
def test_auto_leaves_gp_for_good_when_a_parameter_appears() -> None:
    sampler = AutoSampler(seed=0, n_trials=50)
    study = study_with(sampler)
    assert choice_of(sampler, study)[0] == "gp"
    wider = {**SPACE, "z": FloatDistribution(0.0, 1.0)}
    params = {"x": 0.5, "y": 0.0, "z": 0.1}
    study.add_trial(create_trial(params=params, distributions=wider, value=1.0))
    choice, lines = choice_of(sampler, study)
    assert choice == "tpe" and "changes between trials" in lines[0]


@needs_torch
@pytest.mark.parametrize("running", [0, 2])
def test_a_suggestion_prepared_off_thread_is_the_one_a_direct_ask_gives(running: int) -> None:
    """Two studies with the same trials (``running`` of them still running with their
    parameters) and a GP seeded alike: one asks directly, the other through Suggestions."""
    direct, prepared = (study_with(optuna.samplers.GPSampler(seed=3)) for _ in range(2))
    for study in (direct, prepared):
        for i in range(running):
            study.enqueue_trial({"x": 0.1 * (i + 1), "y": -0.2 * i})
            trial = study.ask()
            trial.suggest_float("x", 0.0, 1.0)
            trial.suggest_float("y", -1.0, 1.0)

    expected = direct.ask()
    ready = threading.Event()
    suggestions = Suggestions(ready.set)
    suggestions.start("s", prepared)
    assert ready.wait(timeout=60)
    result = suggestions.take("s")
    assert result is not None and result.error is None
    assert len(prepared.trials) == 10 + running  # the thread created no trial
    trial = result.ask(prepared)

    assert trial.relative_params == expected.relative_params != {}
    assert trial.suggest_float("x", 0.0, 1.0) == expected.suggest_float("x", 0.0, 1.0)
    # What GP stores on the trial, so that later suggestions see where it will run.
    stored = prepared._storage.get_trial(trial._trial_id).system_attrs
    assert stored == direct._storage.get_trial(expected._trial_id).system_attrs != {}


@pytest.fixture
def search(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("search_objectives")


def on_two_cpu_slots(study: optuna.Study, objective: Any, tmp_path: Path, **budget: Any) -> Outcome:
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return hyperfleet.optimize(
        study,
        objective,
        run_dir=tmp_path,
        display="quiet",
        report=False,
        inventory=Inventory(gpus=(), cores=cores),
        cpu_slots=2,
        **budget,
    )


@needs_torch
def test_a_search_with_gp_as_the_default_runs_to_its_budget(
    search: ModuleType, tmp_path: Path
) -> None:
    n_trials = 18  # 10 to finish before choosing, and two rounds of the 2 slots after that
    # Its trials are quick: GP is chosen for them only with the duration rule set aside.
    sampler = AutoSampler(seed=0, n_trials=n_trials, min_trial_seconds=0.0)
    study = optuna.create_study(sampler=sampler)
    outcome = on_two_cpu_slots(study, search.quick, tmp_path, n_trials=n_trials)

    assert outcome.status == "completed"
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE] * n_trials
    log = (tmp_path / "run.log").read_text()
    assert log.count("sampler GP (Optuna's GPSampler)") == 1


@needs_torch
def test_a_gp_search_stopped_by_its_timeout_leaves_no_trial_running(
    search: ModuleType, tmp_path: Path
) -> None:
    """GP from the first trial, so every trial is prepared off the loop's thread; the timeout
    comes while one is (most likely) being prepared: it is dropped, nothing stays RUNNING."""
    study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=0))
    outcome = on_two_cpu_slots(study, search.quick, tmp_path, timeout="4s")

    assert outcome.status == "completed"
    states = {t.state for t in study.get_trials()}
    assert states == {TrialState.COMPLETE}
