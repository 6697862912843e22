"""Objectives that report, from inside a worker, where hyperfleet pinned them.

``make_objective`` is a factory (passed with ``objective_kwargs``): each trial records its
process, GPUs, cores and thread limits as user attributes, then waits until ``parties`` distinct
workers have arrived, so every worker of the pool runs exactly one trial.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import optuna

import hyperfleet

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# How JAX and TensorFlow are told to take GPU memory as they need it.
FRAMEWORK_VARS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "TF_FORCE_GPU_ALLOW_GROWTH")
BARRIER_SECONDS = 120.0


def make_objective(barrier_dir: str, parties: int) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        record_placement(trial)
        wait_for_peers(Path(barrier_dir), parties)
        return float(trial.number)

    return objective


def record_placement(trial: optuna.Trial) -> None:
    slot = hyperfleet.current_slot()
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("affinity", sorted(os.sched_getaffinity(0)))
    trial.set_user_attr("threads", {name: os.environ.get(name) for name in THREAD_VARS})
    trial.set_user_attr("frameworks", {name: os.environ.get(name) for name in FRAMEWORK_VARS})
    trial.set_user_attr(
        "slot",
        {
            "name": slot.name,
            "kind": slot.kind,
            "gpus": list(slot.gpus),
            "gpu_uuids": list(slot.gpu_uuids),
            "cores": list(slot.cores),
            "threads": slot.threads,
            "device": slot.device,
        },
    )


def wait_for_peers(folder: Path, parties: int) -> None:
    """Announce this worker, then block until ``parties`` different workers have announced."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + BARRIER_SECONDS
    while len(list(folder.iterdir())) < parties:
        if time.monotonic() > deadline:
            arrived = len(list(folder.iterdir()))
            raise TimeoutError(f"only {arrived} of {parties} workers ran a trial at once")
        time.sleep(0.01)  # polling interval of the condition above, not a synchronisation
