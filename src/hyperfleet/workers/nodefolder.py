"""A worker's trial folders on a node that does not see the controller's run directory.

The agent of such a node gives its workers a run folder of their own, named in the environment
(:data:`NODE_FOLDER_ENV`); each trial the worker is sent then runs there, at the same place
relative to the folder as in the controller's run directory, and the worker tells its agent
where (:data:`~hyperfleet.workers.protocol.TRIAL_STARTED`). What the agent and the controller do
with those folders is in :mod:`hyperfleet.cluster.trialfiles`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

from hyperfleet.workers.protocol import TRIAL_STARTED, RunTrial

# Set by the agent for the workers of a node without the run directory.
NODE_FOLDER_ENV = "HYPERFLEET_NODE_RUN_FOLDER"


@dataclass(frozen=True)
class NodeRunFolder:
    """A node's own run folder in place of the controller's run directory."""

    shared: str  # the controller's run directory, as the trials sent here name it
    local: str

    def to_env(self) -> dict[str, str]:
        return {NODE_FOLDER_ENV: json.dumps({"shared": self.shared, "local": self.local})}

    @classmethod
    def from_env(cls) -> NodeRunFolder | None:
        raw = os.environ.get(NODE_FOLDER_ENV)
        if not raw:
            return None
        fields = json.loads(raw)
        return cls(str(fields["shared"]), str(fields["local"]))

    def localise(self, path: str) -> str:
        """The node's path for a path in the controller's run directory."""
        if not path:
            return path
        relative = os.path.relpath(path, self.shared)
        if relative.startswith(os.pardir):
            return path  # outside the run directory: nothing to map
        return os.path.join(self.local, relative)

    def start_trial(self, message: RunTrial, conn: Connection) -> RunTrial:
        """The trial with its folders on this node; its agent is told where it runs."""
        local = replace(
            message,
            trial_dir=self.localise(message.trial_dir),
            checkpoint_dir=self.localise(message.checkpoint_dir),
        )
        # Its parents too (a campaign study's trials/): this folder is the node's, made here.
        Path(local.trial_dir).parent.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(local.trial_dir, self.local)
        conn.send_bytes(TRIAL_STARTED + relative.encode())
        return local
