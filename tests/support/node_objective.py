"""The objective of the multi-node tests: it records where it runs, from inside the worker."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import optuna

import hyperfleet
from hyperfleet.resources import fakegpu


def where_it_runs(trial: optuna.Trial) -> float:
    """Records, from inside the worker, its slot, node, GPUs and cores; naps a little, says
    so on stdout and stderr and leaves a file in its folder. With $HYPERFLEET_TEST_CRASH_ONCE
    naming a file not there yet, it makes that file and kills its worker instead."""
    x = trial.suggest_float("x", 0.0, 1.0)
    slot = hyperfleet.current_slot()
    trial.set_user_attr("slot", slot.name)
    # The node as the test named it, or as SLURM placed the agent.
    node = os.environ.get("HYPERFLEET_TEST_NODE") or os.environ.get("SLURMD_NODENAME", "")
    trial.set_user_attr("node", node)
    trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("affinity", sorted(os.sched_getaffinity(0)))
    trial.set_user_attr("slot_cores", list(slot.cores))
    trial.set_user_attr("sent", sorted(getattr(trial, "_suggestions", {})))  # with the trial
    time.sleep(float(os.environ.get("HYPERFLEET_TEST_NAP", "0.3")))  # the trial's own work
    crash_once = os.environ.get("HYPERFLEET_TEST_CRASH_ONCE")
    if crash_once and not os.path.exists(crash_once):
        Path(crash_once).touch()
        print(f"trial {trial.number} dies on {node}", file=sys.stderr, flush=True)
        os._exit(3)  # the worker with it
    print(f"trial {trial.number}: x={x!r}")  # the trial's logs, and a file of its own
    print(f"trial {trial.number} ran on {node}", file=sys.stderr)
    Path("model.txt").write_text(f"{x!r}\n")
    return x


def on_its_gpu(trial: optuna.Trial) -> float:
    """Takes $HYPERFLEET_TEST_MIB of its fake GPU and keeps it $HYPERFLEET_TEST_BUSY per cent
    busy for $HYPERFLEET_TEST_NAP seconds of GPU time: its node's GPU readings follow it."""
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("slot", hyperfleet.current_slot().name)
    fakegpu.work(
        float(os.environ.get("HYPERFLEET_TEST_NAP", "0.3")),
        int(os.environ.get("HYPERFLEET_TEST_MIB", "1000")),
        float(os.environ.get("HYPERFLEET_TEST_BUSY", "20")),
    )
    return x
