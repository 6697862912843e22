"""The objective of the multi-node tests: it records where it runs, from inside the worker."""

from __future__ import annotations

import os
import time

import optuna

import hyperfleet


def where_it_runs(trial: optuna.Trial) -> float:
    """Records, from inside the worker, its slot, node, GPUs and cores; naps a little."""
    x = trial.suggest_float("x", 0.0, 1.0)
    slot = hyperfleet.current_slot()
    trial.set_user_attr("slot", slot.name)
    # The node as the test named it, or as SLURM placed the agent.
    node = os.environ.get("HYPERFLEET_TEST_NODE") or os.environ.get("SLURMD_NODENAME", "")
    trial.set_user_attr("node", node)
    trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("affinity", sorted(os.sched_getaffinity(0)))
    trial.set_user_attr("slot_cores", list(slot.cores))
    time.sleep(float(os.environ.get("HYPERFLEET_TEST_NAP", "0.3")))  # the trial's own work
    return x
