"""Samplers and pruners by name, for the command line and campaign files."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from hyperfleet.errors import ConfigError
from hyperfleet.pending import PendingTrialsSampler

# Each factory takes the seed and the number of slots the study's trials run on.
SamplerFactory = Callable[[int | None, int], optuna.samplers.BaseSampler]
SAMPLERS: dict[str, SamplerFactory] = {
    "auto": lambda seed, slots: default_sampler(slots, seed),
    # Constant liar keeps parallel trials from piling onto the same point.
    "tpe": lambda seed, slots: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
    "random": lambda seed, slots: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed, slots: optuna.samplers.CmaEsSampler(seed=seed),
    "gp": lambda seed, slots: optuna.samplers.GPSampler(seed=seed),
    "nsga2": lambda seed, slots: optuna.samplers.NSGAIISampler(seed=seed),
    "qmc": lambda seed, slots: optuna.samplers.QMCSampler(seed=seed),
}

PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
    "percentile": lambda: optuna.pruners.PercentilePruner(25.0),
    "none": optuna.pruners.NopPruner,
}


def default_sampler(slots: int, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler hyperfleet picks when none is named, for trials on ``slots`` slots
    (``bench/parallel_quality.py`` measures the choice; the README shows the table).

    One slot: Optuna's TPE as it comes, so a sequential search is exactly Optuna's. More:
    TPE sees the running trials through :class:`PendingTrialsSampler`, each valued as the
    finished trial nearest to it would be, instead of TPE's own constant liar."""
    if slots <= 1:
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    tpe = optuna.samplers.TPESampler(seed=seed, constant_liar=False)
    return PendingTrialsSampler(tpe, "worst")


def sampler_factory(name: str) -> SamplerFactory:
    """The factory of sampler ``name``: called with the seed and the number of slots."""
    factory = SAMPLERS.get(name.lower())
    if factory is None:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return factory


def make_sampler(name: str, seed: int | None = None, slots: int = 1) -> optuna.samplers.BaseSampler:
    return sampler_factory(name)(seed, slots)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    factory = PRUNERS.get(name.lower())
    if factory is None:
        raise ConfigError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}.")
    return factory()
