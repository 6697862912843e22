"""optuna-integration's ``WeightsAndBiasesCallback`` under hyperfleet, W&B in offline mode: the
runs it leaves on disk hold each trial's parameters and value, as ``study.optimize`` leaves
them; one run per trial with ``as_multirun=True``, else one run for the study with a step per
trial. Real runs on two CPU slots; the run files are read back record by record."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial

import hyperfleet

pytest.importorskip("wandb", reason="needs wandb: pip install -e '.[dev]'")
import wandb
from optuna_integration.wandb import WeightsAndBiasesCallback

from support.procs import wait_until
from support.tracker_files import wandb_config, wandb_history, wandb_written
from support.tracker_objectives import squared

Callback = Callable[[optuna.Study, FrozenTrial], None]

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::optuna.exceptions.ExperimentalWarning"
)


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path / "tracked"
    if wandb.run is not None:  # the one run of a study, unless the test finished it
        wandb.run.finish()


def search(tmp_path: Path, n_trials: int, *callbacks: Callback) -> optuna.Study:
    study = optuna.create_study(study_name="wb", sampler=optuna.samplers.RandomSampler(seed=5))
    outcome = hyperfleet.optimize(
        study, squared, n_trials=n_trials, cpu_slots=2, run_dir=tmp_path / "run",
        display="quiet", report=False, callbacks=list(callbacks),
    )  # fmt: skip
    assert outcome.error is None
    return study


def run_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    for file in files:
        wait_until(lambda file=file: wandb_written(file), 30, f"W&B to write {file.name}")
    return files


def test_wandb_offline_multirun_leaves_one_run_per_trial_with_its_params_and_value(
    wandb_dir: Path, tmp_path: Path
) -> None:
    wandb_dir.mkdir()
    kwargs = {"mode": "offline", "dir": str(wandb_dir), "project": "hyperfleet-test"}
    callback = WeightsAndBiasesCallback(metric_name="loss", wandb_kwargs=kwargs, as_multirun=True)
    study = search(tmp_path, 4, callback)

    files = run_files(wandb_dir)
    assert len(files) == len(study.trials) == 4
    logged = {}
    for file in files:
        (step,) = wandb_history(file)  # one log per run: the trial
        logged[step["trial_number"]] = step
        assert wandb_config(file)["x"] == step["x"]
    for trial in study.trials:
        assert logged[trial.number]["x"] == trial.params["x"]
        assert logged[trial.number]["loss"] == pytest.approx(trial.value)


def test_wandb_offline_single_run_logs_a_step_per_trial_that_ends_in_order(
    wandb_dir: Path, tmp_path: Path
) -> None:
    ended: list[int] = []
    wandb_dir.mkdir()
    kwargs = {"mode": "offline", "dir": str(wandb_dir), "project": "hyperfleet-test"}
    callback = WeightsAndBiasesCallback(metric_name="loss", wandb_kwargs=kwargs)
    study = search(tmp_path, 6, callback, lambda _study, trial: ended.append(trial.number))
    wandb.run.finish()

    (file,) = run_files(wandb_dir)
    steps = {step["_step"]: step for step in wandb_history(file)}
    # The callback logs trial N at step N, and W&B drops a step below one it has: a trial that
    # ends after a later-numbered one is not logged, as with study.optimize(n_jobs=2).
    assert sorted(steps) == in_order(ended) and steps
    for number, step in steps.items():
        trial = study.trials[number]
        assert (step["x"], step["loss"]) == (trial.params["x"], pytest.approx(trial.value))


def in_order(ended: list[int]) -> list[int]:
    """The trials that ended after every lower-numbered trial that had ended before them."""
    kept: list[int] = []
    for number in ended:
        if not kept or number > kept[-1]:
            kept.append(number)
    return kept
