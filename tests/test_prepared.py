"""Next trials prepared while their slot runs (hyperfleet.controller.prepared): a slot whose trial
ends starts the next one at once, and the study holds exactly what it would hold without them."""

from __future__ import annotations

import datetime
import importlib
import itertools
import json
from pathlib import Path
from types import ModuleType

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from support.searches import optimize_on_cpu_slots

OBJECTIVES = Path(__file__).parent / "objectives"
CREATE_TRIAL, SET_TRIAL_STATE = 4, 6  # Optuna's journal operations
SLOT_ATTR = "hyperfleet:slot"


@pytest.fixture
def objectives(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))  # workers import it by name
    return importlib.import_module("ahead_objective")


def search(
    objective: object,
    sampler: optuna.samplers.BaseSampler,
    slots: int,
    n_trials: int,
    tmp: Path,
    enqueued: tuple[dict[str, object], ...] = (),
) -> tuple[list[FrozenTrial], list[dict]]:
    """The trials of a search on a journal file, and the journal's records."""
    journal = tmp / "study.journal"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="prepared", storage=storage, sampler=sampler)
    for params in enqueued:
        study.enqueue_trial(params)
    optimize_on_cpu_slots(study, objective, n_trials, slots, tmp / "run")
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    return study.get_trials(), records


def prepared_ids(records: list[dict]) -> list[int]:
    """The trials hyperfleet prepared: created enqueued, with the slot they are for (one
    study: ids in creation order)."""
    created = [r for r in records if r["op_code"] == CREATE_TRIAL]
    return [
        i
        for i, r in enumerate(created)
        if r["state"] == TrialState.WAITING and SLOT_ATTR in r["system_attrs"]
    ]


def test_slots_start_their_prepared_trials_and_the_study_is_as_without(
    objectives: ModuleType, tmp_path: Path
) -> None:
    n_trials = 16
    trials, records = search(
        objectives.fixed_space, optuna.samplers.RandomSampler(seed=2), 2, n_trials, tmp_path
    )

    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials
    prepared = prepared_ids(records)
    assert len(prepared) >= n_trials - 4, prepared  # all but the first trials of each slot
    starts = [r["trial_id"] for r in records if r["op_code"] == SET_TRIAL_STATE and r["state"] == 0]
    assert sorted(starts) == prepared  # each prepared trial started once
    for trial in trials:
        assert trial.params == trial.user_attrs["seen"]


def test_a_prepared_trial_starts_when_its_slot_starts_it(
    objectives: ModuleType, tmp_path: Path
) -> None:
    # Not when it was prepared, right after the slot's trial before it started: each trial
    # takes 0.2 s, so a slot's next trial starts at least that much later.
    trials, records = search(
        objectives.takes_a_while, optuna.samplers.RandomSampler(seed=3), 2, 8, tmp_path
    )

    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert len(prepared_ids(records)) >= 4
    by_slot: dict[str, list[datetime.datetime]] = {}
    for trial in trials:
        assert trial.datetime_start is not None
        by_slot.setdefault(trial.system_attrs[SLOT_ATTR], []).append(trial.datetime_start)
    assert len(by_slot) == 2
    for starts in by_slot.values():
        starts.sort()
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
        assert min(gaps) >= 0.2, gaps


def test_enqueued_trials_run_before_any_prepared_one(
    objectives: ModuleType, tmp_path: Path
) -> None:
    enqueued = tuple({"x": float(i), "n": 2, "kind": "a"} for i in range(5))
    trials, records = search(
        objectives.fixed_space, optuna.samplers.RandomSampler(seed=4), 2, 10, tmp_path, enqueued
    )

    assert [t.state for t in trials] == [TrialState.COMPLETE] * 10
    assert [t.params["x"] for t in trials[:5]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert min(prepared_ids(records)) >= 5
    last_enqueued = max(t.datetime_start for t in trials[:5])  # type: ignore[type-var]
    assert all(t.datetime_start > last_enqueued for t in trials[5:])  # type: ignore[operator]


def test_a_trial_another_process_enqueues_runs_before_the_budget_is_spent(
    objectives: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepared trials would otherwise go first for ever: the queue of a storage others share is
    # looked up again once a second.
    monkeypatch.setenv("TEST_JOURNAL", str(tmp_path / "study.journal"))
    trials, _ = search(
        objectives.enqueues_from_outside, optuna.samplers.RandomSampler(seed=6), 2, 60, tmp_path
    )

    assert [t.state for t in trials] == [TrialState.COMPLETE] * 60
    assert [t.params["x"] for t in trials].count(4.25) == 1


@pytest.mark.parametrize(
    ("sampler", "slots"),
    [
        (optuna.samplers.TPESampler(n_startup_trials=4, constant_liar=True, seed=1), 2),
        (optuna.samplers.RandomSampler(seed=1), 1),
    ],
    ids=["a sampler that learns", "one slot"],
)
def test_no_trial_is_prepared_where_the_order_matters(
    objectives: ModuleType, tmp_path: Path, sampler: optuna.samplers.BaseSampler, slots: int
) -> None:
    # TPE would see one more running trial per slot; one slot gives study.optimize's trials.
    trials, records = search(objectives.fixed_space, sampler, slots, 8, tmp_path)

    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert prepared_ids(records) == []
