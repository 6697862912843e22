"""Objectives of tests/test_sampler_pool.py: each trial says which suggestions came with it."""

from __future__ import annotations

import time

import optuna


def _sent(trial: optuna.Trial) -> list[str]:
    # What the worker's trial holds, read inside the objective; empty in plain Optuna.
    return sorted(getattr(trial, "_suggestions", {}))


def fixed_space(trial: optuna.Trial) -> float:
    """Two parameters every trial suggests, and one every third trial (define-by-run, outside
    the study's known space), for a trial of 80 ms."""
    x = trial.suggest_float("x", -10.0, 10.0)
    n = trial.suggest_int("n", 0, 10)
    seen: dict[str, object] = {"x": x, "n": n}
    if trial.number % 3 == 0:
        seen["extra"] = trial.suggest_categorical("extra", ["a", "b"])
    trial.set_user_attr("sent", _sent(trial))
    trial.set_user_attr("seen", seen)
    time.sleep(0.08)
    return x * x + n
