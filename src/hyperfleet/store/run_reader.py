"""A run folder opened for reading, from another process than the controller that wrote it.

``hyperfleet status`` and the reports read what a run leaves behind: the storage (the trials,
authoritative) and ``status.json`` (the controller's last word on its slots). Here, below both,
so that neither imports the other to open a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hyperfleet.errors import RunDirError
from hyperfleet.store.rundir import JOURNAL_NAME, STATUS_NAME
from hyperfleet.store.storage import open_storage


@dataclass
class RunData:
    """A run folder opened for reading: its storage's studies and the controller's snapshot."""

    path: Path
    studies: list[optuna.Study]
    snapshot: dict[str, Any] | None


def open_run(run_dir: str | Path) -> RunData:
    path = Path(run_dir).absolute()
    snapshot = read_snapshot(path)
    location = snapshot.get("storage") if snapshot else None
    if location is None and not (path / JOURNAL_NAME).exists():
        if snapshot is not None:
            return RunData(path, [], snapshot)  # the study lived in memory: only slots to show
        raise RunDirError(
            f"{path} holds no hyperfleet run (no {JOURNAL_NAME} and no {STATUS_NAME}); pass the "
            "folder a search wrote, such as runs/STUDY or the --run-dir it was given."
        )
    storage = open_storage(location, path / JOURNAL_NAME)
    names = [s["name"] for s in snapshot.get("studies", [])] if snapshot else []
    if not names:
        names = [s.study_name for s in storage.get_all_studies()]
    studies = [_load(name, storage) for name in names]
    return RunData(path, [s for s in studies if s is not None], snapshot)


def _load(name: str, storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    try:
        # A fixed sampler: loading must not draw a seed or warn about an experimental one.
        return optuna.load_study(
            study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(0)
        )
    except KeyError:
        return None


def read_snapshot(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
