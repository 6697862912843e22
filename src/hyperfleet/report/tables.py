"""The trials as rows: ``all_trials.csv``, ``top_trials.csv`` and the report's table.

One row per trial with its number, state, the named experiment it ran (a campaign's
``experiments`` and ``grid``; only when a trial ran one), value(s), parameters
(``param_<name>``), slot, start, end, duration and failure reason: all straight from the storage.
"""

from __future__ import annotations

import csv
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.store.schema import EXPERIMENT_ATTR, REASON_ATTR, SLOT_ATTR, ended_at


def value_columns(study: optuna.Study) -> list[str]:
    if len(study.directions) == 1:
        return ["value"]
    names = study.metric_names or [f"value_{i}" for i in range(len(study.directions))]
    return [str(n) for n in names]


def param_names(trials: list[FrozenTrial]) -> list[str]:
    names: dict[str, None] = {}
    for trial in trials:
        names.update(dict.fromkeys(trial.params))
    return list(names)


def columns(study: optuna.Study, trials: list[FrozenTrial]) -> list[str]:
    experiments = any(EXPERIMENT_ATTR in t.user_attrs for t in trials)
    return [
        "number",
        "state",
        *(["experiment"] if experiments else []),
        *value_columns(study),
        *[f"param_{p}" for p in param_names(trials)],
        "slot",
        "start",
        "end",
        "duration_s",
        "reason",
    ]


def trial_row(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    row: dict[str, Any] = {"number": trial.number, "state": trial.state.name}
    if EXPERIMENT_ATTR in trial.user_attrs:  # the column exists only when a trial has one
        row["experiment"] = trial.user_attrs[EXPERIMENT_ATTR]
    values = trial.values or [None] * len(study.directions)
    row.update(zip(value_columns(study), values, strict=True))
    row.update({f"param_{name}": value for name, value in trial.params.items()})
    row["slot"] = trial.system_attrs.get(SLOT_ATTR, "")
    row["start"] = _iso(trial.datetime_start)
    row["end"] = _iso(ended_at(trial))
    row["duration_s"] = duration_seconds(trial)
    row["reason"] = trial.system_attrs.get(REASON_ATTR, "")
    return row


def experiments(trials: list[FrozenTrial]) -> dict[str, FrozenTrial]:
    """Each named experiment's latest trial (a repeat replaces a failed one), in the order the
    experiments first ran."""
    latest: dict[str, FrozenTrial] = {}
    for trial in trials:
        name = trial.user_attrs.get(EXPERIMENT_ATTR)
        if name is not None:
            latest[str(name)] = trial
    return latest


def duration_seconds(trial: FrozenTrial) -> float | None:
    """How long the trial ran (a trial a dead controller left running: until it was last known
    to run, not until the resume that marked it interrupted)."""
    end = ended_at(trial)
    if trial.datetime_start is None or end is None:
        return None
    return round((end - trial.datetime_start).total_seconds(), 3)


def _iso(stamp: datetime.datetime | None) -> str:
    return stamp.isoformat(timespec="seconds") if stamp is not None else ""


def top_trials(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """The ``n`` best complete trials; with several objectives, the Pareto front first, then
    the rest by the first objective."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1.0 if study.directions[0] == StudyDirection.MINIMIZE else -1.0
    by_first = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
    if len(study.directions) == 1:
        return by_first[:n]
    front = {t.number for t in study.best_trials}
    ordered = [t for t in by_first if t.number in front] + [
        t for t in by_first if t.number not in front
    ]
    return ordered[:n]


def write_csv(path: Path, study: optuna.Study, trials: list[FrozenTrial]) -> None:
    all_trials = study.get_trials(deepcopy=False)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns(study, all_trials), restval="")
        writer.writeheader()
        for trial in trials:
            writer.writerow(trial_row(study, trial))


# ----- the slots' timeline -------------------------------------------------------------------


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials with both a start and an end: what the timeline and the histogram show."""
    return finished_of(study.get_trials(deepcopy=False))


def finished_of(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.datetime_start is not None and t.datetime_complete is not None]


def slot_of(trial: FrozenTrial) -> str:
    return str(trial.system_attrs.get(SLOT_ATTR, "")) or "unknown"


def busy_seconds(trials: list[FrozenTrial]) -> dict[str, float]:
    """Each slot's time spent running the given trials, by slot name."""
    busy: dict[str, float] = {}
    for trial in trials:
        busy[slot_of(trial)] = busy.get(slot_of(trial), 0.0) + (duration_seconds(trial) or 0.0)
    return dict(sorted(busy.items()))


def busy_fractions(trials: list[FrozenTrial]) -> dict[str, float]:
    """Each slot's busy share: its busy time over the time the search ran trials (see
    :func:`running_seconds`), as summary.md counts it for a run."""
    if not trials:
        return {}
    span = max(1e-9, running_seconds(trials))
    return {slot: min(1.0, seconds / span) for slot, seconds in busy_seconds(trials).items()}


def running_seconds(trials: list[FrozenTrial], now: datetime.datetime | None = None) -> float:
    """The time at least one of the trials ran: the union of their spans (a trial still
    running until ``now``), so the gap between a stopped run and its resume does not count,
    nor do trials running side by side twice."""
    spans = []
    for trial in trials:
        end = ended_at(trial) or (now if trial.state == TrialState.RUNNING else None)
        if trial.datetime_start is not None and end is not None:
            spans.append((trial.datetime_start.timestamp(), end.timestamp()))
    return union_seconds(spans)


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` spans, in seconds."""
    total, reached = 0.0, None
    for start, end in sorted(spans):
        start = start if reached is None else max(start, reached)
        if end > start:
            total += end - start
            reached = end
    return total


# ----- the nodes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRow:
    """One node of a run on many machines: its slots that ran trials, their trials, and their
    mean busy share (of the time the search ran trials, as each slot's)."""

    node: str
    slots: int
    trials: int
    busy_share: float


def node_rows(trials: list[FrozenTrial]) -> list[NodeRow]:
    """A row per node the finished ``trials`` ran on (``node3`` of the slot ``node3/gpu0#1``);
    none on a single machine."""
    fractions = busy_fractions(trials)
    counts: dict[str, int] = {}
    for trial in trials:
        counts[slot_of(trial)] = counts.get(slot_of(trial), 0) + 1
    by_node: dict[str, list[str]] = {}
    for slot in fractions:
        node = slot.rpartition("/")[0]
        if node:
            by_node.setdefault(node, []).append(slot)
    return [
        NodeRow(
            node,
            len(slots),
            sum(counts[slot] for slot in slots),
            sum(fractions[slot] for slot in slots) / len(slots),
        )
        for node, slots in sorted(by_node.items())
    ]
