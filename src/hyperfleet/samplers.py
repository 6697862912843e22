"""Samplers and pruners by name, for the command line and campaign files."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from hyperfleet.errors import ConfigError

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
    """The sampler hyperfleet picks when none is named, for trials on ``slots`` slots: Optuna's
    TPE with constant liar, and as few random startup trials as a sequential search has.

    TPE samples at random until ``n_startup_trials`` trials have finished; with several slots,
    the first ``slots`` trials are asked before any has finished, so the random phase would
    grow by ``slots - 1`` trials (17 of 64 on 8 slots, 41 on 32). Counting the first wave in,
    it stays at Optuna's 10 (or the first wave, when that is larger). One slot gets Optuna's
    TPE exactly. ``bench/parallel_quality.py`` measured this against the alternatives
    (README, "Parallel trials and search quality")."""
    return optuna.samplers.TPESampler(
        seed=seed, constant_liar=True, n_startup_trials=max(1, 11 - slots)
    )


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
