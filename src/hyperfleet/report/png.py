"""PNG files of the key plots, drawn with matplotlib (for a README, a paper or a chat).

The Agg backend draws without a display; figures are closed after saving so a long-lived
process does not collect them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.report import tables
from hyperfleet.report.html import STATE_COLORS

DPI = 120


def write_pngs(folder: Path, study: optuna.Study) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    trials = tables.finished_trials(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    drawers = {
        "history.png": lambda ax: _history(ax, study, complete),
        "importances.png": lambda ax: _importances(ax, study),
        "timeline.png": lambda ax: _timeline(ax, trials),
        "durations.png": lambda ax: _durations(ax, trials),
    }
    if len(study.directions) > 1:
        drawers["pareto.png"] = lambda ax: _pareto(ax, study, complete)
    written = []
    for name, draw in drawers.items():
        if _save(folder / name, draw):
            written.append(folder / name)
    return written


def _save(path: Path, draw: Any) -> bool:
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI)
    try:
        drawn = draw(ax)
        if drawn:
            figure.tight_layout()
            figure.savefig(path)
        return bool(drawn)
    finally:
        plt.close(figure)


def _history(ax: Any, study: optuna.Study, complete: list[FrozenTrial]) -> bool:
    if not complete:
        return False
    name = tables.value_columns(study)[0]
    numbers = [t.number for t in complete]
    values = [t.values[0] for t in complete]
    pick = min if study.directions[0] == StudyDirection.MINIMIZE else max
    best = [pick(values[: i + 1]) for i in range(len(values))]
    ax.scatter(numbers, values, s=18, color="#1f77b4", label=name)
    ax.step(numbers, best, where="post", color="#d62728", label="best so far")
    ax.set(title="Optimisation history", xlabel="trial", ylabel=name)
    ax.legend()
    return True


def _importances(ax: Any, study: optuna.Study) -> bool:
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    try:
        importances = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return False  # too few trials or parameters
    if not importances:
        return False
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="#1f77b4")
    ax.set(title="Parameter importances", xlabel="importance")
    return True


def _timeline(ax: Any, trials: list[FrozenTrial]) -> bool:
    if not trials:
        return False
    fractions = tables.busy_fractions(trials)
    slots = list(fractions)
    origin = min(t.datetime_start for t in trials if t.datetime_start is not None)
    for trial in trials:
        assert trial.datetime_start is not None
        start = (trial.datetime_start - origin).total_seconds()
        ax.barh(
            slots.index(tables.slot_of(trial)),
            tables.duration_seconds(trial) or 0.0,
            left=start,
            color=STATE_COLORS.get(trial.state.name, "#999"),
            edgecolor="white",
        )
    ax.set_yticks(range(len(slots)), [f"{s} ({100 * fractions[s]:.0f}%)" for s in slots])
    ax.set(title="Trials per slot (busy share)", xlabel="seconds since the first trial")
    return True


def _durations(ax: Any, trials: list[FrozenTrial]) -> bool:
    groups = {
        state.name.lower(): [tables.duration_seconds(t) or 0.0 for t in trials if t.state == state]
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    groups = {name: values for name, values in groups.items() if values}
    if not groups:
        return False
    colors = [STATE_COLORS[name.upper()] for name in groups]
    ax.hist(list(groups.values()), bins=20, stacked=True, color=colors, label=list(groups))
    ax.set(title="Trial durations", xlabel="seconds", ylabel="trials")
    ax.legend()
    return True


def _pareto(ax: Any, study: optuna.Study, complete: list[FrozenTrial]) -> bool:
    if not complete:
        return False
    names = tables.value_columns(study)
    front = {t.number for t in study.best_trials}
    others = [t for t in complete if t.number not in front]
    best = [t for t in complete if t.number in front]
    ax.scatter([t.values[0] for t in others], [t.values[1] for t in others], s=16, color="#999")
    ax.scatter(
        [t.values[0] for t in best],
        [t.values[1] for t in best],
        s=24,
        color="#d62728",
        label="Pareto front",
    )
    ax.set(title="Pareto front", xlabel=names[0], ylabel=names[1])
    ax.legend()
    return True
