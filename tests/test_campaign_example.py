"""The campaign example stays runnable: its file plans as the README says, its objectives train."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import optuna
import pytest

from hyperfleet.campaign import load_campaign
from hyperfleet.resources.inventory import Gpu, Inventory
from hyperfleet.resources.shapes import plan_pool

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "campaign"


def test_the_example_file_declares_three_models_on_three_data_sets() -> None:
    campaign = load_campaign(EXAMPLE / "campaign.toml")
    names = [study.name for study in campaign.studies]
    datasets = ("breast_cancer", "wine", "digits")
    assert names == [f"{model}-{d}" for model in ("xgb", "lgbm", "cat") for d in datasets]
    two_gpus = Inventory(
        gpus=tuple(Gpu(i, f"fake-{i}", "fake", kind="fake") for i in range(2)),
        cores=tuple(range(16)),
    )
    pool = plan_pool(two_gpus, campaign.pool, [study.shape for study in campaign.studies])
    by_name = {slot.name: slot for slot in pool.slots}
    for study in campaign.studies:
        kinds = {by_name[name].kind for name in pool.eligible[study.shape]}
        assert kinds == ({"cpu"} if study.name.startswith("cat") else {"gpu"})
    no_gpu = plan_pool(
        Inventory(gpus=(), cores=(0, 1)), campaign.pool, [s.shape for s in campaign.studies]
    )
    assert all(s.kind == "cpu" for s in no_gpu.slots)
    assert any("no GPU" in note for note in no_gpu.notes)


@pytest.mark.parametrize(
    ("factory", "module"),
    [("make_xgb", "xgboost"), ("make_lgbm", "lightgbm"), ("make_catboost", "catboost")],
)
def test_each_model_trains_through_its_factory(factory: str, module: str) -> None:
    pytest.importorskip(module)  # catboost is in the "campaign" extra only
    spec = importlib.util.spec_from_file_location("campaign_models", EXAMPLE / "models.py")
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    sys.modules["campaign_models"] = models
    spec.loader.exec_module(models)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(getattr(models, factory)("wine"), n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(0.5 < (trial.value or 0.0) <= 1.0 for trial in study.trials)
