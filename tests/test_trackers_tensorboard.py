"""optuna-integration's ``TensorBoardCallback`` under hyperfleet: its event files hold one
entry per completed trial (a folder ``trial-N`` with the trial's value), as ``study.optimize``
leaves them. Real runs on two CPU slots; the event files are read with TensorBoard's loader."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import hyperfleet

pytest.importorskip("tensorboard", reason="needs tensorboard: pip install -e '.[dev]'")
# TensorBoardCallback's hparams plugin imports TensorFlow.
pytest.importorskip("tensorflow", reason="needs tensorflow-cpu: pip install -e '.[dev]'")
from optuna_integration.tensorboard import TensorBoardCallback

from support.tracker_files import tensorboard_scalars
from support.tracker_objectives import pruned_at_three

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_tensorboard_event_files_hold_one_entry_per_completed_trial(tmp_path: Path) -> None:
    logs = tmp_path / "tensorboard"
    study = optuna.create_study(study_name="tb", sampler=optuna.samplers.RandomSampler(seed=7))
    outcome = hyperfleet.optimize(
        study, pruned_at_three, n_trials=5, cpu_slots=2, run_dir=tmp_path / "run", display="quiet",
        report=False, callbacks=[TensorBoardCallback(str(logs), metric_name="loss")],
    )  # fmt: skip
    assert outcome.error is None

    # Optuna's callback writes completed trials only: the pruned trial 3 has no folder.
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in complete] == [0, 1, 2, 4]
    assert sorted(p.name for p in logs.iterdir()) == ["trial-0", "trial-1", "trial-2", "trial-4"]
    for trial in complete:
        scalars = tensorboard_scalars(logs / f"trial-{trial.number}")
        assert scalars == {"loss": [pytest.approx(trial.value, rel=1e-6)]}
