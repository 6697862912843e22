"""The objective gets a trial that behaves like ``optuna.Trial``: the same objective run through
hyperfleet and through ``study.optimize`` leaves the same trials in storage."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import hyperfleet
from hyperfleet.resources.inventory import Inventory

OBJECTIVES = Path(__file__).parent / "objectives"
N_TRIALS = 6


@pytest.fixture
def parity(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # On sys.path, so the objective pickles by reference and workers import it the same way.
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("parity_objective")


def one_cpu_slot() -> Inventory:
    # One slot runs trials one after another, in the order study.optimize runs them.
    return Inventory(gpus=(), cores=(min(os.sched_getaffinity(0)),))


def make_study() -> optuna.Study:
    study = optuna.create_study(
        study_name="parity",
        sampler=optuna.samplers.RandomSampler(seed=7),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    study.set_user_attr("dataset", "digits")
    return study


def stored_state(trial: FrozenTrial) -> dict[str, Any]:
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "start"}
    return {
        "number": trial.number,
        "state": trial.state,
        "params": trial.params,
        "distributions": trial.distributions,
        "user_attrs": user_attrs,
        "intermediate_values": trial.intermediate_values,
        "values": trial.values,
    }


def test_hyperfleet_leaves_the_same_trials_as_study_optimize(
    parity: ModuleType, tmp_path: Path
) -> None:
    plain = make_study()
    plain.optimize(parity.objective, n_trials=N_TRIALS)
    fleet = make_study()
    outcome = hyperfleet.optimize(
        fleet,
        parity.objective,
        n_trials=N_TRIALS,
        run_dir=tmp_path / "run",
        display="quiet",
        inventory=one_cpu_slot(),
        cpu_slots=1,
    )

    assert outcome.status == "completed"
    plain_trials, fleet_trials = plain.get_trials(), fleet.get_trials()
    assert [stored_state(t) for t in fleet_trials] == [stored_state(t) for t in plain_trials]
    # The comparison covers what it should: pruned and complete trials, the enqueued trial,
    # both branches of the conditional space and every suggest method's distribution.
    states = {t.state for t in fleet_trials}
    assert states == {TrialState.COMPLETE, TrialState.PRUNED}
    assert fleet_trials[1].params.items() >= parity.ENQUEUED.items()
    assert {t.params["kind"] for t in fleet_trials} == {"tree", "linear"}
    assert len(fleet_trials[0].distributions) == 11


def test_trial_and_study_attributes_inside_a_worker(parity: ModuleType, tmp_path: Path) -> None:
    study = make_study()
    hyperfleet.optimize(
        study,
        parity.objective,
        n_trials=3,
        run_dir=tmp_path / "run",
        display="quiet",
        inventory=one_cpu_slot(),
        cpu_slots=1,
    )

    for trial in study.get_trials():
        attrs = trial.user_attrs
        assert attrs["is_optuna_trial"] is True
        assert attrs["same_again"] is True
        assert attrs["number"] == attrs["echo"] == trial.number
        assert trial.datetime_start is not None
        assert attrs["start"] == trial.datetime_start.isoformat()
        assert attrs["study_name"] == "parity"
        assert attrs["direction"] == "MINIMIZE"
        assert attrs["directions"] == ["MINIMIZE"]
        assert attrs["dataset"] == "digits"
        assert attrs["trials_seen"] == trial.number + 1
        assert attrs["params_seen"] == dict(sorted(trial.params.items()))
        assert attrs["distribution_types"]["x"] == "FloatDistribution"
        assert attrs["distribution_types"]["layers"] == "IntDistribution"
        assert attrs["distribution_types"]["kind"] == "CategoricalDistribution"
    assert study.get_trials()[0].user_attrs["best_value_before"] is None
