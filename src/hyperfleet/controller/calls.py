"""What an objective may call on its trial and on ``trial.study``, through the worker's proxy.

Anything else (``study.tell``, ``study.ask``, ``study.optimize``, a bound method that would
carry the storage to the worker) would let the objective write the storage behind the
controller's back, so it is refused with an error the objective sees.
"""

from __future__ import annotations

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
_STUDY_METHODS = frozenset({"set_user_attr", "set_system_attr", "get_trials", "enqueue_trial"})
_STUDY_ATTRS = frozenset(
    {"best_trial", "best_trials", "best_value", "best_params", "trials", "user_attrs",
     "system_attrs", "study_name", "directions", "direction", "metric_names"}
)  # fmt: skip
# Answered by the controller itself, not by Optuna (see hyperfleet.checkpoints).
_HYPERFLEET_QUESTIONS = frozenset({"should_stop"})
_ALLOWED = {
    "hyperfleet": _HYPERFLEET_QUESTIONS,
    "trial": _TRIAL_METHODS,
    "trial_attr": _TRIAL_ATTRS,
    "study": _STUDY_METHODS,
    "study_attr": _STUDY_ATTRS,
}


def check_call_allowed(call: Call) -> None:
    allowed = _ALLOWED.get(call.target, frozenset())
    if call.name not in allowed:
        owner = "trial" if call.target.startswith("trial") else "trial.study"
        raise RuntimeError(
            f"hyperfleet: {owner}.{call.name} is not available inside an objective run by "
            "hyperfleet: the controller asks and tells every trial itself (return the value "
            f"instead of calling tell). Available: {', '.join(sorted(allowed))}."
        )
