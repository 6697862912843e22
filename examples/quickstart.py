"""A real search on whatever this machine has.

With PyTorch installed, each trial trains a small MLP on scikit-learn's handwritten digits on its
slot's device (``cuda:0`` inside a GPU slot, ``mps`` on a Mac, else the CPU); without PyTorch it
trains scikit-learn's own MLP. Either way it reports the validation accuracy after every epoch so
the pruner can stop bad trials early.

    hyperfleet run examples/quickstart.py:objective --direction maximize --n-trials 40
    python examples/quickstart.py            # the same through hyperfleet.optimize
"""

from __future__ import annotations

import warnings

import numpy as np
import optuna
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import hyperfleet

EPOCHS = 20

# Module-level code runs once per warm worker, not once per trial: load the data here.
_digits = load_digits()
_x = StandardScaler().fit_transform(_digits.data).astype(np.float32)
X_TRAIN, X_VALID, Y_TRAIN, Y_VALID = train_test_split(
    _x, _digits.target, test_size=0.25, random_state=0, stratify=_digits.target
)

try:
    import torch
except ImportError:  # scikit-learn fallback below
    torch = None


def objective(trial: optuna.Trial) -> float:
    hidden = trial.suggest_int("hidden", 16, 256, log=True)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    train = _train_torch if torch is not None else _train_sklearn
    return train(trial, hidden, lr, weight_decay)


def _train_torch(trial: optuna.Trial, hidden: int, lr: float, weight_decay: float) -> float:
    assert torch is not None
    device = hyperfleet.current_slot().device
    torch.manual_seed(trial.number)
    x_train, y_train = torch.tensor(X_TRAIN, device=device), torch.tensor(Y_TRAIN, device=device)
    x_valid, y_valid = torch.tensor(X_VALID, device=device), torch.tensor(Y_VALID, device=device)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    accuracy = 0.0
    for epoch in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(x_train), device=device).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_valid).argmax(1) == y_valid).float().mean().item()
        trial.report(accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return accuracy


def _train_sklearn(trial: optuna.Trial, hidden: int, lr: float, weight_decay: float) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(
        hidden_layer_sizes=(hidden,),
        learning_rate_init=lr,
        alpha=weight_decay,
        batch_size=64,
        random_state=trial.number,
    )
    classes = np.arange(10)
    accuracy = 0.0
    for epoch in range(EPOCHS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.partial_fit(X_TRAIN, Y_TRAIN, classes=classes)
        accuracy = float(model.score(X_VALID, Y_VALID))
        trial.report(accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return accuracy


if __name__ == "__main__":
    study = optuna.create_study(
        study_name="quickstart",
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=3),
    )
    outcome = hyperfleet.optimize(study, objective, n_trials=40)
    print(f"best accuracy {study.best_value:.4f} with {study.best_params}")
