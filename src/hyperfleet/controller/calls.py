"""What an objective may call on its trial and on ``trial.study``, through the worker's proxy.

Anything else (``study.tell``, ``study.ask``, ``study.optimize``, a bound method that would
carry the storage to the worker) would let the objective write the storage behind the
controller's back, so it is refused with an error the objective sees. So is a write of an
attribute whose name is hyperfleet's own (``hyperfleet.retry_of``, ``hyperfleet:fail_kind``...):
the controller keeps its records of retries, slots and budgets there.
"""

from __future__ import annotations

from typing import Any

from hyperfleet.store.schema import RESERVED_PREFIXES, is_reserved
from hyperfleet.workers.protocol import Call

_TRIAL_METHODS = frozenset(
    {
        "suggest_float", "suggest_int", "suggest_categorical", "suggest_uniform",
        "suggest_loguniform", "suggest_discrete_uniform", "report", "should_prune",
        "set_user_attr", "set_system_attr", "set_constraint",
    }
)  # fmt: skip
_TRIAL_ATTRS = frozenset(
    {"params", "distributions", "user_attrs", "system_attrs", "constraints", "relative_params",
     "datetime_start", "number"}
)  # fmt: skip
_STUDY_METHODS = frozenset(
    {"set_user_attr", "set_system_attr", "get_trials", "enqueue_trial", "stop"}
)
_STUDY_ATTRS = frozenset(
    {"best_trial", "best_trials", "best_value", "best_params", "trials", "user_attrs",
     "system_attrs", "study_name", "directions", "direction", "metric_names"}
)  # fmt: skip
# Storage methods Optuna's helpers call through ``trial.storage`` (artifacts, the Terminator),
# each about the running trial or its study only.
_STORAGE_TRIAL_METHODS = frozenset(
    {"set_trial_system_attr", "set_trial_user_attr", "get_trial", "get_trial_system_attrs",
     "get_trial_user_attrs"}
)  # fmt: skip
_STORAGE_STUDY_METHODS = frozenset(
    {"set_study_system_attr", "set_study_user_attr", "get_study_system_attrs",
     "get_study_user_attrs"}
)  # fmt: skip
# Answered by the controller itself, not by Optuna (see hyperfleet.objective.resume).
_HYPERFLEET_QUESTIONS = frozenset({"should_stop"})
_ALLOWED = {
    "hyperfleet": _HYPERFLEET_QUESTIONS,
    "trial": _TRIAL_METHODS,
    "trial_attr": _TRIAL_ATTRS,
    "study": _STUDY_METHODS,
    "study_attr": _STUDY_ATTRS,
    "storage": _STORAGE_TRIAL_METHODS | _STORAGE_STUDY_METHODS,
}


_ATTR_SETTERS = frozenset({"set_user_attr", "set_system_attr"})
_STORAGE_SETTERS = frozenset(
    {"set_trial_system_attr", "set_trial_user_attr", "set_study_system_attr", "set_study_user_attr"}
)


def check_call_allowed(call: Call) -> None:
    allowed = _ALLOWED.get(call.target, frozenset())
    owner = {"storage": "trial.storage", "hyperfleet": "hyperfleet"}.get(
        call.target, "trial" if call.target.startswith("trial") else "trial.study"
    )
    if call.name not in allowed:
        raise RuntimeError(
            f"hyperfleet: {owner}.{call.name} is not available inside an objective run by "
            "hyperfleet: the controller asks and tells every trial itself (return the value "
            f"instead of calling tell). Available: {', '.join(sorted(allowed))}."
        )
    for key in _keys_written(call):
        if is_reserved(key):
            raise RuntimeError(
                f"hyperfleet: {owner}.{call.name} cannot set {key!r}: names that start with "
                f"{' or '.join(map(repr, RESERVED_PREFIXES))} hold hyperfleet's own records; "
                "choose another name."
            )


def storage_target_id(call: Call) -> tuple[str, Any]:
    """Whether a storage call is about a trial or a study, and the id it names."""
    kind = "trial" if call.name in _STORAGE_TRIAL_METHODS else "study"
    return kind, call.args[0] if call.args else call.kwargs.get(f"{kind}_id")


def _keys_written(call: Call) -> list[Any]:
    """The attribute names a call would write: a setter's key, an enqueued trial's user
    attributes (``enqueue_trial(params, user_attrs)``)."""
    if call.target in ("trial", "study") and call.name in _ATTR_SETTERS:
        return [call.args[0] if call.args else call.kwargs.get("key")]
    if call.target == "storage" and call.name in _STORAGE_SETTERS:
        return [call.args[1] if len(call.args) > 1 else call.kwargs.get("key")]
    if call.target == "study" and call.name == "enqueue_trial":
        attrs = call.args[1] if len(call.args) > 1 else call.kwargs.get("user_attrs")
        return list(attrs) if isinstance(attrs, dict) else []
    return []
