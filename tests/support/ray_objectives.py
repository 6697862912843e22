"""Objectives of the shared-Ray-cluster tests: where each trial runs, and a trial that saves a
checkpoint and stops when its node is taken back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna

import hyperfleet

# A file of lines "NODE ask" (its trials run until asked to stop, then save) or "NODE ignore"
# (they run long and never ask), written once the test knows the nodes' names, after the nodes
# started with this variable.
LONG_ON_ENV = "HYPERFLEET_TEST_LONG_ON"


def saves_when_asked(trial: optuna.Trial) -> float:
    """Records its slot and naps. On a node $HYPERFLEET_TEST_LONG_ON names, a trial without a
    checkpoint runs long: until ``should_stop`` answers True, then it saves one and stops
    ("ask"), or without ever asking ("ignore"). A repeat records where its checkpoint was
    saved."""
    x = trial.suggest_float("x", 0.0, 1.0)
    slot = hyperfleet.current_slot()
    trial.set_user_attr("slot", slot.name)
    trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("slot_cores", list(slot.cores))
    state = hyperfleet.checkpoint_dir(trial) / "state.txt"
    if state.exists():
        trial.set_user_attr("resumed_from", state.read_text())
    elif slot.node in _long_on():
        asks = _long_on()[slot.node] == "ask"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the trial's own long work, one step at a time
            if asks and hyperfleet.should_stop(trial):
                state.write_text(slot.name)
                raise hyperfleet.TrialInterrupted()
            time.sleep(0.05)
    time.sleep(float(os.environ.get("HYPERFLEET_TEST_NAP", "0.3")))
    return x


def _long_on() -> dict[str, str]:
    path = Path(os.environ.get(LONG_ON_ENV, "/nonexistent"))
    lines = path.read_text().splitlines() if path.is_file() else []
    return dict(line.split() for line in lines if line.strip())
