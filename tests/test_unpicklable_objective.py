"""An objective that cannot be sent to the workers (it holds a queue, a lock) is refused before
anything is written, with one line naming the part that cannot be pickled and how to do
without sending it; not with cloudpickle's traceback."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest

import hyperfleet
from hyperfleet.errors import ObjectiveError


class Trainer:
    """Seed 004's shape: a GPU queue on the object whose method is the objective."""

    def __init__(self) -> None:
        self.lr_max = 0.1
        self._gpu_queue: queue.Queue[str] = queue.Queue()
        self._gpu_queue.put("0")

    def objective(self, trial: optuna.Trial) -> float:
        return trial.suggest_float("lr", 1e-4, self.lr_max)


def _closure_over_a_lock() -> Any:
    guard = threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        with guard:
            return trial.suggest_float("x", 0, 1)

    return objective


class ClientStore:
    """An artifact store of the user's making, over a client that holds a lock (as an S3
    client's connection pool does)."""

    def __init__(self) -> None:
        self.client_lock = threading.Lock()

    def write(self, artifact_id: str, content_body: Any) -> None:
        raise NotImplementedError  # never reached: the objective is refused before any trial


def _uploads_to_a_store_that_cannot_be_pickled() -> Any:
    store = ClientStore()

    def objective(trial: optuna.Trial) -> float:
        optuna.artifacts.upload_artifact(
            artifact_store=store, file_path=__file__, study_or_trial=trial
        )
        return 0.0

    return objective


def _make_objective(lock: Any) -> Any:
    return lambda trial: 0.0


CASES = [
    (
        "bound-method",
        Trainer().objective,
        None,
        "the objective cannot be sent to the workers: self._gpu_queue (a queue.Queue, which "
        "holds a _thread.lock) cannot be pickled (TypeError: cannot pickle '_thread.lock'",
    ),
    (
        "closure",
        _closure_over_a_lock(),
        None,
        "the objective cannot be sent to the workers: guard (a _thread.lock) cannot be pickled",
    ),
    (
        "artifact-store",
        _uploads_to_a_store_that_cannot_be_pickled(),
        None,
        "the objective cannot be sent to the workers: store (a test_unpicklable_objective."
        "ClientStore, which holds a _thread.lock) cannot be pickled",
    ),
    (
        "factory-argument",
        _make_objective,
        {"lock": threading.Lock()},
        "objective_kwargs['lock'] cannot be sent to the workers (TypeError: cannot pickle",
    ),
]


@pytest.mark.parametrize(
    ("objective", "kwargs", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_an_objective_that_cannot_be_pickled_says_what_and_how_to_fix_it(
    tmp_path: Path, objective: Any, kwargs: dict[str, Any] | None, says: str
) -> None:
    with pytest.raises(ObjectiveError) as caught:
        hyperfleet.optimize(
            optuna.create_study(),
            objective,
            n_trials=1,
            run_dir=tmp_path / "run",
            display="quiet",
            objective_kwargs=kwargs,
        )
    message = str(caught.value)
    assert message.startswith(says), message
    assert "\n" not in message
    assert "factory" in message  # how to fix it: make it in the worker
    assert not (tmp_path / "run").exists()
