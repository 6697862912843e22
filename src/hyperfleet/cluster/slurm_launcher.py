"""``--slurm``: inside an allocation (``sbatch``, ``salloc``), one agent per allocated node.

The controller runs where the job script runs (the allocation's first node) and starts one job
step, ``srun --ntasks-per-node=1 --whole hyperfleet agent ...``: SLURM places an agent on every
node with the node's whole share of the allocation (its cores, and the GPUs the job holds
there, in ``CUDA_VISIBLE_DEVICES``), and kills them with the job. The token travels in the
step's environment, never on a command line that ``ps`` or ``squeue`` would show.

The controller listens on this node's address as its host name resolves, unless that is a
loopback address (Debian's ``/etc/hosts`` names the host 127.0.1.1) while the job has nodes
elsewhere: then on the address of the interface this node reaches them through, found from the
addresses SLURM itself uses for them (``NodeAddr``). When neither works it says so and how to
choose one (``--listen``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
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
        """This node's address as the job's other nodes reach it (see the module's doc)."""
        own = _resolve(socket.gethostname()) or "127.0.0.1"
        if not _loopback(own):
            return own
        peers = node_addresses(os.environ.get("SLURM_JOB_NODELIST", ""))
        this = os.environ.get("SLURMD_NODENAME", "")
        elsewhere = [addr for node, addr in peers.items() if node != this and not _loopback(addr)]
        for peer in elsewhere:
            source = _source_towards(peer)
            if source is not None and not _loopback(source):
                return source
        if elsewhere or (int(self._nodes) > 1 and not peers):
            print(
                f"hyperfleet: warning: this node's host name resolves to {own}, which the "
                "job's other nodes cannot reach, and no interface towards them was found: "
                "pass --listen ADDRESS:0 with this node's address on the cluster's network",
                file=sys.stderr,
                flush=True,
            )
        return own

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


def node_addresses(nodelist: str) -> dict[str, str]:
    """The job's nodes and the IP address of each, as SLURM reaches them (``NodeAddr``);
    empty when ``scontrol`` cannot say."""
    if not nodelist:
        return {}
    try:
        shown = subprocess.run(
            ["scontrol", "show", "node", "--oneliner", nodelist],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in shown.splitlines():
        name, addr = re.search(r"NodeName=(\S+)", line), re.search(r"NodeAddr=(\S+)", line)
        if name and addr and (resolved := _resolve(addr.group(1))) is not None:
            found[name.group(1)] = resolved
    return found


def _resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _source_towards(peer: str) -> str | None:
    """This machine's address on the interface its routes use towards ``peer`` (a UDP
    socket's connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((peer, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None
