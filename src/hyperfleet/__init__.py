"""hyperfleet: run any Optuna search on every GPU and CPU slot of a machine.

Names are imported on first use, so that ``from hyperfleet import client`` in a training script
does not pay for importing Optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hyperfleet.app.api import optimize, run_campaign
    from hyperfleet.config import RetryPolicy
    from hyperfleet.controller.loop import Outcome
    from hyperfleet.errors import (
        ConfigError,
        HyperfleetError,
        ObjectiveError,
        ResourceError,
        RunDirError,
        StorageError,
        TrialInterrupted,
        WorkerError,
    )
    from hyperfleet.objective.resume import checkpoint_dir, should_stop
    from hyperfleet.resources.slots import Slot, current_slot
    from hyperfleet.sampling.auto_sampler import AutoSampler
    from hyperfleet.sampling.pending import PendingTrialsSampler
    from hyperfleet.tracking import TrackerTags, tracking_tags

__version__ = "0.1.0"

_HOMES = {
    "optimize": "hyperfleet.app.api",
    "run_campaign": "hyperfleet.app.api",
    "RetryPolicy": "hyperfleet.config",
    "checkpoint_dir": "hyperfleet.objective.resume",
    "should_stop": "hyperfleet.objective.resume",
    "Outcome": "hyperfleet.controller.loop",
    "ConfigError": "hyperfleet.errors",
    "HyperfleetError": "hyperfleet.errors",
    "ObjectiveError": "hyperfleet.errors",
    "ResourceError": "hyperfleet.errors",
    "RunDirError": "hyperfleet.errors",
    "StorageError": "hyperfleet.errors",
    "TrialInterrupted": "hyperfleet.errors",
    "WorkerError": "hyperfleet.errors",
    "PendingTrialsSampler": "hyperfleet.sampling.pending",
    "AutoSampler": "hyperfleet.sampling.auto_sampler",
    "Slot": "hyperfleet.resources.slots",
    "current_slot": "hyperfleet.resources.slots",
    "TrackerTags": "hyperfleet.tracking",
    "tracking_tags": "hyperfleet.tracking",
}

__all__ = [
    "AutoSampler",
    "ConfigError",
    "HyperfleetError",
    "ObjectiveError",
    "Outcome",
    "PendingTrialsSampler",
    "ResourceError",
    "RetryPolicy",
    "RunDirError",
    "Slot",
    "StorageError",
    "TrackerTags",
    "TrialInterrupted",
    "WorkerError",
    "__version__",
    "checkpoint_dir",
    "current_slot",
    "optimize",
    "run_campaign",
    "should_stop",
    "tracking_tags",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hyperfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value
