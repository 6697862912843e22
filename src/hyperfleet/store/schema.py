"""The stored trial: the attributes hyperfleet keeps on a trial and a study, and their readers.

A trial's markers live in its system attributes (``hyperfleet:*``), except which trial a retry
repeats, which is a user attribute so that it is set in the same write that creates the retry.
Names that start with ``hyperfleet.`` or ``hyperfleet:`` are hyperfleet's own: an objective's
write of one is refused (see :mod:`hyperfleet.controller.calls`).

Everything here is pure reading, at the bottom of the package: the controller writes these
attributes (:mod:`hyperfleet.controller.bookkeeping`), and the reports and ``hyperfleet status``
read them through this module without importing the controller. Every value is read
defensively, so a value that is not what hyperfleet writes (a study an older version let an
objective write into) is taken as absent rather than crashing a reader or a resume.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

RETRY_ATTR = "hyperfleet.retry_of"
# The first trial of a chain of repeats: its number names the checkpoint folder they share.
FIRST_ATTEMPT_ATTR = "hyperfleet.first_attempt"
# Set on the repeat of a trial that ran out of memory on a shared GPU: that repeat is auto
# packing's doing and does not count against the retry policy's ``oom`` limit.
ROOM_RERUN_ATTR = "hyperfleet.rerun_with_more_room"
EXPERIMENT_ATTR = "experiment"  # a campaign's named experiment (or grid point) a trial runs
RUN_ATTR = "hyperfleet:run"
SLOT_ATTR = "hyperfleet:slot"
PID_ATTR = "hyperfleet:worker_pid"
KIND_ATTR = "hyperfleet:fail_kind"
REASON_ATTR = "hyperfleet:fail_reason"
TRACEBACK_ATTR = "hyperfleet:traceback"
# A study system attribute: the seconds of its time budget used so far, over every run.
TIME_USED_ATTR = "hyperfleet:time_used"
# When a trial a dead controller left running was last known to run (a Unix time): Optuna gives
# it the end time of the resume that marks it interrupted, which would draw it running (and
# count its slot busy) through the whole downtime.
STOPPED_AT_ATTR = "hyperfleet:stopped_at"
RESERVED_PREFIXES = ("hyperfleet.", "hyperfleet:")


def is_reserved(key: object) -> bool:
    """Whether an attribute name is one of hyperfleet's own, which objectives may not set."""
    return isinstance(key, str) and key.startswith(RESERVED_PREFIXES)


# Out of memory, as each framework says it. A GPU's: torch (torch.cuda.OutOfMemoryError, "CUDA
# out of memory"), TensorFlow (ResourceExhaustedError, "OOM when allocating tensor"), JAX
# ("RESOURCE_EXHAUSTED"), numba ("CUDA_ERROR_OUT_OF_MEMORY"), cuBLAS, XGBoost and CatBoost
# ("out of memory"), LightGBM's OpenCL device ("Memory Object Allocation Failure").
_GPU_OOM_TYPES = ("OutOfMemoryError", "ResourceExhaustedError", "FakeOutOfMemoryError")

_GPU_OOM_TEXTS = (
    "CUDA out of memory",
    "out of memory",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "RESOURCE_EXHAUSTED",
    "OOM when allocating tensor",
    "Memory Object Allocation Failure",
)

# The host's: Python's MemoryError, numpy's _ArrayMemoryError ("Unable to allocate 8 GiB for an
# array"), torch's CPU allocator. Repeated like any out-of-memory failure, but no sign that the
# trials sharing a GPU are too many.
_HOST_OOM_TYPES = ("MemoryError", "_ArrayMemoryError")

_HOST_OOM_TEXTS = (
    "MemoryError",  # in a --cmd trial's stderr, as the traceback's last line names it
    "DefaultCPUAllocator: can't allocate memory",
)

HOST_OOM_REASON = "out of host memory"  # how a host out-of-memory failure's reason starts


def classify_error(error_type: str, message: str) -> str:
    """ "oom" for a framework's out-of-memory error (a GPU's or the host's, see
    :func:`out_of_memory_on`), "crash" for ``sys.exit`` (the objective ended its process, as
    ``os._exit`` would), else "error"."""
    if error_type == "SystemExit":
        return "crash"
    return "oom" if out_of_memory_on(error_type, message) else "error"


def out_of_memory_on(error_type: str, message: str) -> str:
    """Where an error ran out of memory: "gpu", "host", or "" when it is no out-of-memory
    error. Only a GPU's counts against the trials sharing it (auto packing)."""
    if error_type in _HOST_OOM_TYPES:
        return "host"
    if error_type == "ResourceExhaustedError" and "device:CPU" in message:  # TF's, on the host
        return "host"
    if error_type in _GPU_OOM_TYPES or any(text in message for text in _GPU_OOM_TEXTS):
        return "gpu"
    if any(text in message for text in _HOST_OOM_TEXTS):
        return "host"
    return ""


def out_of_memory_line(text: str) -> str:
    """The first line of ``text`` (a failed command's stderr) that says a GPU ran out of
    memory, or ""."""
    for line in text.splitlines():
        if any(marker in line for marker in _GPU_OOM_TEXTS):
            return line.strip()
    return ""


def _trial_number(value: object, below: int) -> int | None:
    """``value`` when it is a trial number under ``below``, else None (bools are not)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < below:
        return value
    return None


def retry_of(trial: FrozenTrial) -> int | None:
    """The number of the trial this one repeats, or None. Only an earlier trial's number counts,
    so following the chain always ends."""
    return _trial_number(trial.user_attrs.get(RETRY_ATTR), trial.number)


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    return {number for t in trials if (number := retry_of(t)) is not None}


def is_interrupted(trial: FrozenTrial) -> bool:
    """Whether the trial failed as "interrupted": it is run again and never counts."""
    return trial.system_attrs.get(KIND_ATTR) == "interrupted"


def counts_against_budget(trial: FrozenTrial, retried: set[int]) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.number not in retried


_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # every one counts against n_trials


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """How many of the study's trials count against ``n_trials``. Run once per round of
    hand-outs on a shared storage, over every trial: the repeats are looked up only when a
    trial failed, which most studies' trials do not (one pass over the states instead of
    three over the user attributes: 6 ms a round at 2,000 trials)."""
    failed = [t for t in trials if t.state == TrialState.FAIL]
    ended = sum(t.state in _COUNTED for t in trials)
    if not failed:
        return ended
    retried = retried_numbers(trials)
    return ended + sum(counts_against_budget(t, retried) for t in failed)


class BudgetCount:
    """:func:`budget_used`, counted as the study grows instead of over every trial each time:
    a finished trial never changes, so each trial is looked at until it has finished, and a
    repeat names the trial it repeats when it is created. A count on a shared storage is taken
    before every round of hand-outs; over every trial, it cost a millisecond a round at 10,000
    trials (and more the larger the study), now it costs the trials that are new or still
    unfinished.

    ``trials`` must be the study's trials in creation order, as Optuna's storages list them:
    a trial keeps its place, and new ones come after."""

    def __init__(self) -> None:
        self._start_over()

    def _start_over(self) -> None:
        self._seen = 0  # the trials looked at, from the first
        self._unfinished: list[int] = []  # the places of those that had not finished yet
        self._ended = 0  # complete and pruned: every one counts
        self._failed: set[int] = set()  # failed and not repeated (yet): they count
        self._retried: set[int] = set()  # the numbers repeated by a later trial

    def used(self, trials: Sequence[FrozenTrial]) -> int:
        if len(trials) < self._seen:  # not the study it counted: count this one afresh
            self._start_over()
        new = range(self._seen, len(trials))
        for place in new:
            repeated = retry_of(trials[place])
            if repeated is not None:
                self._retried.add(repeated)
                self._failed.discard(repeated)
        places, self._unfinished = [*self._unfinished, *new], []
        self._seen = len(trials)
        for place in places:
            self._count(trials[place], place)
        return self._ended + len(self._failed)

    def _count(self, trial: FrozenTrial, place: int) -> None:
        if not trial.state.is_finished():
            self._unfinished.append(place)
        elif trial.state in _COUNTED:
            self._ended += 1
        elif trial.state == TrialState.FAIL and trial.number not in self._retried:
            self._failed.add(trial.number)


def first_attempt(trial: FrozenTrial) -> int:
    """The number of the first trial of this trial's chain of repeats (its own when it repeats
    none). A repeat enqueued before chains recorded their first attempt names the trial it
    repeats, which is the best there is without reading the chain."""
    repeats = retry_of(trial)
    if repeats is None:  # hyperfleet writes a first attempt only on a repeat
        return trial.number
    first = _trial_number(trial.user_attrs.get(FIRST_ATTEMPT_ATTR), repeats + 1)
    return repeats if first is None else first


def ended_at(trial: FrozenTrial) -> datetime.datetime | None:
    """When the trial really ended: Optuna's end time, or for a trial a dead controller left
    running, when it was last known to run (never before its start nor after Optuna's end)."""
    end, start = trial.datetime_complete, trial.datetime_start
    stopped = trial.system_attrs.get(STOPPED_AT_ATTR)
    if end is None or start is None or not isinstance(stopped, (int, float)):
        return end
    if isinstance(stopped, bool):
        return end
    try:
        seen = datetime.datetime.fromtimestamp(stopped)
    except (OverflowError, OSError, ValueError):
        return end
    return min(end, max(start, seen))


def stored_study_id(storage: BaseStorage | None, study_name: str) -> int | None:
    """The id of a study already in ``storage``, or None when there is no such study; reads
    only, so it may run before bad input is ruled out."""
    if storage is None:
        return None
    try:
        return storage.get_study_id_from_name(study_name)
    except KeyError:
        return None


def stored_trials(storage: BaseStorage | None, study_name: str) -> list[FrozenTrial] | None:
    """The trials of a study already in ``storage``, or None when there is no such study."""
    study_id = stored_study_id(storage, study_name)
    if storage is None or study_id is None:
        return None
    return storage.get_all_trials(study_id, deepcopy=False)


def stored_time_used(storage: BaseStorage | None, study_name: str) -> float:
    """The seconds of its time budget the study used in earlier runs (0 for a new study)."""
    study_id = stored_study_id(storage, study_name)
    if storage is None or study_id is None:
        return 0.0
    return _time_used(storage, study_id)


def time_used_of(study: optuna.Study) -> float:
    """The seconds of its time budget an opened study used in earlier runs."""
    return _time_used(study._storage, study._study_id)  # no public accessors for either


def _time_used(storage: BaseStorage, study_id: int) -> float:
    stored = storage.get_study_system_attrs(study_id).get(TIME_USED_ATTR, 0.0)
    if isinstance(stored, bool) or not isinstance(stored, (int, float)):
        return 0.0  # not what hyperfleet writes: taken as no time used
    return float(stored) if math.isfinite(stored) and stored >= 0 else 0.0
