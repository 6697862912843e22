"""Artifacts uploaded on a node that does not share the controller's run directory: a
``FileSystemArtifactStore`` in the node's own folder is refused (nobody could download what it
holds) and the trial fails saying what to do; one in a folder the controller sees too works as
on one machine. A real agent, in a mount namespace of its own."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import FrozenTrial, TrialState

from support.nodes import (
    Agent,
    can_hide_folders,
    free_port,
    start_controller,
    unseen_by_controller,
    wait_for_log,
)
from support.procs import load_trials

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not can_hide_folders(), reason="hiding a node's folders needs root"),
]

OBJECTIVE = Path(__file__).resolve().parent / "support" / "artifact_objective.py"
STUDY = "artifact_objective-uploads_to"


def run_on_a_node_of_its_own(folder: Path, store: str) -> tuple[int, FrozenTrial]:
    """One trial, uploading to ``store``, on a node that sees neither the run directory nor its
    own run folder (``node-disk``) as the controller does: the run's exit status, the trial."""
    address = f"127.0.0.1:{free_port()}"
    controller = start_controller(
        folder, address, 1, "--objective-arg", f"store={store}",
        objective=f"{OBJECTIVE}:uploads_to",
    )  # fmt: skip
    own = folder / "node-disk"
    own.mkdir()
    wait_for_log(folder, "listening for agents", 30)
    hidden = unseen_by_controller(folder / "run", own)
    agent = Agent(folder, address, "nodeX", 1, hidden, flags=["--work-dir", str(own)])
    try:
        status = controller.wait(60)
        assert agent.wait(15) == 0, agent.log.read_text()
    finally:
        controller.stop()
        agent.stop()
    (trial,) = load_trials(folder / "run", STUDY)
    return status, trial


def test_a_store_in_the_nodes_own_folder_is_refused_with_what_to_do(tmp_path: Path) -> None:
    status, trial = run_on_a_node_of_its_own(tmp_path, "artifacts")  # its trial folder, on nodeX

    assert status == 1 and trial.state == TrialState.FAIL  # every trial failed
    reason = trial.system_attrs["hyperfleet:fail_reason"]
    assert "ArtifactNotSeen" in reason and "nodeX" in reason, reason
    assert "/node-disk/" in reason and "which the controller cannot see" in reason
    assert "a disk every node shares" in reason and "Boto3ArtifactStore" in reason
    # Nothing names the artifact, and the store on the node keeps no file nobody would find.
    assert not [key for key in trial.system_attrs if key.startswith("artifacts:")]
    assert trial.user_attrs["left_in_store"] == []


def test_a_store_both_sides_see_works_from_a_node_of_its_own(tmp_path: Path) -> None:
    shared = tmp_path / "shared-artifacts"
    status, trial = run_on_a_node_of_its_own(tmp_path, str(shared))

    assert status == 0 and trial.state == TrialState.COMPLETE, trial.system_attrs
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "run" / "optuna.journal"))
    )
    (meta,) = optuna.artifacts.get_all_artifact_meta(trial, storage=storage)
    assert meta.filename == "model.txt"
    target = tmp_path / "downloaded.txt"
    store = FileSystemArtifactStore(str(shared))
    download_artifact(artifact_store=store, artifact_id=meta.artifact_id, file_path=str(target))
    assert target.read_text() == f"trial 0: x={trial.params['x']!r}\n"
