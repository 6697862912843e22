"""One objective that uses every part of the ``optuna.Trial`` interface.

It is run once through ``study.optimize`` and once through hyperfleet; both runs must leave the
same trials in storage. Everything it records must therefore be the same in both, except
``datetime_start`` (checked against storage within each run).
"""

from __future__ import annotations

import warnings

import optuna

ENQUEUED = {"kind": "tree", "depth": 3, "x": 1.5}


def objective(trial: optuna.Trial) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated aliases warn
        x = suggest_everything(trial)
    record_trial_facts(trial)
    record_study_facts(trial)
    if trial.number == 0:
        trial.study.enqueue_trial(ENQUEUED)
    for step in range(4):
        trial.report(x + 1.0 / (step + 1), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")
    return x


def suggest_everything(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -4.0, 4.0)
    # Asking again for the same name returns the same value.
    trial.set_user_attr("same_again", trial.suggest_float("x", -4.0, 4.0) == x)
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_float("dropout", 0.0, 0.5, step=0.1)
    trial.suggest_int("layers", 1, 4)
    trial.suggest_int("units", 16, 128, step=16)
    trial.suggest_int("batch", 8, 256, log=True)
    trial.suggest_uniform("momentum", 0.5, 0.99)
    trial.suggest_loguniform("decay", 1e-6, 1e-2)
    trial.suggest_discrete_uniform("ratio", 0.0, 1.0, 0.25)
    # A conditional, define-by-run space: which parameters exist depends on a choice.
    kind = trial.suggest_categorical("kind", ["tree", "linear"])
    if kind == "tree":
        trial.suggest_int("depth", 2, 8)
    else:
        trial.suggest_categorical("penalty", [None, "l1", "l2"])
    return x


def record_trial_facts(trial: optuna.Trial) -> None:
    trial.set_user_attr("number", trial.number)
    trial.set_user_attr("is_optuna_trial", isinstance(trial, optuna.Trial))
    assert trial.datetime_start is not None
    trial.set_user_attr("start", trial.datetime_start.isoformat())
    trial.set_user_attr("param_names", sorted(trial.params))
    trial.set_user_attr("params_seen", dict(sorted(trial.params.items())))
    trial.set_user_attr(
        "distribution_types",
        {name: type(d).__name__ for name, d in sorted(trial.distributions.items())},
    )
    trial.set_user_attr("echo", trial.user_attrs["number"])


def record_study_facts(trial: optuna.Trial) -> None:
    study = trial.study
    trial.set_user_attr("study_name", study.study_name)
    trial.set_user_attr("direction", study.direction.name)
    trial.set_user_attr("directions", [d.name for d in study.directions])
    trial.set_user_attr("dataset", study.user_attrs.get("dataset"))
    trial.set_user_attr("trials_seen", len(study.trials))
    try:
        best: float | None = study.best_value
    except ValueError:  # no complete trial yet: the same error as with study.optimize
        best = None
    trial.set_user_attr("best_value_before", best)
