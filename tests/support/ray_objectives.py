"""Objectives of the shared-Ray-cluster tests: where each trial runs, and a trial that saves a
checkpoint and stops when its node is taken back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna

import hyperfleet

# A file naming the node where trials run until they are asked to stop (written once the test
# knows the node's name, after the nodes started with this variable).
LONG_ON_ENV = "HYPERFLEET_TEST_LONG_ON"


def saves_when_asked(trial: optuna.Trial) -> float:
    """Records its slot and naps; on the node named in $HYPERFLEET_TEST_LONG_ON, a trial without a
    checkpoint runs until ``should_stop`` answers True, then saves one and stops. Its repeat
    records where the checkpoint was saved."""
    x = trial.suggest_float("x", 0.0, 1.0)
    slot = hyperfleet.current_slot()
    trial.set_user_attr("slot", slot.name)
    trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    trial.set_user_attr("slot_cores", list(slot.cores))
    state = hyperfleet.checkpoint_dir(trial) / "state.txt"
    if state.exists():
        trial.set_user_attr("resumed_from", state.read_text())
    elif slot.node == _long_on():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the trial's own long work, one step at a time
            if hyperfleet.should_stop(trial):
                state.write_text(slot.name)
                raise hyperfleet.TrialInterrupted()
            time.sleep(0.05)
    time.sleep(float(os.environ.get("HYPERFLEET_TEST_NAP", "0.3")))
    return x


def _long_on() -> str:
    path = Path(os.environ.get(LONG_ON_ENV, "/nonexistent"))
    return path.read_text().strip() if path.is_file() else ""
