"""``--slurm``: inside an allocation (``sbatch``, ``salloc``), one agent per allocated node.

The controller runs where the job script runs (the allocation's first node) and starts one job
step, ``srun --ntasks-per-node=1 --whole hyperfleet agent ...``: SLURM places an agent on every
node with the node's whole share of the allocation (its cores, and the GPUs the job holds
there, in ``CUDA_VISIBLE_DEVICES``), and kills them with the job. The token travels in the
step's environment, never on a command line that ``ps`` or ``squeue`` would show.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable

from hyperfleet.cluster.channel import TOKEN_ENV
from hyperfleet.errors import ConfigError

# How long the agents get to leave after the controller's goodbye before the step is ended.
STEP_GRACE_SECONDS = 10.0


def srun_command(connect_to: str, nodes: str) -> list[str]:
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        "--whole",  # each agent gets the whole node's share of the job, not one core
        "--kill-on-bad-exit=0",  # a node lost is recovered, not the end of the step
        "--job-name=hyperfleet-agents",
        sys.executable, "-m", "hyperfleet.cli", "agent", "--connect", connect_to,
    ]  # fmt: skip


class SlurmLauncher:
    def __init__(self) -> None:
        if not os.environ.get("SLURM_JOB_ID"):
            raise ConfigError(
                "--slurm runs inside a SLURM allocation: submit the command with sbatch (see "
                "examples/slurm/search.sbatch) or run it under salloc."
            )
        if shutil.which("srun") is None:
            raise ConfigError("--slurm needs srun on PATH: load SLURM's module or fix PATH.")
        self._nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES", "1")
        self._step: subprocess.Popen[bytes] | None = None

    def listen_host(self) -> str:
        """This node's address as the cluster resolves its name: what the others reach."""
        return socket.gethostbyname(socket.gethostname())

    def start(self, connect_to: str, token: bytes, lose: Callable[[str, str], None]) -> None:
        env = {**os.environ, TOKEN_ENV: token.decode()}
        self._step = subprocess.Popen(
            srun_command(connect_to, self._nodes), env=env, stdin=subprocess.DEVNULL
        )

    def close(self) -> None:
        step = self._step
        if step is None:
            return
        try:
            step.wait(timeout=STEP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            step.terminate()  # srun passes it on to every agent
            with contextlib.suppress(subprocess.TimeoutExpired):
                step.wait(timeout=STEP_GRACE_SECONDS)
            if step.poll() is None:
                step.kill()
                step.wait()
