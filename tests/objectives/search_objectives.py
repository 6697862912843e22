"""Small objectives for pruning, multi-objective studies and the trial folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna

EPOCHS = 5


def learning_curve(trial: optuna.Trial) -> float:
    """A training loop as in PyTorch: report the validation loss each epoch, stop if pruned.

    Even trials all learn the same curve and odd trials a much worse one, so the median pruner
    has clear losers to stop and no close calls."""
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    floor = 1.0 if trial.number % 2 == 0 else 10.0
    loss = 0.0
    for epoch in range(EPOCHS):
        loss = floor + 1.0 / (epoch + 1)
        trial.report(loss, epoch)
        trial.set_user_attr("epochs_run", epoch + 1)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")
    return loss


def two_objectives(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("directions", [d.name for d in trial.study.directions])
    try:
        trial.report(x, 0)
    except NotImplementedError:  # as with study.optimize: no reports in multi-objective studies
        trial.set_user_attr("report_refused", True)
    return x, x * x


def noisy(trial: optuna.Trial) -> float:
    """Writes to stdout and stderr from Python, the C level and a child process, and a file."""
    x = trial.suggest_float("x", 0.0, 1.0)
    print(f"stdout of trial {trial.number}", flush=True)
    print(f"stderr of trial {trial.number}", file=sys.stderr, flush=True)
    os.write(1, f"fd 1 of trial {trial.number}\n".encode())
    subprocess.run(["sh", "-c", f"echo child of trial {trial.number}"], check=True)
    Path("checkpoint.txt").write_text(str(x))
    trial.set_user_attr("cwd", os.getcwd())
    return x


def quick(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0) ** 2
