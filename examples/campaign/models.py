"""XGBoost, LightGBM and CatBoost on three scikit-learn data sets: a campaign in a few minutes.

Each ``make_*`` is an objective factory: ``campaign.toml`` gives it ``dataset=...`` and a worker
calls it once, so the data set is loaded once per worker, not once per trial. Each objective asks
``hyperfleet.current_slot()`` where it runs and uses that slot's GPU (``device="cuda"``) or its
cores (``slot.threads``), so the same code runs on a GPU slot and on the CPU fallback.

    pip install -e ".[campaign]"
    hyperfleet run examples/campaign/campaign.toml
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

import hyperfleet

Objective = Callable[[optuna.Trial], float]
LOADERS = {"breast_cancer": load_breast_cancer, "wine": load_wine, "digits": load_digits}


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    x_valid: np.ndarray
    y_train: np.ndarray
    y_valid: np.ndarray


def load(dataset: str) -> Data:
    if dataset not in LOADERS:
        raise ValueError(f"unknown data set {dataset!r}; choose one of {', '.join(LOADERS)}")
    x, y = LOADERS[dataset](return_X_y=True)
    parts = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return Data(*parts)


def make_xgb(dataset: str) -> Objective:
    import xgboost as xgb

    data = load(dataset)

    def objective(trial: optuna.Trial) -> float:
        slot = hyperfleet.current_slot()
        model = xgb.XGBClassifier(
            n_estimators=trial.suggest_int("n_estimators", 50, 400, log=True),
            max_depth=trial.suggest_int("max_depth", 2, 10),
            learning_rate=trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            subsample=trial.suggest_float("subsample", 0.5, 1.0),
            colsample_bytree=trial.suggest_float("colsample_bytree", 0.5, 1.0),
            tree_method="hist",
            device="cuda" if slot.kind == "gpu" else "cpu",
            n_jobs=slot.threads,
        )
        model.fit(data.x_train, data.y_train)
        return float(accuracy_score(data.y_valid, model.predict(data.x_valid)))

    return objective


def make_lgbm(dataset: str) -> Objective:
    import lightgbm as lgb

    data = load(dataset)

    def objective(trial: optuna.Trial) -> float:
        slot = hyperfleet.current_slot()
        params = {
            "n_estimators": trial.suggest_int("n_estimators", 50, 400, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 4, 128, log=True),
            "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            "min_child_samples": trial.suggest_int("min_child_samples", 2, 40),
            "n_jobs": slot.threads,
            "verbose": -1,
        }
        model = _fit_lgbm(lgb, params, data, on_gpu=slot.kind == "gpu")
        trial.set_user_attr("device", model.get_params().get("device_type", "cpu"))
        return float(accuracy_score(data.y_valid, model.predict(data.x_valid)))

    return objective


def _fit_lgbm(lgb: object, params: dict[str, object], data: Data, on_gpu: bool) -> object:
    """LightGBM's pip wheel has GPU support only on some systems: use it where it works."""
    classifier = lgb.LGBMClassifier  # type: ignore[attr-defined]
    if on_gpu:
        try:
            return classifier(**params, device_type="gpu").fit(data.x_train, data.y_train)
        except lgb.basic.LightGBMError:  # type: ignore[attr-defined]
            pass  # no GPU build: the slot's cores do the work
    return classifier(**params).fit(data.x_train, data.y_train)


def make_catboost(dataset: str) -> Objective:
    from catboost import CatBoostClassifier

    data = load(dataset)

    def objective(trial: optuna.Trial) -> float:
        slot = hyperfleet.current_slot()
        model = CatBoostClassifier(
            iterations=trial.suggest_int("iterations", 50, 300, log=True),
            depth=trial.suggest_int("depth", 3, 8),
            learning_rate=trial.suggest_float("learning_rate", 0.01, 0.3, log=True),
            l2_leaf_reg=trial.suggest_float("l2_leaf_reg", 1.0, 10.0, log=True),
            thread_count=slot.threads,
            allow_writing_files=False,
            verbose=False,
        )
        model.fit(data.x_train, data.y_train)
        return float(accuracy_score(data.y_valid, model.predict(data.x_valid).ravel()))

    return objective
