"""A training loop that survives interruption: each repeat of a trial continues from its checkpoint.

Each trial trains scikit-learn's SGDClassifier on the handwritten digits, one epoch at a time,
and saves the model and the epoch to ``hyperfleet.checkpoint_dir(trial)`` after every epoch (with
PyTorch, save the model's and the optimiser's ``state_dict`` the same way). Kill the run at any
moment (``kill -9``, SIGTERM, a lost node) and run the same command again: interrupted trials
continue from their last epoch, with the curve they had reported.

    hyperfleet run examples/resumable.py:objective --direction maximize --n-trials 20
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import hyperfleet

EPOCHS = 30

# Module-level code runs once per warm worker, not once per trial: load the data here.
_digits = load_digits()
X_TRAIN, X_VALID, Y_TRAIN, Y_VALID = train_test_split(
    StandardScaler().fit_transform(_digits.data),
    _digits.target,
    test_size=0.25,
    random_state=0,
    stratify=_digits.target,
)
CLASSES = np.unique(Y_TRAIN)


def objective(trial: optuna.Trial) -> float:
    alpha = trial.suggest_float("alpha", 1e-6, 1e-1, log=True)
    eta0 = trial.suggest_float("eta0", 1e-4, 1e-1, log=True)
    checkpoint = hyperfleet.checkpoint_dir(trial) / "model.pkl"
    model, start = _load(checkpoint)  # where an earlier attempt of this trial stopped
    if model is None:
        model = SGDClassifier(alpha=alpha, learning_rate="constant", eta0=eta0, random_state=0)
    accuracy = 0.0
    for epoch in range(start, EPOCHS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.partial_fit(X_TRAIN, Y_TRAIN, classes=CLASSES)
        accuracy = float(model.score(X_VALID, Y_VALID))
        trial.report(accuracy, epoch)  # a repeat reporting an epoch again is no error
        _save(checkpoint, model, epoch + 1)
        if trial.should_prune():
            raise optuna.TrialPruned()
        if hyperfleet.should_stop(trial):  # the run got SIGTERM: the checkpoint is saved
            raise hyperfleet.TrialInterrupted()
    return accuracy


def _load(path: Path) -> tuple[Any, int]:
    if not path.exists():
        return None, 0
    with open(path, "rb") as handle:
        saved = pickle.load(handle)
    return saved["model"], saved["next_epoch"]


def _save(path: Path, model: SGDClassifier, next_epoch: int) -> None:
    # Written aside, then renamed: a kill in the middle leaves the previous checkpoint whole.
    building = path.with_name(path.name + ".new")
    with open(building, "wb") as handle:
        pickle.dump({"model": model, "next_epoch": next_epoch}, handle)
    os.replace(building, path)


if __name__ == "__main__":
    study = optuna.create_study(direction="maximize", study_name="resumable")
    hyperfleet.optimize(study, objective, n_trials=20)
    print(study.best_params)
