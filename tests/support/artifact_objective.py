"""The objective of the artifact tests: each trial uploads a file of its own to a
``FileSystemArtifactStore``; refused, it notes what the store's folder holds, then fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hyperfleet.errors import ArtifactNotSeen


def uploads_to(store: str) -> Callable[[optuna.Trial], float]:
    """``store``: the store's folder (relative: in the trial's own folder, where it runs)."""

    def uploads_its_model(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        os.makedirs(store, exist_ok=True)
        Path("model.txt").write_text(f"trial {trial.number}: x={x!r}\n")
        artifact_store = FileSystemArtifactStore(store)
        try:
            upload_artifact(
                artifact_store=artifact_store, file_path="model.txt", study_or_trial=trial
            )
        except ArtifactNotSeen:
            trial.set_user_attr("left_in_store", sorted(os.listdir(store)))
            raise
        return x

    return uploads_its_model
