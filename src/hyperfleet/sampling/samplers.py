"""Samplers and pruners by name, for the command line and campaign files."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from hyperfleet.errors import ConfigError
from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.sampling.delegating import DelegatingSampler

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
# The samplers seed numpy's legacy generator, which takes 0 to 2**32 - 1 and nothing else.
MAX_SEED = 2**32 - 1

PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive-halving": optuna.pruners.SuccessiveHalvingPruner,
    "percentile": lambda: optuna.pruners.PercentilePruner(25.0),
    "none": optuna.pruners.NopPruner,
}


def make_sampler(
    name: str, seed: int | None = None, n_trials: int | None = None, n_objectives: int = 1
) -> optuna.samplers.BaseSampler:
    """The sampler called ``name``, for a study of ``n_objectives`` objectives whose trial
    budget is ``n_trials``; what it would refuse only once trials run is refused now."""
    check_sampler(name, seed, n_objectives)
    return SAMPLERS[name.lower()](seed, n_trials)


def check_sampler(name: str, seed: int | None = None, n_objectives: int = 1) -> None:
    """Refuse, before anything runs, a sampler that would fail the search later: an unknown
    name, a seed numpy cannot take (a traceback), CMA-ES on several objectives (every trial
    fails), GP without torch (its first ten trials are random and need no torch, the eleventh
    fails)."""
    key = name.lower()
    if key not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            f"seed {seed} is out of range: the samplers take a seed from 0 to {MAX_SEED} "
            "(2**32 - 1); pass one in that range, such as 1."
        )
    if key == "cmaes" and n_objectives > 1:
        raise ConfigError(_CMAES_ONE_OBJECTIVE.format(n=n_objectives))
    if key == "gp":
        _check_torch("sampler 'gp'")


_CMAES_ONE_OBJECTIVE = (
    "sampler 'cmaes' optimises one objective, but the study has {n} directions; choose nsga2, "
    "tpe or auto for several objectives, or give one direction."
)


def check_study_sampler(study: optuna.Study) -> None:
    """The same checks for a study's own sampler (``hyperfleet.optimize``)."""
    sampler = study.sampler
    while isinstance(sampler, DelegatingSampler):
        sampler = sampler.base
    if isinstance(sampler, optuna.samplers.CmaEsSampler) and len(study.directions) > 1:
        raise ConfigError(
            _CMAES_ONE_OBJECTIVE.format(n=len(study.directions)).replace(
                "sampler 'cmaes'", "the study's CmaEsSampler"
            )
        )
    if isinstance(sampler, optuna.samplers.GPSampler):
        _check_torch("the study's GPSampler")


def _check_torch(who: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"{who} needs torch, which cannot be imported here ({exc}); install it (pip "
            "install torch: the CPU build is enough) or choose another sampler (auto uses TPE "
            "without torch)."
        ) from None


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    factory = PRUNERS.get(name.lower())
    if factory is None:
        raise ConfigError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}.")
    return factory()
