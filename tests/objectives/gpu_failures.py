"""Trials on fake GPUs that fail as trials on real ones do (see ``test_gpu_oom.py`` and
``test_autopack.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy
import optuna

from hyperfleet.resources import fakegpu


def make_host_oom(every: int, mib: int = 1000, seconds: float = 0.2) -> Callable[..., float]:
    """Trials holding ``mib`` of their fake GPU, of which every ``every``-th runs out of the
    host's memory, in turn as Python's MemoryError and as numpy's _ArrayMemoryError."""

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        with fakegpu.hold(mib, 20.0):
            time.sleep(seconds)
            if trial.number % every == every - 1:
                if trial.number // every % 2:
                    numpy.empty(2**62, dtype=numpy.uint8)  # numpy's _ArrayMemoryError
                raise MemoryError()
        return x

    return objective


BUSY_ERROR = "CUDA error: CUDA-capable device(s) is/are busy or unavailable"


def make_first_worker_only(mib: int, busy: float, seconds: float) -> Callable[..., float]:
    """Trials that run on their GPU's first worker only and fail at once on every other, as
    on a GPU in EXCLUSIVE_PROCESS compute mode (or beside a framework that took all of it)."""
    from hyperfleet import current_slot

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if not current_slot().name.endswith("#0"):
            raise RuntimeError(BUSY_ERROR)
        fakegpu.work(seconds, mib, busy)
        return x

    return objective


def torch_on_cuda(trial: optuna.Trial) -> float:
    """A trial that puts a tensor on its GPU: fails where torch cannot use CUDA."""
    import torch

    torch.zeros(1, device="cuda")
    return 0.0
