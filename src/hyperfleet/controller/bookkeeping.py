"""What the controller writes about trials: reasons, retries, the budget and trial folders.

Everything here reads or writes storage through the study the controller owns. Markers live in
trial system attributes (``hyperfleet:*``), except which trial a retry repeats, which is a user
attribute so that it is set in the same write that creates the retry.

Names that start with ``hyperfleet.`` or ``hyperfleet:`` are hyperfleet's own: an objective's
write of one is refused (see controller.calls), and every record is read here defensively, so
a value that is not what hyperfleet writes (a study an older version let an objective write
into) is taken as absent rather than crashing the controller or a resume.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.study import _tell as optuna_tell
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.config import RetryPolicy
from hyperfleet.rundir import tail, write_json
from hyperfleet.state import TrialRecord

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


def set_system_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    # Optuna exposes no public setter for system attributes; the trial's storage is public.
    trial.storage.set_trial_system_attr(trial._trial_id, key, value)


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


def objective_values(study: optuna.Study, value: Any) -> tuple[list[float] | None, str]:
    """The objective's return value as the floats ``study.tell`` takes, or (None, why not).

    Everything a user's objective may return is checked here, so that no value can make the
    controller's ``tell`` raise: strings (even "1.5"), numbers too large for a float, NaN, the
    wrong number of values.
    """
    if value is None:
        return None, "the objective returned None, not a number"
    values: Sequence[Any] = value if isinstance(value, (list, tuple)) else [value]
    if len(values) != len(study.directions):
        return None, (
            f"the objective returned {len(values)} value(s) but the study has "
            f"{len(study.directions)} objective(s)"
        )
    floats = []
    for v in values:
        number, problem = _as_float(v)
        if number is None:
            return None, problem
        floats.append(number)
    return floats, ""


def _as_float(value: Any) -> tuple[float | None, str]:
    shown = _short_repr(value)
    if isinstance(value, (str, bytes)):  # float("1.5") works, Optuna's tell does not
        return None, f"the objective returned {shown}, a string, not a number"
    try:
        number = float(value)
    except OverflowError:
        return None, f"the objective returned {shown}, a number too large for a float"
    except (TypeError, ValueError):
        return None, f"the objective returned {shown}, a {type(value).__name__}, not a number"
    if math.isnan(number):
        return None, "the objective returned NaN"
    return number, ""


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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


_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # every one counts against n_trials


def counts_against_budget(trial: FrozenTrial, retried: set[int]) -> bool:
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.number not in retried


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


def attempts_before(trials: Sequence[FrozenTrial], trial: FrozenTrial, kind: str) -> int:
    """How many earlier attempts of this trial's parameters failed with ``kind``, following
    the chain of retries (interrupted attempts in the chain do not count against the others)."""
    count, current = 0, trial
    while (earlier := retry_of(current)) is not None and earlier < len(trials):
        more_room = current.user_attrs.get(ROOM_RERUN_ATTR) is True
        current = trials[earlier]
        count += current.system_attrs.get(KIND_ATTR) == kind and not more_room
    return count


def repeats_due(trials: Sequence[FrozenTrial], policy: RetryPolicy) -> bool:
    """Whether a failed trial not yet repeated is one the policy repeats (on a resume, with a
    policy that allows more retries than the run that failed it)."""
    retried = retried_numbers(trials)
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.number not in retried:
            kind = str(trial.system_attrs.get(KIND_ATTR, "error"))
            if _policy_repeats(trials, trial, kind, policy):
                return True
    return False


def _policy_repeats(
    trials: Sequence[FrozenTrial], trial: FrozenTrial, kind: str, policy: RetryPolicy
) -> bool:
    return policy.allows(kind, attempts_before(trials, trial, kind))


def maybe_retry(study: optuna.Study, trial: FrozenTrial, kind: str, policy: RetryPolicy) -> bool:
    """Enqueue the trial's parameters again if the policy allows; True when it did."""
    if not _policy_repeats(study.get_trials(deepcopy=False), trial, kind, policy):
        return False
    _enqueue_again(study, trial, {})
    return True


def rerun_with_more_room(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue the parameters of a trial that ran out of memory on a shared GPU, whatever the
    retry policy: with fewer trials beside it, it may fit."""
    _enqueue_again(study, trial, {ROOM_RERUN_ATTR: True})


def _enqueue_again(study: optuna.Study, trial: FrozenTrial, extra: dict[str, Any]) -> None:
    attrs: dict[str, Any] = {
        RETRY_ATTR: trial.number,
        FIRST_ATTEMPT_ATTR: first_attempt(trial),
        **extra,
    }
    if EXPERIMENT_ATTR in trial.user_attrs:  # a repeated experiment keeps its name
        attrs[EXPERIMENT_ATTR] = trial.user_attrs[EXPERIMENT_ATTR]
    study.enqueue_trial(intended_params(trial), user_attrs=attrs)


def first_attempt(trial: FrozenTrial) -> int:
    """The number of the first trial of this trial's chain of repeats (its own when it repeats
    none). A repeat enqueued before chains recorded their first attempt names the trial it
    repeats, which is the best there is without reading the chain."""
    repeats = retry_of(trial)
    if repeats is None:  # hyperfleet writes a first attempt only on a repeat
        return trial.number
    first = _trial_number(trial.user_attrs.get(FIRST_ATTEMPT_ATTR), repeats + 1)
    return repeats if first is None else first


def inherit_history(study: optuna.Study, trial: optuna.Trial, stored: FrozenTrial) -> set[int]:
    """Give a repeat the intermediate values its earlier attempts reported, so that pruners
    judge it on the whole curve; the steps it inherited are returned.

    Every earlier attempt of the chain is read, not only the one it repeats: a controller
    killed while it copied them into that one left it only part of the curve. A step reported
    by several attempts keeps the first value, as ``trial.report`` keeps the first report."""
    storage, study_id = study._storage, study._study_id  # no public accessors for either
    earlier: list[FrozenTrial] = []
    number = retry_of(stored)
    while number is not None:
        found = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
        earlier.append(found)
        number = retry_of(found)
    values: dict[int, float] = {}
    for attempt in reversed(earlier):  # the first attempt first
        for step, value in attempt.intermediate_values.items():
            values.setdefault(step, value)
    for step in sorted(values):
        storage.set_trial_intermediate_value(trial._trial_id, step, values[step])
    # The trial object caches what it reported: its pruner and report() must see these too.
    trial._cached_frozen_trial.intermediate_values.update(values)
    return set(values)


def intended_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters the trial was meant to run with: those it was enqueued with (a retry killed
    before its first suggest has no params yet) updated with those it suggested."""
    fixed = trial.system_attrs.get("fixed_params")  # where Optuna keeps enqueued params
    return {**(fixed if isinstance(fixed, dict) else {}), **trial.params}


def fail_interrupted_leftovers(
    study: optuna.Study,
    run_marks: Collection[str],
    private_storage: bool = False,
    started: Callable[[int], bool] = lambda number: False,
    last_seen: Callable[[int], float | None] = lambda number: None,
) -> list[FrozenTrial]:
    """Mark trials a dead controller of this run directory left RUNNING as failed, "interrupted".

    A trial is ours when it carries one of this run directory's marks (see ``RunDir.marks``).
    With ``private_storage`` (the run directory's own journal, which no one else writes) so is
    an unmarked one: the controller died between asking for it and marking it.

    So is a prepared trial (see controller.prepared) that is still enqueued although it was
    ``started`` (its folder exists): the controller died after sending it and before its start
    was on disk. It ends as interrupted too, and its repeat gets a number of its own, rather
    than running again under the same number.

    ``last_seen`` says when a trial was last known to run (see :func:`last_sign_of_life`): it
    is kept as the trial's real end (see :func:`ended_at`).
    """
    storage = study._storage  # the study's storage has no public accessor
    failed = []
    states = (TrialState.RUNNING, TrialState.WAITING)
    for trial in study.get_trials(deepcopy=False, states=states):
        owner = trial.system_attrs.get(RUN_ATTR)
        owner = owner if isinstance(owner, str) else None  # a mark is a string, or none
        if trial.state == TrialState.WAITING and not (owner in run_marks and started(trial.number)):
            continue  # enqueued, and never sent: the next ask takes it
        if owner not in run_marks and not (private_storage and owner is None):
            continue  # another run directory's controller may be running it right now
        reason = "interrupted: the controller stopped during the trial"
        seen = last_seen(trial.number)
        if seen is not None and trial.datetime_start is not None:
            stopped = max(seen, trial.datetime_start.timestamp())
            storage.set_trial_system_attr(trial._trial_id, STOPPED_AT_ATTR, stopped)
        _set_failure(storage, trial._trial_id, "interrupted", reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        failed.append(trial)
    return failed


def last_sign_of_life(trial_dir: Path, controller_seen: float | None) -> float | None:
    """When a trial a dead controller left running was last known to run: the later of the
    controller's last status write (``controller_seen``) and the trial's last output."""
    times = [controller_seen] if controller_seen is not None else []
    for name in ("stdout.log", "stderr.log"):
        with contextlib.suppress(OSError):
            times.append((trial_dir / name).stat().st_mtime)
    return max(times, default=None)


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


def store_time_used(study: optuna.Study, seconds: float) -> None:
    # Optuna exposes no public setter for a study's system attributes.
    study._storage.set_study_system_attr(study._study_id, TIME_USED_ATTR, round(seconds, 3))


def record_from_frozen(study_name: str, trial: FrozenTrial) -> TrialRecord:
    start = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    ended = ended_at(trial)
    end = ended.timestamp() if ended is not None else None
    experiment = trial.user_attrs.get(EXPERIMENT_ATTR)
    return TrialRecord(
        study=study_name,
        number=trial.number,
        slot=str(trial.system_attrs.get(SLOT_ATTR, "")),
        state=trial.state.name,
        params=dict(trial.params),
        values=list(trial.values) if trial.values is not None else None,
        reason=str(trial.system_attrs.get(REASON_ATTR, "")),
        fail_kind=str(trial.system_attrs.get(KIND_ATTR, "")),
        start=start,
        end=end,
        retry_of=retry_of(trial),
        experiment=str(experiment) if experiment is not None else "",
    )


def write_trial_files(trial_dir: Path, record: TrialRecord, traceback_text: str = "") -> None:
    """``params.json`` and ``result.json``: the trial's story without hyperfleet or Optuna."""
    write_json(trial_dir / "params.json", record.params)
    result: dict[str, Any] = {
        "number": record.number,
        "study": record.study,
        "state": record.state,
        "values": record.values,
        "reason": record.reason,
        "fail_kind": record.fail_kind,
        "slot": record.slot,
        "start": _iso(record.start),
        "end": _iso(record.end),
        "duration_s": record.duration,
        "retry_of": record.retry_of,
    }
    if record.experiment:
        result["experiment"] = record.experiment
    if record.state == "FAIL":
        result["traceback"] = traceback_text
        result["stderr_tail"] = tail(trial_dir / "stderr.log", 2000)
    write_json(trial_dir / "result.json", result)


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")


def store_end(
    study: optuna.Study,
    trial: optuna.Trial,
    state: TrialState,
    values: Any,
    kind: str,
    reason: str,
    traceback_text: str,
) -> optuna.trial.FrozenTrial:
    """Record how the trial ended. Whatever the objective did, this never raises for the
    trial's sake: if Optuna refuses the result, the trial is failed with the refusal as its
    reason. Only a failing storage (OSError: a full disk, a vanished file) propagates."""
    try:
        if state == TrialState.FAIL:
            _set_failure(trial.storage, trial._trial_id, kind, reason, traceback_text)
        return _tell(study, trial, values if state == TrialState.COMPLETE else None, state)
    except OSError:
        raise
    except Exception as exc:
        return _fail_refused(study, trial, exc)


# ``study.tell`` is this, then a deep copy of the trial for its caller: a tenth of the loop's time
# at hundreds of slots, for a trial the controller only reads. Optuna's own function is private,
# so it is used only where its parameters are the ones known here, and the storage's trial
# read instead (Optuna's storages hand back a trial that is not changed afterwards in place).
_TELL_WITH_WARNING = getattr(optuna_tell, "_tell_with_warning", None)
if _TELL_WITH_WARNING is not None and not {"study", "trial", "value_or_values", "state"} <= set(
    inspect.signature(_TELL_WITH_WARNING).parameters
):
    _TELL_WITH_WARNING = None  # another Optuna's: study.tell, copy and all


def _tell(
    study: optuna.Study, trial: optuna.Trial, values: Any, state: TrialState
) -> optuna.trial.FrozenTrial:
    if _TELL_WITH_WARNING is None:
        return study.tell(trial, values, state=state)
    _TELL_WITH_WARNING(study=study, trial=trial, value_or_values=values, state=state)
    return study._storage.get_trial(trial._trial_id)  # no public accessor for either


def _fail_refused(
    study: optuna.Study, trial: optuna.Trial, exc: Exception
) -> optuna.trial.FrozenTrial:
    storage, trial_id = study._storage, trial._trial_id  # no public accessor for either
    stored = storage.get_trial(trial_id)
    if stored.state.is_finished():  # told already (a sampler's after_trial raised, say)
        return stored
    reason = f"Optuna refused the trial's result: {type(exc).__name__}: {exc}"
    _set_failure(storage, trial_id, "error", reason)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return storage.get_trial(trial_id)


def _set_failure(
    storage: BaseStorage, trial_id: int, kind: str, reason: str, traceback_text: str = ""
) -> None:
    """Why a trial failed, in the system attributes every view and ``result.json`` read."""
    storage.set_trial_system_attr(trial_id, KIND_ATTR, kind)
    storage.set_trial_system_attr(trial_id, REASON_ATTR, reason)
    if traceback_text:
        storage.set_trial_system_attr(trial_id, TRACEBACK_ATTR, traceback_text[-8000:])
