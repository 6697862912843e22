"""Trials on fake GPUs that take memory and GPU time as a model would (see
:mod:`hyperfleet.resources.fakegpu`): the fake GPU's readings follow them.

``make_objective`` is a factory (passed with ``objective_kwargs``). A trial takes ``mib`` of its
GPU (or the value of its ``mib`` parameter, when the test enqueues it) and keeps the GPU
``busy`` per cent busy for ``seconds`` of GPU time; with ``saturates`` it slows down beside
others however busy the GPU reads (a model bound by memory bandwidth).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna

from hyperfleet.resources import fakegpu


def make_objective(
    mib: int, busy: float, seconds: float, saturates: bool = False
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        fakegpu.work(seconds, mib, busy, saturates)
        return x

    return objective


def make_sleeper(seconds: float, load_seconds: float = 0.0) -> Callable[[optuna.Trial], float]:
    """A trial that registers nothing: only a declared size (``gpu_memory``) can pack it.
    ``load_seconds``: how long the objective takes to load (a data set), once per worker."""
    time.sleep(load_seconds)

    def objective(trial: optuna.Trial) -> float:
        time.sleep(seconds)
        return trial.suggest_float("x", 0.0, 1.0)

    return objective
