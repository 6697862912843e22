"""Objectives whose trials say which suggestions were sent with them (tests/test_ahead.py)."""

from __future__ import annotations

import os
import time

import optuna


def _sent(trial: optuna.Trial) -> list[str]:
    # What the worker's trial holds, read inside the objective; empty in plain Optuna.
    return sorted(getattr(trial, "_suggestions", {}))


def fixed_space(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -5.0, 5.0)
    n = trial.suggest_int("n", 1, 8, log=True)
    kind = trial.suggest_categorical("kind", ["a", "b", None])
    trial.set_user_attr("seen", {"x": x, "n": n, "kind": kind})
    trial.set_user_attr("same_again", trial.suggest_float("x", -5.0, 5.0) == x)
    trial.set_user_attr("sent", _sent(trial))
    return x * x + n


def conditional_space(trial: optuna.Trial) -> float:
    branch = trial.suggest_categorical("branch", ["left", "right"])
    if branch == "left":
        trial.suggest_float("left_only", 0.0, 1.0)
    else:
        trial.suggest_int("right_only", 0, 10)
    shared = trial.suggest_float("shared", 0.0, 1.0 + trial.number % 2)  # its range varies
    trial.set_user_attr("sent", _sent(trial))
    return shared


def asked_again(trial: optuna.Trial) -> float:
    """A trial sent a value for x first asks for x from another range (a call), then from the
    usual one, the one sent: Optuna keeps the first value, and so must the worker."""
    sent = _sent(trial)
    if "x" in sent:
        first = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("again", trial.suggest_float("x", -5.0, 5.0))
    else:
        first = trial.suggest_float("x", -5.0, 5.0)
    trial.set_user_attr("first", first)
    trial.set_user_attr("sent", sent)
    return first


def takes_a_while(trial: optuna.Trial) -> float:
    """A trial that runs 0.2 s, so that when it started can be told apart from when it was
    prepared (tests/test_prepared.py)."""
    x = trial.suggest_float("x", -5.0, 5.0)
    time.sleep(0.2)
    return x * x


def enqueues_from_outside(trial: optuna.Trial) -> float:
    """Trial 2 enqueues x = 4.25 through a storage of its own, as another process sharing the
    study's journal would; every trial takes 0.05 s."""
    if trial.number == 2:
        path = os.environ["TEST_JOURNAL"]
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        optuna.load_study(study_name=trial.study.study_name, storage=storage).enqueue_trial(
            {"x": 4.25}
        )
    x = trial.suggest_float("x", -5.0, 5.0)
    time.sleep(0.05)
    return x
