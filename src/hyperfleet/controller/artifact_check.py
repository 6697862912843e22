"""Refusing the record of an artifact whose file the controller cannot see.

A worker sends the record of an artifact that a ``FileSystemArtifactStore`` wrote with the
file's path (:mod:`hyperfleet.workers.artifact_files`). On one machine, or on a node that shares
the disk, the controller sees that file. On a node without the shared disk a store in the
node's own folder writes where nobody who opens the study can read: recording it would name an
artifact nobody can download, so the call fails in the objective with what to do instead.
"""

from __future__ import annotations

import os

from hyperfleet.errors import ArtifactNotSeen
from hyperfleet.workers.protocol import Call


def check_artifact_seen(call: Call, slot: str) -> None:
    """Raise :class:`ArtifactNotSeen` when the call records an artifact whose file, as the
    worker's file-system store wrote it, is not there for the controller."""
    path = call.artifact_file
    if path is None or (isinstance(path, str) and os.path.isfile(path)):
        return
    node = slot.partition("/")[0] if "/" in slot else "this machine"
    raise ArtifactNotSeen(
        f"hyperfleet: the FileSystemArtifactStore of the objective on {node} wrote the "
        f"artifact to {path}, which the controller cannot see (a disk of that node only, or "
        "a shared disk mounted at another path there): "
        "nobody could download it, so it is not recorded and its file is removed. Give the "
        "store a folder on a disk every node shares, at the same path on each; or use a store "
        "every node reaches (optuna.artifacts.Boto3ArtifactStore for S3, GCSArtifactStore); "
        "or run this node's agent where it sees the controller's run directory."
    )
