"""Where the objective's file-system artifact stores wrote each artifact, inside a worker.

``optuna.artifacts.upload_artifact`` has the store write the file, then records the artifact
with ``trial.storage.set_trial_system_attr`` (or ``set_study_system_attr``), a call the
controller answers. A :class:`~optuna.artifacts.FileSystemArtifactStore` on a node's own disk
writes where the controller, and whoever opens the study later, cannot read: so the worker
sends that record with the file's absolute path, and the controller refuses the record when it
cannot see the file (:mod:`hyperfleet.controller.artifact_check`). Other stores (S3, GCS) write
nothing here and are not checked.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX

# Each artifact id a file-system store wrote in this worker, with its file's absolute path, until
# the artifact's record is sent.
_written: dict[str, str] = {}
_WATCHED = "_hyperfleet_watched"


def watch_file_system_stores() -> None:
    """From now on (once per worker), each ``FileSystemArtifactStore.write`` notes the file it
    wrote. Its subclasses and the stores that wrap it (``Backoff``) write through it too."""
    write = FileSystemArtifactStore.write
    if getattr(write, _WATCHED, False):
        return

    def noting_write(
        self: FileSystemArtifactStore, artifact_id: str, content_body: BinaryIO
    ) -> None:
        write(self, artifact_id, content_body)
        # Absolute now: a relative base path is relative to the trial's folder, where it runs.
        _written[artifact_id] = os.path.abspath(self._get_filepath(artifact_id))

    setattr(noting_write, _WATCHED, True)
    # Optuna's own class, replaced in this worker only: mypy refuses any method assignment.
    FileSystemArtifactStore.write = noting_write  # type: ignore[method-assign]


def written_file(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The file a file-system store of this worker wrote for the artifact that a storage call
    records (``set_trial_system_attr(trial_id, "artifacts:<id>", meta)``); None for any other
    call, and for an artifact another kind of store holds."""
    if name not in ("set_trial_system_attr", "set_study_system_attr"):
        return None
    key = args[1] if len(args) > 1 else kwargs.get("key")
    if not isinstance(key, str) or not key.startswith(ARTIFACTS_ATTR_PREFIX):
        return None
    return _written.pop(key[len(ARTIFACTS_ATTR_PREFIX) :], None)
