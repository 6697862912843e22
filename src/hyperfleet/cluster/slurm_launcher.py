"""``--slurm``: inside an allocation (``sbatch``, ``salloc``), one agent per allocated node.

The controller runs where the job script runs (the allocation's first node) and starts one job
step per node, ``srun --nodes=1 --ntasks=1 --nodelist=NODE --whole hyperfleet agent ...``:
SLURM places the agent there with the node's whole share of the allocation (its cores, and the
GPUs the job holds there, in ``CUDA_VISIBLE_DEVICES``), and kills it with the job. The token
travels in the step's environment, never on a command line that ``ps`` or ``squeue`` would show.

A thread looks at the steps every ``WATCH_SECONDS``: a node whose step ended while the run goes
on (its agent killed or crashed, or gone after its ``--patience``) gets a fresh step, so its
slots work again; one whose steps keep ending soon after they start gets its next one later
each time (:mod:`hyperfleet.cluster.restarts`). A node the controller refused gets none,
nor one whose agent was told the run is over or stopped by SIGTERM (the job ending).
``close`` ends every step.

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
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hyperfleet.cluster.channel import TOKEN_ENV
from hyperfleet.cluster.restarts import AgentRestarts
from hyperfleet.errors import ConfigError

# How long the agents get to leave after the controller's goodbye before their steps are ended.
STEP_GRACE_SECONDS = 10.0
WATCH_SECONDS = 1.0  # how often the steps are looked at (a poll of local processes)
# How a step ends that is not started again: its agent told goodbye (0), or stopped by SIGTERM,
# the agent (130) or srun itself, which is how SLURM ends a job (preemption, scancel, a time
# limit): a fresh step would only hold up the controller's last seconds.
JOB_ENDING = (0, 130, -signal.SIGTERM)


def srun_command(connect_to: str, node: str) -> list[str]:
    return [
        "srun",
        "--nodes=1",
        "--ntasks=1",
        f"--nodelist={node}",
        "--whole",  # the agent gets the whole node's share of the job, not one core
        "--kill-on-bad-exit=0",  # a node lost is recovered, not the end of the job
        "--job-name=hyperfleet-agent",
        sys.executable, "-m", "hyperfleet.app.cli", "agent", "--connect", connect_to,
    ]  # fmt: skip


@dataclass
class _Step:
    """One node's job step, as the launcher follows it."""

    process: subprocess.Popen[bytes]
    started: float  # monotonic
    end_seen: bool = False  # its end was told, and when a fresh step starts decided


class SlurmLauncher:
    def __init__(self, say: Callable[[str], None], refused: Callable[[str], bool]) -> None:
        """``say``: a line for the run log; ``refused``: whether the controller refused the
        node (its agent is not started again)."""
        if not os.environ.get("SLURM_JOB_ID"):
            raise ConfigError(
                "--slurm runs inside a SLURM allocation: submit the command with sbatch (see "
                "examples/slurm/search.sbatch) or run it under salloc."
            )
        if shutil.which("srun") is None:
            raise ConfigError("--slurm needs srun on PATH: load SLURM's module or fix PATH.")
        self._nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES", "1")
        self._names = host_names(os.environ.get("SLURM_JOB_NODELIST", ""))
        self._say, self._refused = say, refused
        self._steps: dict[str, _Step] = {}  # node -> its step, running or ended
        self._restarts = AgentRestarts(WATCH_SECONDS)
        self._lock = threading.Lock()  # the steps, between the watcher and close
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._env: dict[str, str] = {}
        self._connect_to = ""

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
        """One step per node now, and a thread that starts a fresh one for a node whose step
        ended while the run goes on."""
        self._env = {**os.environ, TOKEN_ENV: token.decode()}
        self._connect_to = connect_to
        with self._lock:
            for node in self._names:
                self._steps[node] = self._launch(node)
        self._thread = threading.Thread(target=self._watch, name="hyperfleet-slurm", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """The agents leave on the controller's goodbye; steps still there after
        ``STEP_GRACE_SECONDS`` are ended (srun passes the signal on to the agent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WATCH_SECONDS * 2 + 1)
        with self._lock:  # the watcher starts no step from here on
            steps = [step.process for step in self._steps.values()]
        deadline = time.monotonic() + STEP_GRACE_SECONDS
        for step in steps:
            with contextlib.suppress(subprocess.TimeoutExpired):
                step.wait(timeout=max(0.0, deadline - time.monotonic()))
        running = [step for step in steps if step.poll() is None]
        for step in running:
            step.terminate()
        deadline = time.monotonic() + STEP_GRACE_SECONDS
        for step in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                step.wait(timeout=max(0.0, deadline - time.monotonic()))
            if step.poll() is None:
                step.kill()
                step.wait()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            with self._lock:
                if self._stop.is_set():
                    return
                for node in list(self._steps):
                    # srun that cannot start (gone from PATH): its step stays ended, and the
                    # node is looked at again after the back-off.
                    with contextlib.suppress(OSError):
                        self._look_at(node)

    def _look_at(self, node: str) -> None:
        """Start a fresh step for the node if its step ended and it should run again."""
        step = self._steps[node]
        status = step.process.poll()
        if status is None:
            return
        if status in JOB_ENDING or self._refused(node):
            # Told goodbye (the run is over), the job ending, or not wanted: no fresh step.
            del self._steps[node]
            return
        if not step.end_seen:
            step.end_seen = True
            again = self._restarts.ended(node, time.monotonic() - step.started)
            why = _ended(status)
            self._say(f"node {node}: its agent ended ({why}); a fresh one starts {again}")
        if self._restarts.due(node):
            self._steps[node] = self._launch(node)

    def _launch(self, node: str) -> _Step:
        process = subprocess.Popen(
            srun_command(self._connect_to, node), env=self._env, stdin=subprocess.DEVNULL
        )
        return _Step(process, time.monotonic())


def host_names(nodelist: str) -> list[str]:
    """The job's node names, one each (``n[1-3]`` is n1, n2, n3), as ``scontrol`` expands them."""
    if not nodelist:
        raise ConfigError(
            "--slurm needs SLURM_JOB_NODELIST, which SLURM sets in an allocation: run the "
            "command in the job script or under salloc, not in a shell that lost it."
        )
    try:
        shown = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(
            f"--slurm cannot list the job's nodes ({nodelist}) with scontrol show hostnames "
            f"({exc}): put SLURM's commands on PATH."
        ) from None
    return shown.split()


def _ended(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):  # a real-time signal has no name
            return f"srun killed by signal {signal.Signals(-status).name}"
        return f"srun killed by signal {-status}"
    return f"srun exited with status {status}"


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
