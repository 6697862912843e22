"""The count of a shared study's trials against ``n_trials``, kept as the study grows: after
every change two writers make to a real journal, it says what counting every trial says."""

from __future__ import annotations

import random
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from hyperfleet.store import schema

ENDS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _writers(path: Path) -> tuple[optuna.Study, optuna.Study]:
    """The same study opened twice on one journal file, as two processes would."""
    first = optuna.create_study(
        study_name="shared", storage=JournalStorage(JournalFileBackend(str(path)))
    )
    other = optuna.load_study(
        study_name="shared", storage=JournalStorage(JournalFileBackend(str(path)))
    )
    return first, other


def _step(rng: random.Random, study: optuna.Study, open_ids: list[int]) -> None:
    """One change a run makes: start a trial, end one it runs, or queue a repeat of a failed
    trial (as the retry policy does)."""
    action = rng.random()
    storage = study._storage
    if action < 0.45 or not open_ids:
        open_ids.append(study.ask()._trial_id)
    elif action < 0.85:
        trial_id = open_ids.pop(rng.randrange(len(open_ids)))
        state = rng.choice(ENDS)
        values = [1.0] if state == TrialState.COMPLETE else None
        storage.set_trial_state_values(trial_id, state, values)
    else:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if failed:
            repeated = rng.choice(failed).number
            study.enqueue_trial({}, user_attrs={schema.RETRY_ATTR: repeated})


def test_the_kept_count_equals_a_count_of_every_trial_through_two_writers_changes(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    first, other = _writers(tmp_path / "optuna.journal")
    count = schema.BudgetCount()
    open_ids: dict[int, list[int]] = {0: [], 1: []}
    seen = set()
    for _ in range(400):
        writer = rng.randrange(2)
        _step(rng, (first, other)[writer], open_ids[writer])
        trials = first.get_trials(deepcopy=False)
        assert count.used(trials) == schema.budget_used(trials)
        seen.add(schema.budget_used(trials))
    # The walk went through every kind of change: repeats taken back, and trials left open.
    trials = first.get_trials(deepcopy=False)
    assert schema.retried_numbers(trials)
    assert any(t.state == TrialState.RUNNING for t in trials)
    assert len(seen) > 50


def test_a_failed_trial_stops_counting_once_a_repeat_of_it_appears() -> None:
    study = optuna.create_study()
    count = schema.BudgetCount()
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    assert count.used(study.get_trials(deepcopy=False)) == 1
    study.enqueue_trial({}, user_attrs={schema.RETRY_ATTR: failed.number})
    assert count.used(study.get_trials(deepcopy=False)) == 0
    repeat = study.ask()
    study.tell(repeat, 2.0)
    assert count.used(study.get_trials(deepcopy=False)) == 1


def test_another_studys_trials_are_counted_afresh() -> None:
    count = schema.BudgetCount()
    big, small = optuna.create_study(), optuna.create_study()
    for study, n in ((big, 5), (small, 2)):
        for _ in range(n):
            study.tell(study.ask(), 1.0)
    assert count.used(big.get_trials(deepcopy=False)) == 5
    assert count.used(small.get_trials(deepcopy=False)) == 2
