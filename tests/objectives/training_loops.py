"""Real training loops that prune through ``report``/``should_prune``: LightGBM and
XGBoost with optuna-integration's callbacks, and an epoch loop as written for PyTorch (with
scikit-learn's SGDClassifier, so it needs no torch). Even trials all learn the same curve and
odd trials get a crippled learning rate, so the median pruner has clear losers to stop and no
close calls."""

from __future__ import annotations

import warnings

import numpy as np
import optuna
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import hyperfleet

# Loaded once per worker, not once per trial.
_x, _y = load_breast_cancer(return_X_y=True)
X_TRAIN, X_VALID, Y_TRAIN, Y_VALID = train_test_split(
    StandardScaler().fit_transform(_x), _y, test_size=0.3, random_state=0, stratify=_y
)
ROUNDS = 15


def learning_rate(trial: optuna.Trial) -> float:
    rate = 0.3 if trial.number % 2 == 0 else 3e-5
    return trial.suggest_float("learning_rate", rate, rate)


def lightgbm_objective(trial: optuna.Trial) -> float:
    import lightgbm as lgb
    from optuna_integration.lightgbm import LightGBMPruningCallback

    params = {
        "objective": "binary",
        "metric": "binary_logloss",
        "verbosity": -1,
        "num_threads": hyperfleet.current_slot().threads,
        "learning_rate": learning_rate(trial),
        "num_leaves": trial.suggest_int("num_leaves", 8, 8),
    }
    booster = lgb.train(
        params,
        lgb.Dataset(X_TRAIN, Y_TRAIN),
        num_boost_round=ROUNDS,
        valid_sets=[lgb.Dataset(X_VALID, Y_VALID)],
        callbacks=[LightGBMPruningCallback(trial, "binary_logloss")],
    )
    return float(booster.best_score["valid_0"]["binary_logloss"])


def xgboost_objective(trial: optuna.Trial) -> float:
    import xgboost as xgb
    from optuna_integration.xgboost import XGBoostPruningCallback

    params = {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "nthread": hyperfleet.current_slot().threads,
        "eta": learning_rate(trial),
        "max_depth": trial.suggest_int("max_depth", 3, 3),
    }
    booster = xgb.train(
        params,
        xgb.DMatrix(X_TRAIN, label=Y_TRAIN),
        num_boost_round=ROUNDS,
        evals=[(xgb.DMatrix(X_VALID, label=Y_VALID), "validation")],
        callbacks=[XGBoostPruningCallback(trial, "validation-logloss")],
        verbose_eval=False,
    )
    return float(booster.eval(xgb.DMatrix(X_VALID, label=Y_VALID)).split(":")[-1])


def epoch_loop_objective(trial: optuna.Trial) -> float:
    model = SGDClassifier(
        loss="log_loss", learning_rate="constant", eta0=learning_rate(trial), random_state=0
    )
    classes = np.unique(Y_TRAIN)
    error = 1.0
    for epoch in range(ROUNDS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.partial_fit(X_TRAIN, Y_TRAIN, classes=classes)
        error = 1.0 - float(model.score(X_VALID, Y_VALID))
        trial.report(error, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return error
