"""Pruning from real training loops, as ``study.optimize`` would run them: optuna-integration's
LightGBM and XGBoost callbacks, and a per-epoch report/should_prune loop as written for PyTorch."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import optuna
import pytest
from optuna.trial import TrialState

from support.searches import optimize_on_cpu_slots

OBJECTIVES = Path(__file__).parent / "objectives"
N_TRIALS = 6


@pytest.fixture
def loops(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("training_loops")


def run_pruned_search(objective: object, run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """One slot, so trial order is fixed: even trials learn, odd ones barely move."""
    study = optuna.create_study(
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    )
    optimize_on_cpu_slots(study, objective, N_TRIALS, 1, run_dir)
    return study.get_trials()


def assert_odd_trials_pruned_early(trials: list[optuna.trial.FrozenTrial], rounds: int) -> None:
    for trial in trials:
        if trial.number % 2 == 0:
            assert trial.state == TrialState.COMPLETE
            assert len(trial.intermediate_values) == rounds
        elif trial.number >= 3:  # by then two trials are complete, as the pruner needs
            assert trial.state == TrialState.PRUNED
            assert len(trial.intermediate_values) < rounds


def test_lightgbm_pruning_callback(loops: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("lightgbm")
    pytest.importorskip("optuna_integration.lightgbm")
    trials = run_pruned_search(loops.lightgbm_objective, tmp_path)
    assert_odd_trials_pruned_early(trials, loops.ROUNDS)


def test_xgboost_pruning_callback(loops: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("xgboost")
    pytest.importorskip("optuna_integration.xgboost")
    trials = run_pruned_search(loops.xgboost_objective, tmp_path)
    assert_odd_trials_pruned_early(trials, loops.ROUNDS)


def test_epoch_loop_with_report_and_should_prune(loops: ModuleType, tmp_path: Path) -> None:
    trials = run_pruned_search(loops.epoch_loop_objective, tmp_path)
    assert_odd_trials_pruned_early(trials, loops.ROUNDS)
