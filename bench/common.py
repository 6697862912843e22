"""What several benchmarks share: journals, a big study built fast, Optuna processes side by side.

Benchmarks run as scripts (``python bench/NAME.py``), so this folder is on ``sys.path`` and they
import this module by name.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

PARAMS = {f"x{i}": FloatDistribution(-10.0, 10.0) for i in range(4)}  # a big study's space


def journal(path: Path) -> JournalStorage:
    """Optuna's own journal file storage, as a plain Optuna user opens it."""
    return JournalStorage(JournalFileBackend(str(path)))


def build_journal(path: Path, study_name: str, n_trials: int) -> None:
    """A journal of ``n_trials`` finished trials over :data:`PARAMS`, written by plain Optuna."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=journal(path))
    rng = random.Random(n_trials)
    study.add_trials(
        optuna.trial.create_trial(
            params={name: rng.uniform(-10.0, 10.0) for name in PARAMS},
            distributions=PARAMS,
            value=rng.uniform(0.0, 400.0),
        )
        for _ in range(n_trials)
    )


def scratch() -> str | None:
    # Each trial is an fsynced append: 10,000 of them take a minute on a disk, seconds on tmpfs.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def run_processes(target: Callable[..., None], args: Sequence[tuple[Any, ...]]) -> None:
    """One spawned process per ``args`` entry running ``target``, all at once, to the end: the
    launcher people write by hand around ``study.optimize``."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=each) for each in args]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"an Optuna process exited with {process.exitcode}")
