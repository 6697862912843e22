"""Objectives of the tracker tests, in a module of their own: a worker imports the module of
its objective, and the test modules import their tracker (TensorFlow takes seconds), which the
workers of these objectives need not."""

from __future__ import annotations

import optuna


def squared(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    return x * x


def pruned_at_three(trial: optuna.Trial) -> float:
    """Two parameters; trial 3 is pruned."""
    x = trial.suggest_float("x", -1.0, 1.0)
    width = trial.suggest_categorical("width", [32, 64])
    if trial.number == 3:
        raise optuna.TrialPruned()
    return x * x + width / 1000


def fails_once(trial: optuna.Trial) -> float:
    """Trial 1 fails (a repeat of it, with another number, does not)."""
    x = trial.suggest_float("x", -1.0, 1.0)
    if trial.number == 1:
        raise ValueError("trial 1 fails, and runs again")
    return x * x
