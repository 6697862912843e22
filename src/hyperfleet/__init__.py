"""hyperfleet: run any Optuna search on every GPU and CPU slot of a machine."""

from hyperfleet.api import optimize
from hyperfleet.config import RetryPolicy
from hyperfleet.controller.loop import Outcome
from hyperfleet.errors import (
    ConfigError,
    HyperfleetError,
    ObjectiveError,
    ResourceError,
    RunDirError,
    StorageError,
    WorkerError,
)
from hyperfleet.resources.slots import Slot, current_slot

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "HyperfleetError",
    "ObjectiveError",
    "Outcome",
    "ResourceError",
    "RetryPolicy",
    "RunDirError",
    "Slot",
    "StorageError",
    "WorkerError",
    "__version__",
    "current_slot",
    "optimize",
]
