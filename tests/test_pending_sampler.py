"""PendingTrialsSampler: any sampler sees the other running trials as finished, valued by the
liar strategy, single- and multi-objective; with nothing running it changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
import pytest
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.errors import ConfigError
from hyperfleet.sampling.pending import PendingTrialsSampler


class RecordingSampler(optuna.samplers.RandomSampler):
    """Random sampling that records the trials the study showed it at each suggestion."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[list[FrozenTrial]] = []

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        self.seen.append(study.get_trials(deepcopy=False))
        return super().sample_independent(study, trial, param_name, param_distribution)


def study_with_running_trials(
    sampler: optuna.samplers.BaseSampler,
    finished: Sequence[tuple[float, Sequence[float]]],
    running: Sequence[float],
    directions: Sequence[str] = ("minimize",),
) -> optuna.Study:
    """Trials with ``x`` and their values told, then trials at ``running`` x still running."""
    study = optuna.create_study(sampler=sampler, directions=list(directions))
    space = {"x": optuna.distributions.FloatDistribution(0.0, 10.0)}
    for x, values in finished:
        study.add_trial(
            optuna.trial.create_trial(params={"x": x}, distributions=space, values=values)
        )
    for x in running:
        study.enqueue_trial({"x": x})
        study.ask().suggest_float("x", 0.0, 10.0)
    return study


def values_seen(recorder: RecordingSampler) -> dict[int, tuple[TrialState, list[float] | None]]:
    return {t.number: (t.state, t.values) for t in recorder.seen[-1]}


@pytest.mark.parametrize(("liar", "expected"), [("worst", 3.0), ("mean", 2.0), ("best", 1.0)])
def test_running_trials_are_shown_finished_with_the_liar_value(liar: str, expected: float) -> None:
    recorder = RecordingSampler()
    finished = [(1.0, [1.0]), (5.0, [2.0]), (9.0, [3.0])]
    study = study_with_running_trials(PendingTrialsSampler(recorder, liar), finished, [1.2, 8.7])

    study.ask().suggest_float("x", 0.0, 10.0)

    seen = values_seen(recorder)
    assert seen[3] == seen[4] == (TrialState.COMPLETE, [expected])
    assert [seen[n] for n in range(3)] == [(TrialState.COMPLETE, v) for _, v in finished]
    assert seen[5] == (TrialState.RUNNING, None)  # the trial being sampled stays what it is
    assert [t.state for t in study.get_trials()][3:5] == [TrialState.RUNNING] * 2


def test_multi_objective_liars_take_each_objective_in_its_own_direction() -> None:
    recorder = RecordingSampler()
    finished = [(1.0, [1.0, 5.0]), (9.0, [3.0, 2.0])]
    directions = ("minimize", "maximize")
    for liar, expected in [("worst", [3.0, 2.0]), ("best", [1.0, 5.0]), ("mean", [2.0, 3.5])]:
        sampler = PendingTrialsSampler(recorder, liar)
        study = study_with_running_trials(sampler, finished, [4.0], directions)
        study.ask().suggest_float("x", 0.0, 10.0)
        assert values_seen(recorder)[2] == (TrialState.COMPLETE, expected), liar


@pytest.mark.parametrize(
    "base",
    [
        lambda: optuna.samplers.TPESampler(seed=1, n_startup_trials=3, constant_liar=False),
        lambda: optuna.samplers.NSGAIISampler(seed=1, population_size=4),
    ],
    ids=["tpe", "nsga2"],
)
def test_multi_objective_searches_run_with_trials_running(base: Any) -> None:
    study = optuna.create_study(
        sampler=PendingTrialsSampler(base(), "worst"), directions=["minimize", "minimize"]
    )
    running = [study.ask() for _ in range(4)]
    for _ in range(20):  # always four running: tell the oldest, ask a new one
        trial = running.pop(0)
        x = trial.suggest_float("x", 0.0, 1.0)
        y = trial.suggest_int("y", 0, 4)
        study.tell(trial, [x + y, (1 - x) ** 2 + y])
        running.append(study.ask())

    assert len(study.get_trials(states=[TrialState.COMPLETE])) == 20
    assert study.best_trials


def test_a_sequential_search_is_the_wrapped_samplers_own() -> None:
    def search(sampler: optuna.samplers.BaseSampler) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: (t.suggest_float("x", -3, 3) - 1) ** 2, n_trials=20)
        return [t.params for t in study.trials]

    def tpe() -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=3, n_startup_trials=5)

    assert search(PendingTrialsSampler(tpe(), "worst")) == search(tpe())


def test_running_trials_without_parameters_and_searches_without_results_stay_as_they_are() -> None:
    recorder = RecordingSampler()
    study = study_with_running_trials(PendingTrialsSampler(recorder), [], [2.0])
    study.ask()  # running, nothing suggested yet
    study.ask().suggest_float("x", 0.0, 10.0)
    assert [t.state for t in recorder.seen[-1]] == [TrialState.RUNNING] * 3

    study.tell(0, 4.0)
    study.ask().suggest_float("x", 0.0, 10.0)
    assert [t.state for t in recorder.seen[-1]] == [
        TrialState.COMPLETE,
        TrialState.RUNNING,  # no parameters yet: nothing to show the sampler
        TrialState.COMPLETE,  # its x suggested: shown finished, valued by the liar
        TrialState.RUNNING,  # the trial being sampled
    ]


def test_an_unknown_liar_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="choose one of worst, mean, best"):
        PendingTrialsSampler(optuna.samplers.RandomSampler(), "median")
