"""Optuna's helpers that write through ``trial.storage`` inside an objective: artifacts and the
Terminator's cross-validation scores. Each write reaches the study through the controller, for
the running trial (or its study) only. Real runs on two CPU slots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.terminator import report_cross_validation_scores

import hyperfleet


def make_uploader(store: str) -> Callable[[optuna.Trial], float]:
    """An objective that writes its model in its trial folder and uploads it to ``store``."""
    artifact_store = FileSystemArtifactStore(store)

    def uploads_its_model(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        model = Path(f"model-{trial.number}.txt")
        model.write_text(f"x={x}\n")
        upload_artifact(artifact_store=artifact_store, file_path=str(model), study_or_trial=trial)
        return x

    return uploads_its_model


def reports_scores(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    report_cross_validation_scores(trial, [x, x + 0.1, x + 0.2])
    return x


def writes_another_trial(trial: optuna.Trial) -> float:
    trial.storage.set_trial_user_attr(trial._trial_id + 1000, "x", 1)
    return 0.0


def run(
    objective: Any, tmp_path: Path, n_trials: int, **kwargs: Any
) -> tuple[optuna.Study, hyperfleet.Outcome]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    outcome = hyperfleet.optimize(
        study, objective, n_trials=n_trials, cpu_slots=2, run_dir=tmp_path / "run",
        display="quiet", report=False, **kwargs,
    )  # fmt: skip
    return study, outcome


def test_every_uploaded_artifact_is_in_the_store_and_downloads(tmp_path: Path) -> None:
    folder = tmp_path / "artifacts"
    folder.mkdir()
    study, outcome = run(make_uploader, tmp_path, 6, objective_kwargs={"store": str(folder)})

    assert outcome.status == "completed"
    store = FileSystemArtifactStore(str(folder))
    for trial in study.trials:
        (meta,) = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
        assert meta.filename == f"model-{trial.number}.txt"
        target = tmp_path / f"down-{trial.number}.txt"
        download_artifact(artifact_store=store, artifact_id=meta.artifact_id, file_path=str(target))
        assert target.read_text() == f"x={trial.params['x']}\n"


def test_the_terminators_scores_reach_the_trial(tmp_path: Path) -> None:
    study, outcome = run(reports_scores, tmp_path, 4)
    assert outcome.status == "completed"
    for trial in study.trials:
        x = trial.params["x"]
        scores = [v for k, v in trial.system_attrs.items() if "cv_scores" in k or "cross" in k]
        assert scores == [[x, x + 0.1, x + 0.2]], trial.system_attrs


def test_an_objective_cannot_write_another_trial_through_its_storage(tmp_path: Path) -> None:
    study, _ = run(writes_another_trial, tmp_path, 2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    reasons = [t.system_attrs["hyperfleet:fail_reason"] for t in study.trials]
    assert all("may only reach its own trial" in reason for reason in reasons), reasons


def make_study_uploader(store: str) -> Callable[[optuna.Trial], float]:
    """An objective whose trial 0 uploads a file as an artifact of the study."""
    artifact_store = FileSystemArtifactStore(store)

    def uploads_for_the_study(trial: optuna.Trial) -> float:
        if trial.number == 0:
            Path("notes.txt").write_text("about the study\n")
            upload_artifact(
                artifact_store=artifact_store, file_path="notes.txt",
                study_or_trial=trial.study, storage=trial.storage,  # type: ignore[arg-type]
            )  # fmt: skip
        return trial.suggest_float("x", 0.0, 1.0)

    return uploads_for_the_study


def test_an_artifact_of_the_study_is_stored_with_the_study(tmp_path: Path) -> None:
    folder = tmp_path / "artifacts"
    folder.mkdir()
    study, outcome = run(make_study_uploader, tmp_path, 2, objective_kwargs={"store": str(folder)})
    assert outcome.status == "completed"
    (meta,) = optuna.artifacts.get_all_artifact_meta(study)
    assert meta.filename == "notes.txt"
    target = tmp_path / "back.txt"
    store = FileSystemArtifactStore(str(folder))
    download_artifact(artifact_store=store, artifact_id=meta.artifact_id, file_path=str(target))
    assert target.read_text() == "about the study\n"


def reports_folds(trial: optuna.Trial) -> float:
    """Optuna's Terminator example, without the data set: each trial reports its folds."""
    x = trial.suggest_float("x", -1.0, 1.0)
    scores = [1.0 - x * x + 0.01 * k for k in range(5)]
    report_cross_validation_scores(trial, scores)
    return sum(scores) / len(scores)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_terminator_callback_stops_the_search_as_in_optuna(tmp_path: Path) -> None:
    from optuna.terminator import TerminatorCallback

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    outcome = hyperfleet.optimize(
        study, reports_folds, n_trials=60, cpu_slots=2, run_dir=tmp_path / "run",
        display="quiet", report=False, callbacks=[TerminatorCallback()],
    )  # fmt: skip
    assert outcome.status == "stopped", outcome.message
    assert len(study.trials) < 60  # the Terminator decided: no room left to improve
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
