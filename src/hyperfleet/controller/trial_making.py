"""What a trial is made of on its way to a slot: the marks of where it runs, the suggestions
sent with it, the message that starts it, its record for the views, and its folder."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.controller import ahead
from hyperfleet.controller import bookkeeping as books
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.slot_table import SlotTable
from hyperfleet.controller.study_run import StudyRun, opened
from hyperfleet.display.runstate import TrialRecord
from hyperfleet.store import schema
from hyperfleet.store.rundir import RunDir
from hyperfleet.workers.protocol import RunTrial, StudyInfo


def placement(run_dir: RunDir, slot: str, pid: int) -> dict[str, Any]:
    """The marks of where a trial runs, as its system attributes."""
    return {schema.RUN_ATTR: run_dir.identity, schema.SLOT_ATTR: slot, schema.PID_ATTR: pid}


def mark_placed(trial: optuna.Trial, marks: dict[str, Any]) -> FrozenTrial:
    """The trial as stored, once its marks of where it runs are the ones given (a queued trial
    was created with none, or with another slot's or run's)."""
    stored = trial.study._storage.get_trial(trial._trial_id)
    for key, value in marks.items():
        if stored.system_attrs.get(key) != value:
            books.set_system_attr(trial, key, value)
    return stored


def side_by_side(ctx: RunContext, slots: SlotTable) -> bool:
    """Whether trials run side by side: on nodes, or on more than one slot here."""
    return ctx.clustered or len(slots.slots) != 1


def sample_ahead(
    run: StudyRun,
    trial: optuna.Trial | None,
    stored: FrozenTrial,
    prepared: bool,
    side_by_side: bool,
    space: ahead.Space | None = None,
) -> ahead.Ahead:
    """The suggestions sent with a trial, where trials run side by side (``side_by_side``;
    with one slot and no nodes, a seeded sampler gives the trials study.optimize gives: none
    are sent). ``prepared``: its relative sample was computed off the loop's thread.
    ``space``: the study's, unless said."""
    if not side_by_side:
        return {}
    space = run.space if space is None else space
    return ahead.sample(opened(run), trial, stored, space or {}, prepared)


def with_others(suggestions: ahead.Ahead, others: ahead.Ahead, stored: FrozenTrial) -> ahead.Ahead:
    """``suggestions`` and the values a sampler process made ready for the space's other
    parameters, but for those the trial has fixed (an enqueued or a repeated trial): their
    ``suggest`` takes the fixed value."""
    if not others:
        return suggestions
    fixed = stored.system_attrs.get("fixed_params")
    fixed = fixed if isinstance(fixed, dict) else {}
    extra = {n: v for n, v in others.items() if n not in suggestions and n not in fixed}
    return {**suggestions, **extra}


def run_message(
    run: StudyRun,
    stored: FrozenTrial,
    start: datetime.datetime | None,
    suggestions: ahead.Ahead,
) -> RunTrial:
    study = opened(run)
    return RunTrial(
        objective=run.plan.name,
        number=stored.number,
        trial_dir=str(run.plan.folder.trial_dir(stored.number)),
        datetime_start=start,
        study=StudyInfo(study.study_name, tuple(d.name for d in study.directions), study._study_id),
        checkpoint_dir=str(run.plan.folder.checkpoint_dir(schema.first_attempt(stored))),
        suggestions=suggestions,
        trial_id=stored._trial_id,
    )


def record_of(study: optuna.Study, stored: FrozenTrial) -> TrialRecord:
    """A running trial's record, for the views and the events."""
    experiment = stored.user_attrs.get(schema.EXPERIMENT_ATTR)
    return TrialRecord(
        study=study.study_name,
        number=stored.number,
        slot="",  # the slot's name, once it runs there (TrialStarts.begin)
        state="RUNNING",
        start=time.time(),
        retry_of=schema.retry_of(stored),
        experiment=str(experiment) if experiment is not None else "",
    )


class TrialFolders:
    """The trials' folders: a study's ``trials/`` folder is made with its first trial."""

    def __init__(self, run_dir: RunDir) -> None:
        self._run_dir = run_dir
        self._made: set[Path] = set()

    def trial_dir(self, run: StudyRun, number: int) -> Path:
        """The trial's folder, whose parent is made here for a study's first trial (the
        worker makes the trial's own)."""
        trial_dir = run.plan.folder.trial_dir(number)
        if trial_dir.parent not in self._made:
            self._run_dir.check_still_there()
            trial_dir.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(trial_dir.parent)
        return trial_dir
