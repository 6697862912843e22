"""What the controller writes about trials: reasons, retries, the budget and trial folders.

Everything here reads or writes storage through the study the controller owns. The attributes
it writes, and the pure readers of them, are the stored-trial schema
(:mod:`hyperfleet.store.schema`), which the reports read without this module.
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
from hyperfleet.display.runstate import TrialRecord
from hyperfleet.store.rundir import tail, write_json
from hyperfleet.store.schema import (
    EXPERIMENT_ATTR,
    FIRST_ATTEMPT_ATTR,
    KIND_ATTR,
    REASON_ATTR,
    RETRY_ATTR,
    ROOM_RERUN_ATTR,
    RUN_ATTR,
    SLOT_ATTR,
    STOPPED_AT_ATTR,
    TIME_USED_ATTR,
    TRACEBACK_ATTR,
    ended_at,
    first_attempt,
    retried_numbers,
    retry_of,
)


def set_system_attr(trial: optuna.Trial, key: str, value: Any) -> None:
    # Optuna exposes no public setter for system attributes; the trial's storage is public.
    trial.storage.set_trial_system_attr(trial._trial_id, key, value)


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
