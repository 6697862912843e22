"""Samplers and pruners by name, for the command line and campaign files."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from hyperfleet.errors import ConfigError

SAMPLERS: dict[str, Callable[[int | None], optuna.samplers.BaseSampler]] = {
    # Constant liar keeps parallel trials from piling onto the same point.
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),
}

PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
    "percentile": lambda: optuna.pruners.PercentilePruner(25.0),
    "none": optuna.pruners.NopPruner,
}


def make_sampler(name: str, seed: int | None = None) -> optuna.samplers.BaseSampler:
    factory = SAMPLERS.get(name.lower())
    if factory is None:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return factory(seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    factory = PRUNERS.get(name.lower())
    if factory is None:
        raise ConfigError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}.")
    return factory()
