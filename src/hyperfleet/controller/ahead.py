"""Suggestions sampled when a trial is sent, so that its objective gets them without a round trip.

A worker's ``trial.suggest_float("lr", ...)`` is otherwise a call to the controller and a wait for
its answer: a wake-up of both processes per parameter (several per trial), and at many slots a
wait behind every other slot's messages. Most objectives ask for the same parameters, from the
same ranges, in every trial. So when the controller sends a trial it also sends values for the
parameters that every complete trial of the study suggested with the same distribution, sampled
then by the study's sampler exactly as ``suggest`` would have. The worker answers a ``suggest``
from them when the name and the distribution are the ones sent; it tells
the controller, without waiting, which it used, and the controller records it in the storage
through the trial's own ``suggest`` (:class:`Answers` hands the value sent to Optuna), so the
storage, the sampler's view of running trials and every reader see what they always saw. Any
other ``suggest`` (a new name, another range, a name used again with another range) is a call
as before.

Only where trials already run side by side: with one slot, a seeded sampler gives the same
trials as ``study.optimize`` (a value sampled and then not used, in a conditional space, would
shift its random draws), so a run with one slot and no nodes sends none.

Only where sampling costs nothing on the way: the controller samples a trial's values when it
sends the trial, and the trials that a round of results frees are sent together, so a sampler
that takes milliseconds per parameter (TPE, with its constant liar) would make every slot of the
round wait for all of their samples (measured: a median turnaround of 158 ms against 23 ms at 16
slots). So values are sent for Optuna's random sampler, which draws each parameter on its own in
microseconds, and the relative sample of a trial whose sampler computed it off the loop's thread
already (Optuna's GP, see ``controller.slow_samplers``); every other sampler's suggestions are
calls as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.sampling.delegating import DelegatingSampler
from hyperfleet.sampling.pending import PendingTrialsSampler

Space = dict[str, BaseDistribution]
Ahead = dict[str, tuple[BaseDistribution, Any]]  # by parameter: its distribution and value
SEED_TRIALS = 10  # complete trials of an earlier run that give a resumed study its space


def narrowed(space: Space | None, distributions: Mapping[str, BaseDistribution]) -> Space:
    """The parameters of ``space`` that a complete trial with ``distributions`` also suggested
    with the same distribution (the first trial's, when there is no space yet). Only complete
    trials count: a pruned or failed one may have stopped before it suggested them all."""
    if space is None:
        return dict(distributions)
    return {name: d for name, d in space.items() if distributions.get(name) == d}


def space_of(trials: list[FrozenTrial]) -> Space | None:
    """The space shared by the last complete trials of ``trials`` (None: none complete)."""
    space: Space | None = None
    complete = [t for t in trials if t.state == TrialState.COMPLETE][-SEED_TRIALS:]
    for trial in complete:
        space = narrowed(space, trial.distributions)
    return space


def samples_cheaply(sampler: BaseSampler) -> bool:
    """Whether the sampler draws each parameter on its own, without looking at the trial's other
    parameters, in microseconds: Optuna's random sampler."""
    if isinstance(sampler, PendingTrialsSampler):
        return samples_cheaply(sampler.base)
    if isinstance(sampler, AutoSampler):
        return samples_cheaply(sampler.current)
    return type(sampler) is RandomSampler


def sample(
    study: optuna.Study,
    trial: optuna.Trial | None,
    stored: FrozenTrial,
    space: Space,
    relative: bool,
) -> Ahead:
    """Values for the new ``trial`` (``stored``: as the storage has it): its relative sample
    where that was computed already (``relative``), and for a random sampler the parameters of
    ``space``. A parameter the trial has fixed (an enqueued or a repeated trial) is left to its
    ``suggest``, which takes the fixed value."""
    fixed = stored.system_attrs.get("fixed_params")
    fixed = fixed if isinstance(fixed, dict) else {}  # what Optuna writes, or nothing
    ahead: Ahead = {}
    if relative and trial is not None:
        relative_space = trial.relative_search_space or {}
        for name, value in trial.relative_params.items():
            distribution = relative_space.get(name)
            if distribution is not None and name not in fixed and _takes(distribution, value):
                ahead[name] = (distribution, value)
    if not samples_cheaply(study.sampler):
        return ahead
    seen = _filtered(study, stored)
    for name, distribution in space.items():
        if name in ahead or name in fixed or distribution.single():
            continue
        value = study.sampler.sample_independent(seen, stored, name, distribution)
        ahead[name] = (distribution, value)
    return ahead


def _takes(distribution: BaseDistribution, value: Any) -> bool:
    """Whether Optuna's ``suggest`` would use this relative value (it samples anew otherwise)."""
    if distribution.single():
        return False
    contains = getattr(distribution, "_contains", None)
    return contains is None or bool(contains(distribution.to_internal_repr(value)))


def _filtered(study: optuna.Study, trial: FrozenTrial) -> optuna.Study:
    """The study as ``suggest`` shows it to the sampler: some pruners (Hyperband) show each
    trial only its bracket's trials. The function is Optuna's own, and private."""
    filter_study = getattr(optuna.pruners, "_filter_study", None)
    return study if filter_study is None else filter_study(study, trial)


class Answers(DelegatingSampler):
    """The study's sampler, except that it answers with the value sent ahead for a parameter
    whose distribution is the one sent: used while the controller records a suggestion that the
    worker already answered."""

    def __init__(self, base: BaseSampler, ahead: Ahead) -> None:
        super().__init__(base)
        self._ahead = ahead

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        sent = self._ahead.get(param_name)
        if sent is not None and sent[0] == param_distribution:
            return sent[1]
        return self.base.sample_independent(study, trial, param_name, param_distribution)
