"""Show any Optuna sampler the trials still running, as if they had finished.

With several slots, a free slot asks for its next trial while the others still run. A
sampler that looks only at finished trials (a model-based sampler of a user's own, or TPE
without its constant liar) then suggests again what is already being evaluated. Optuna's own
samplers each have their answer (TPE its constant liar, GP its acquisition over the running
points, QMC and CMA-ES sample so that parallel trials differ); :class:`PendingTrialsSampler`
gives one to any other: it hands the sampler a view of the study in which every other running
trial that has its parameters is COMPLETE, with a value chosen by a liar strategy:

- ``worst``: the worst value finished so far (a constant liar that pushes away from running
  points);
- ``mean``: the mean of the finished values;
- ``best``: the best value so far (pulls towards running points: more exploitation).

The view goes through Optuna's public sampler API only (the sampler is called with a study
whose trial lists include the stand-ins), so it works with any sampler. With one slot, no other
trial is ever running and the wrapped sampler behaves exactly as it would on its own.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.errors import ConfigError
from hyperfleet.sampling.delegating import DelegatingSampler

# The values a running trial is shown with, from the finished trials and the directions.
Liar = Callable[[Sequence[FrozenTrial], Sequence[StudyDirection]], list[float]]


def _worst(done: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[float]:
    return [_pick(d, [t.values[i] for t in done], worst=True) for i, d in enumerate(directions)]


def _best(done: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[float]:
    return [_pick(d, [t.values[i] for t in done], worst=False) for i, d in enumerate(directions)]


def _mean(done: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[float]:
    return [math.fsum(t.values[i] for t in done) / len(done) for i in range(len(directions))]


def _pick(direction: StudyDirection, values: list[float], worst: bool) -> float:
    high = (direction == StudyDirection.MAXIMIZE) != worst
    return max(values) if high else min(values)


LIARS: dict[str, Liar] = {"worst": _worst, "mean": _mean, "best": _best}


class PendingTrialsSampler(DelegatingSampler):
    """``base`` sees every other running trial as finished, valued by the ``liar`` strategy
    (one of :data:`LIARS`).

    The wrapped sampler should not account for running trials itself (TPE: pass
    ``constant_liar=False``), or it would count them twice. Running trials without parameters
    yet (a worker that has not suggested them) stay RUNNING in the view, and nothing is faked
    before the first trial has finished. Startup (random) phases that count finished trials
    count the stand-ins too, so they end after that many trials were started rather than
    finished; with many slots and few results, that hands the sampler many stand-ins of one
    value (``bench/parallel_quality.py`` measures TPE worse for it at 32 slots).
    """

    def __init__(self, base: BaseSampler, liar: str = "worst") -> None:
        if liar not in LIARS:
            raise ConfigError(
                f"unknown liar strategy {liar!r} for running trials; choose one of "
                f"{', '.join(LIARS)}."
            )
        super().__init__(base)
        self.liar = liar

    def __str__(self) -> str:
        return f"PendingTrialsSampler({self.base}, liar={self.liar!r})"

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.base.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        view = self._view(study, trial)
        return self.base.sample_independent(view, trial, param_name, param_distribution)

    def _view(self, study: optuna.Study, current: FrozenTrial) -> optuna.Study:
        trials = study._get_trials(deepcopy=False, use_cache=False)
        presented = present_running(trials, current.number, study.directions, LIARS[self.liar])
        if presented is trials:
            return study
        return TrialsView(study, presented)


def present_running(
    trials: list[FrozenTrial],
    current: int,
    directions: Sequence[StudyDirection],
    liar: Liar,
) -> list[FrozenTrial]:
    """``trials`` with each running trial other than ``current`` that has parameters replaced
    by a COMPLETE stand-in valued by ``liar``; ``trials`` itself when there is nothing to show."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done or not any(_is_pending(t, current) for t in trials):
        return trials
    values = liar(done, directions)
    return [_stand_in(t, values) if _is_pending(t, current) else t for t in trials]


def _is_pending(trial: FrozenTrial, current: int) -> bool:
    return trial.state == TrialState.RUNNING and trial.number != current and bool(trial.params)


def _stand_in(trial: FrozenTrial, values: list[float]) -> FrozenTrial:
    return FrozenTrial(
        number=trial.number,
        state=TrialState.COMPLETE,
        value=None,
        values=values,
        datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_start,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=trial.user_attrs,
        # No system attributes: samplers that keep generations there (CMA-ES, NSGA-II) then
        # never count a guessed value as a result of their generation.
        system_attrs={},
        intermediate_values=trial.intermediate_values,
        trial_id=trial._trial_id,
    )


class TrialsView(optuna.Study):
    """The study as a sampler sees it: the same storage, directions and attributes (writes,
    such as a sampler's system attributes, go to the real trials), but trial lists that hold
    the trials given (here: with the stand-ins; a snapshot for controller/slow_samplers.py). Every
    way Optuna reads trials (``trials``, ``get_trials``, and the ``_get_trials`` samplers call)
    goes through ``_get_trials``."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        # Sharing the real study's state (no Study.__init__: it would open the study again).
        self.__dict__.update(study.__dict__)
        self._presented = trials

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = [t for t in self._presented if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials
