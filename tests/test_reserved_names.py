"""hyperfleet's own records (``hyperfleet.retry_of``, ``hyperfleet.first_attempt``,
``hyperfleet:*``) cannot be written by an objective, and a malformed one already stored (by an
older version that let objectives write them) never stops a run or a resume."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

import hyperfleet
from hyperfleet.controller import bookkeeping as books
from hyperfleet.store import schema
from support.searches import cpu_slots

OBJECTIVES = Path(__file__).parent / "objectives"
REASON = "hyperfleet:fail_reason"


@pytest.fixture
def attackers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # On sys.path, so the objective pickles by reference and workers import it the same way.
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("reserved_attrs")


def _study(path: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(path / "study.journal")))
    return optuna.create_study(study_name="s", storage=storage, load_if_exists=True)


def _optimize(study: optuna.Study, objective: object, n_trials: int, run_dir: Path) -> str:
    outcome = hyperfleet.optimize(
        study,
        objective,  # type: ignore[arg-type]
        n_trials=n_trials,
        run_dir=run_dir,
        display="quiet",
        report=False,
        inventory=cpu_slots(1),
        cpu_slots=1,
        keep_checkpoints="none",
    )
    return outcome.status


@pytest.mark.parametrize(
    "name",
    [
        "sets_first_attempt",
        "sets_a_string_first_attempt",
        "sets_retry_of",
        "enqueues_a_fake_retry",
        "sets_a_system_mark",
        "sets_study_campaign_label",
    ],
)
def test_an_objective_cannot_write_hyperfleets_records(
    attackers: ModuleType, tmp_path: Path, name: str
) -> None:
    study = _study(tmp_path)
    assert _optimize(study, getattr(attackers, name), 4, tmp_path / "run") == "completed"
    trials = study.get_trials()
    # The trial that tried failed alone, saying why; nothing it wrote was stored.
    states = [t.state for t in trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert "hold hyperfleet's own records" in trials[1].system_attrs[REASON]
    for trial in trials:
        assert not any(schema.is_reserved(key) for key in trial.user_attrs)
        assert not isinstance(trial.system_attrs.get(schema.RUN_ATTR), dict)
    assert "hyperfleet:campaign" not in study.user_attrs
    # The study resumes, and a second run adds to it.
    assert _optimize(study, getattr(attackers, name), 6, tmp_path / "run") == "completed"
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 5


def test_names_that_only_look_like_hyperfleets_are_the_objectives(
    attackers: ModuleType, tmp_path: Path
) -> None:
    study = _study(tmp_path)
    assert _optimize(study, attackers.sets_its_own_names, 2, tmp_path / "run") == "completed"
    assert [t.user_attrs for t in study.get_trials()] == [
        {"hyperfleet": 1, "my.hyperfleet.retry_of": 2}
    ] * 2


def _stored(number: int, state: TrialState, **user_attrs: object) -> optuna.trial.FrozenTrial:
    values = {TrialState.COMPLETE: 0.5}.get(state)
    trial = create_trial(
        state=state,
        value=values,
        params={"x": 0.5},
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        user_attrs=user_attrs,
    )
    return trial


def test_malformed_stored_records_are_read_as_absent(attackers: ModuleType, tmp_path: Path) -> None:
    # What an older version let objectives write: a dict, a string, a retry of itself, a retry of
    # a later trial, a first attempt taken from another chain; and a study time that is no number.
    study = _study(tmp_path)
    study.add_trial(_stored(0, TrialState.COMPLETE))
    study.add_trial(_stored(1, TrialState.FAIL, **{schema.RETRY_ATTR: {"a": 1}}))
    study.add_trial(_stored(2, TrialState.FAIL, **{schema.RETRY_ATTR: 2}))
    study.add_trial(
        _stored(3, TrialState.FAIL, **{schema.RETRY_ATTR: 9, "hyperfleet.first_attempt": "x"})
    )
    study.add_trial(_stored(4, TrialState.COMPLETE, **{schema.FIRST_ATTEMPT_ATTR: 0}))
    study.add_trial(_stored(5, TrialState.COMPLETE, **{schema.RETRY_ATTR: True}))
    study._storage.set_study_system_attr(study._study_id, schema.TIME_USED_ATTR, "soon")
    trials = study.get_trials()
    assert schema.retried_numbers(trials) == set()
    assert [schema.first_attempt(t) for t in trials] == [0, 1, 2, 3, 4, 5]
    assert schema.budget_used(trials) == 6  # no failure is taken as repeated
    assert schema.time_used_of(study) == 0.0
    (tmp_path / "run" / "checkpoints" / "0").mkdir(parents=True)
    assert _optimize(study, attackers.sets_its_own_names, 8, tmp_path / "run") == "completed"
    assert len(study.get_trials()) == 8


def test_a_malformed_campaign_label_is_read_as_none(tmp_path: Path) -> None:
    from hyperfleet.report.campaign import CAMPAIGN_ATTR, study_row

    study = _study(tmp_path)
    study.add_trial(_stored(0, TrialState.COMPLETE))
    for label in ("not a label", {"family": "f", "matrix": [1, 2]}):
        study.set_user_attr(CAMPAIGN_ATTR, label)
        row = study_row(study, study.get_trials())
        assert row.matrix == {} and row.trials == 1


def test_an_experiment_attribute_that_is_no_name_does_not_stop_a_campaign(tmp_path: Path) -> None:
    from hyperfleet.app.campaign_search import _enqueue_experiments
    from hyperfleet.campaign.spec import Experiment

    study = _study(tmp_path)
    study.add_trial(_stored(0, TrialState.COMPLETE, experiment={"set": "by an objective"}))
    study.add_trial(_stored(1, TrialState.COMPLETE, experiment="done"))
    _enqueue_experiments(study, (Experiment("done", {"x": 0.1}), Experiment("new", {"x": 0.2})))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[schema.EXPERIMENT_ATTR] for t in waiting] == ["new"]


def test_enqueued_parameters_that_are_no_dict_are_read_as_none() -> None:
    trial = create_trial(
        state=TrialState.FAIL,
        params={"x": 0.5},
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
        system_attrs={"fixed_params": "not a dict"},
    )
    assert books.intended_params(trial) == {"x": 0.5}
