"""Suggestions sent with a trial (hyperfleet.controller.ahead): the objective gets them without a
round trip, and the storage holds exactly what the objective suggested, as with plain Optuna."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from support.searches import optimize_on_cpu_slots

OBJECTIVES = Path(__file__).parent / "objectives"
N_TRIALS = 12


@pytest.fixture
def objectives(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))  # workers import it by name
    return importlib.import_module("ahead_objective")


def run(objective: object, sampler: optuna.samplers.BaseSampler, slots: int, tmp: Path) -> list:
    study = optuna.create_study(sampler=sampler)
    optimize_on_cpu_slots(study, objective, N_TRIALS, slots, tmp / "run")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    return trials


def test_a_fixed_space_is_sent_and_stored_as_suggested(
    objectives: ModuleType, tmp_path: Path
) -> None:
    trials = run(objectives.fixed_space, optuna.samplers.RandomSampler(seed=1), 2, tmp_path)

    for trial in trials:
        assert trial.params == trial.user_attrs["seen"]
        assert trial.user_attrs["same_again"] is True
        assert trial.distributions == {
            "x": FloatDistribution(-5.0, 5.0),
            "n": IntDistribution(1, 8, log=True),
            "kind": CategoricalDistribution(["a", "b", None]),
        }
    # The two first trials start before any has finished; every later one got all three.
    sent = [t.user_attrs["sent"] for t in trials]
    assert sum(s == ["kind", "n", "x"] for s in sent) >= N_TRIALS - 2, sent
    values = {t.params["x"] for t in trials}
    assert len(values) == N_TRIALS  # each trial its own sample, not one value sent twice


def test_a_conditional_space_stores_only_what_each_trial_suggested(
    objectives: ModuleType, tmp_path: Path
) -> None:
    trials = run(objectives.conditional_space, optuna.samplers.RandomSampler(seed=3), 2, tmp_path)

    for trial in trials:
        # A value sent and not used (the other branch's, or "shared" from the other range) is
        # not stored: each trial holds exactly what it suggested, with its own distributions.
        branch_param = "left_only" if trial.params["branch"] == "left" else "right_only"
        assert set(trial.params) == {"branch", branch_param, "shared"}
        assert trial.distributions["shared"] == FloatDistribution(0.0, 1.0 + trial.number % 2)
    assert {t.params["branch"] for t in trials} == {"left", "right"}
    assert any("branch" in t.user_attrs["sent"] for t in trials)
    # Once trials of both ranges of "shared" have finished, it is no longer sent.
    both = max(
        min(t.datetime_complete for t in trials if t.number % 2 == parity and t.datetime_complete)
        for parity in (0, 1)
    )
    later = [t for t in trials if t.datetime_start and t.datetime_start > both]
    assert later and all("shared" not in t.user_attrs["sent"] for t in later)


def test_a_name_answered_by_the_controller_keeps_its_value(
    objectives: ModuleType, tmp_path: Path
) -> None:
    trials = run(objectives.asked_again, optuna.samplers.RandomSampler(seed=5), 2, tmp_path)

    # Sent once a trial had completed, and no longer once one with the other range had.
    sent_x = [t for t in trials if t.user_attrs["sent"] == ["x"]]
    assert sent_x
    for trial in sent_x:
        assert trial.user_attrs["again"] == trial.user_attrs["first"] == trial.params["x"]
        assert trial.distributions["x"] == FloatDistribution(0.0, 1.0)
    for trial in trials:
        assert trial.params["x"] == trial.user_attrs["first"] == trial.value


def test_a_sampler_that_takes_time_per_parameter_gets_calls(
    objectives: ModuleType, tmp_path: Path
) -> None:
    # TPE samples in milliseconds: sampled when trials are sent, a round of them would wait for
    # all their samples. Its suggestions stay calls, answered when the objective asks.
    sampler = optuna.samplers.TPESampler(n_startup_trials=4, constant_liar=True)
    trials = run(objectives.fixed_space, sampler, 2, tmp_path)

    assert all(t.user_attrs["sent"] == [] for t in trials)
    assert all(t.params == t.user_attrs["seen"] for t in trials)


def test_one_slot_sends_nothing(objectives: ModuleType, tmp_path: Path) -> None:
    # With one slot a seeded sampler must give study.optimize's trials (test_trial_parity):
    # a value sampled ahead and not used would shift its draws.
    trials = run(objectives.fixed_space, optuna.samplers.RandomSampler(seed=1), 1, tmp_path)

    assert all(t.user_attrs["sent"] == [] for t in trials)
