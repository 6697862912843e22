"""Objectives that try to write hyperfleet's own records (its ``hyperfleet.*`` attributes)."""

from __future__ import annotations

import optuna

import hyperfleet


def _checkpointed(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    (hyperfleet.checkpoint_dir(trial) / "state").write_text(str(x))
    return x


def sets_first_attempt(trial: optuna.Trial) -> float:
    """Trial 1 claims trial 0's checkpoint folder."""
    if trial.number == 1:
        trial.set_user_attr("hyperfleet.first_attempt", 0)
    return _checkpointed(trial)


def sets_retry_of(trial: optuna.Trial) -> float:
    if trial.number == 1:
        trial.set_user_attr("hyperfleet.retry_of", {"a": 1})
    return _checkpointed(trial)


def enqueues_a_fake_retry(trial: optuna.Trial) -> float:
    if trial.number == 1:
        trial.study.enqueue_trial({"x": 0.5}, {"hyperfleet.retry_of": 0})
    return _checkpointed(trial)


def sets_a_string_first_attempt(trial: optuna.Trial) -> float:
    if trial.number == 1:
        trial.set_user_attr("hyperfleet.first_attempt", "x")
    return _checkpointed(trial)


def sets_a_system_mark(trial: optuna.Trial) -> float:
    if trial.number == 1:
        trial._call("set_system_attr", "hyperfleet:run", {"not": "a mark"})  # type: ignore[attr-defined]
    return _checkpointed(trial)


def sets_study_campaign_label(trial: optuna.Trial) -> float:
    if trial.number == 1:
        trial.study.set_user_attr("hyperfleet:campaign", "not a label")
    return _checkpointed(trial)


def sets_its_own_names(trial: optuna.Trial) -> float:
    """Names near hyperfleet's own are the objective's to use."""
    trial.set_user_attr("hyperfleet", 1)
    trial.set_user_attr("my.hyperfleet.retry_of", 2)
    return _checkpointed(trial)
