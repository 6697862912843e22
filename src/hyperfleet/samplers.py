"""Samplers and pruners by name, for the command line and campaign files."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from hyperfleet.auto_sampler import AutoSampler
from hyperfleet.errors import ConfigError

# Each factory takes the seed and the study's trial budget (None: none).
SAMPLERS: dict[str, Callable[[int | None, int | None], optuna.samplers.BaseSampler]] = {
    # The default: GP where it applies, else TPE with constant liar (see auto_sampler).
    "auto": lambda seed, n_trials: AutoSampler(seed=seed, n_trials=n_trials),
    # Constant liar keeps parallel trials from piling onto the same point.
    "tpe": lambda seed, _: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
    "random": lambda seed, _: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed, _: optuna.samplers.CmaEsSampler(seed=seed),
    "gp": lambda seed, _: optuna.samplers.GPSampler(seed=seed),
    "nsga2": lambda seed, _: optuna.samplers.NSGAIISampler(seed=seed),
    "qmc": lambda seed, _: optuna.samplers.QMCSampler(seed=seed),
}
DEFAULT_SAMPLER = "auto"

PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
    "percentile": lambda: optuna.pruners.PercentilePruner(25.0),
    "none": optuna.pruners.NopPruner,
}


def make_sampler(
    name: str, seed: int | None = None, n_trials: int | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler called ``name``, for a study whose trial budget is ``n_trials``."""
    factory = SAMPLERS.get(name.lower())
    if factory is None:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return factory(seed, n_trials)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    factory = PRUNERS.get(name.lower())
    if factory is None:
        raise ConfigError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}.")
    return factory()
