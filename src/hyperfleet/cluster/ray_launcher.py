"""``--ray auto|ADDRESS``: one agent per Ray node, placed and reserved by Ray itself.

Each agent runs inside a Ray task pinned to its node (``NodeAffinitySchedulingStrategy``, not
soft) that reserves the node's GPUs through Ray's own ``num_gpus``, so Ray's autoscaler,
dashboard and node lifecycle apply, and Ray's ``CUDA_VISIBLE_DEVICES`` decides which GPUs the
agent finds. The agent runs in the task's own process: when Ray kills the task or loses the
node, the agent's workers lose their lifeline and end with it. A thread watches
``ray.nodes()``: a node that joins gets an agent, a node Ray reports dead is lost at once,
before its heartbeats would have run out.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from hyperfleet.errors import ConfigError

WATCH_SECONDS = 2.0  # how often the node list is read
# How long the address check waits for the head to accept a connection: a head that is up
# answers in milliseconds, where ray.init would retry an address nobody answers for minutes.
PROBE_SECONDS = 5.0
CLIENT_PREFIX = "ray://"
NEEDS_RAY = "--ray needs Ray: pip install 'hyperfleet[ray]' (or pip install ray), then run again."


def check_address(address: str) -> None:
    """Refuse, before anything is written, a Ray address that cannot work: Ray missing, a
    ``ray://`` address without Ray's client extra, a ``HOST:PORT`` where nothing answers.
    ``auto`` (and any form without a port) is left to Ray."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(NEEDS_RAY)
    text = address.strip()
    if text.startswith(CLIENT_PREFIX):
        text = text[len(CLIENT_PREFIX) :]
        _check_client_extra(address)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"Ray address {address!r}: nothing answers at {host}:{port} ({reason}); start the "
            "Ray head there (ray start --head), give the address `ray status` prints on the "
            "head, or use --ray auto on a node of the cluster."
        ) from None


def _check_client_extra(address: str) -> None:
    # A ray:// address goes through Ray Client, which needs grpc: what Ray itself checks
    # (ray._private.utils.get_ray_client_dependency_error) before it refuses with a traceback.
    try:
        importlib.import_module("grpc")
    except ImportError as exc:
        raise ConfigError(
            f"Ray address {address!r} goes through Ray Client, which needs Ray's client extra "
            f"({exc}); pip install 'ray[client]', or give the head's HOST:PORT (or --ray auto "
            "on a node of the cluster) instead."
        ) from None


def agent_task(connect_to: str, token: str, node: str) -> str:
    """What each Ray task runs: the agent, until its controller ends the run."""
    import tempfile
    from pathlib import Path

    from hyperfleet.cluster.agent import run_agent

    # A Ray worker's working folder is Ray's, not the user's: worker logs, and the node's own
    # run folders when it does not see the run directory, go to the node's temporary folder.
    temporary = Path(tempfile.gettempdir())
    logs, work = temporary / "hyperfleet-agent-logs", temporary / "hyperfleet-agent-runs"
    return run_agent(connect_to, token.encode(), node, logs, 60.0, work)


class RayLauncher:
    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(NEEDS_RAY) from None
        self._ray: Any = ray
        with contextlib.suppress(RuntimeError):  # already connected (a notebook did it)
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        self._agents: dict[str, Any] = {}  # Ray node id -> the agent task
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def listen_host(self) -> str:
        """The address Ray itself uses on this machine: the agents can reach it."""
        return str(self._ray.util.get_node_ip_address())

    def start(self, connect_to: str, token: bytes, lose: Callable[[str, str], None]) -> None:
        """Start an agent on every alive node now, and on each that joins later; ``lose``
        (node, reason) is called for a node Ray reports dead."""
        self._connect_to, self._token, self._lose = connect_to, token.decode(), lose
        self._watch_once()
        self._thread = threading.Thread(target=self._watch, name="hyperfleet-ray", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WATCH_SECONDS * 2)
        # The agents leave on the controller's goodbye; a task that has not started yet would
        # wait for a controller that is gone.
        for task in self._agents.values():
            with contextlib.suppress(Exception):
                self._ray.cancel(task, force=True)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            with contextlib.suppress(Exception):  # a head that restarts: try again later
                self._watch_once()

    def _watch_once(self) -> None:
        for node in self._ray.nodes():
            node_id = str(node["NodeID"])
            if node["Alive"] and node_id not in self._agents:
                self._agents[node_id] = self._launch(node)
            elif not node["Alive"] and node_id in self._agents:
                del self._agents[node_id]
                self._lose(node_name(node_id), "was reported dead by Ray")

    def _launch(self, node: dict[str, Any]) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        gpus = int(node["Resources"].get("GPU", 0))
        task = self._ray.remote(agent_task).options(
            num_cpus=0,
            num_gpus=gpus,
            max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            name=f"hyperfleet-agent-{node_name(str(node['NodeID']))}",
        )
        return task.remote(self._connect_to, self._token, node_name(str(node["NodeID"])))


def node_name(node_id: str) -> str:
    """Slot names say the node: ``ray-1a2b3c/gpu0#0``."""
    return f"ray-{node_id[:6]}"
