"""``--ray auto|ADDRESS``: agents placed by Ray itself, each with what its node can give.

Each agent is a Ray actor pinned to its node (``NodeAffinitySchedulingStrategy``, not soft)
that reserves, through Ray's own ``num_gpus`` and ``num_cpus``, the GPUs free on the node and
the CPUs its slots will use, so Ray's autoscaler, dashboard and node lifecycle apply and what
Ray gave other work stays theirs. The agent uses exactly the GPUs Ray gave it (none when none)
and as many cores as it reserved. It runs in the actor's own process: when Ray kills the actor
or loses the node, the agent's workers lose their lifeline and end with it.

A thread reads Ray's nodes every ``WATCH_SECONDS``:

- a node that joins gets an agent; a node whose GPUs or CPUs are all held by other work gets
  none yet, and the run log says what it waits for;
- a node whose agents hold fewer than all its GPUs, when some free up, gets another agent for
  them (``ray-<id>-2``): the run grows without disturbing the trials running there, which
  restarting the node's agent with more GPUs would do;
- an agent that ended while its node is alive (its process killed, or it gave up a lost
  controller) is started again, unless the controller refused the node;
- a node Ray reports dead is lost at once, before its heartbeats would have run out;
- a node Ray drains (a preemption notice) gets no new agent, and the controller hears how long
  it has: it sends no more trials there and lets the running ones finish or save in time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hyperfleet.cluster.restarts import AgentRestarts
from hyperfleet.errors import ConfigError
from hyperfleet.resources.inventory import Inventory, detect_inventory, select_gpus

WATCH_SECONDS = 2.0  # how often the node list is read
# How long the address check waits for the head to accept a connection: a head that is up
# answers in milliseconds, where ray.init would retry an address nobody answers for minutes.
PROBE_SECONDS = 5.0
CLIENT_PREFIX = "ray://"
NEEDS_RAY = "--ray needs Ray: pip install 'hyperfleet[ray]' (or pip install ray), then run again."
AGENT_PATIENCE = 60.0  # how long an agent tries to reach its controller, at start and after
# An agent Ray has not placed this long, where the node no longer has what it asked for, is
# withdrawn and the node planned again (what was free when it was asked for got taken).
REPLAN_SECONDS = 10.0
LEAVE_SECONDS = 5.0  # how long the agents get to leave at the end of the run, all together
REFUSED = "the controller refused"  # how an agent says the controller does not want its node


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


class AgentActor:
    """The Ray actor each agent runs in: its process is its own for the agent's life."""

    def ready(self) -> int:
        """Answers once Ray placed the actor, with the resources it asked for held."""
        return os.getpid()

    def serve(self, connect_to: str, token: str, node: str, first_core: int, cores: int) -> str:
        """Run the agent until its controller ends the run; returns why it stopped."""
        import tempfile
        from pathlib import Path

        import ray

        from hyperfleet.cluster.agent import run_agent
        from hyperfleet.errors import HyperfleetError

        gpus = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        # A Ray worker's working folder is Ray's, not the user's: worker logs, and the node's
        # own run folders when it does not see the run directory, go to its temporary folder.
        temporary = Path(tempfile.gettempdir())
        logs, work = temporary / "hyperfleet-agent-logs", temporary / "hyperfleet-agent-runs"
        try:
            inventory = reserved_inventory(gpus, first_core, cores)
            return run_agent(
                connect_to, token.encode(), node, logs, AGENT_PATIENCE, work, inventory
            )
        except HyperfleetError as exc:
            return str(exc)


def reserved_inventory(gpus: list[str], first_core: int, cores: int) -> Inventory:
    """The node's inventory cut to what Ray reserved for this agent: the GPUs Ray gave it (by
    Ray's ids, which are CUDA_VISIBLE_DEVICES entries; none when none, even where the node
    shows some) and ``cores`` of the cores this process may use, from ``first_core`` on (0:
    all of them), so two agents of one node pin their slots to different cores."""
    inventory = detect_inventory()
    allowed = list(inventory.cores)
    if 0 < cores < len(allowed):
        chosen = {allowed[(first_core + k) % len(allowed)] for k in range(cores)}
        inventory = replace(inventory, cores=tuple(sorted(chosen)))
    return replace(inventory, gpus=select_gpus(inventory, gpus))


@dataclass
class _Agent:
    """One agent actor on a Ray node, as the launcher follows it."""

    name: str  # the node's name in slot names: ray-1a2b3c, ray-1a2b3c-2 for a second agent
    actor: Any
    ready: Any  # Ray's reference that resolves once the actor is placed
    done: Any  # Ray's reference that resolves when the agent ends
    gpus: int
    cpus: int
    first_core: int
    asked_at: float  # monotonic
    placed: bool = False


class RayLauncher:
    def __init__(
        self,
        address: str,
        say: Callable[[str], None],
        drain: Callable[[str, float | None], None],
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(NEEDS_RAY) from None
        self._ray: Any = ray
        with contextlib.suppress(RuntimeError):  # already connected (a notebook did it)
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        self._say, self._drain = say, drain
        self._actor_class: Any = ray.remote(AgentActor)
        self._agents: dict[str, list[_Agent]] = {}  # Ray node id -> its agents
        self._notes: dict[str, str] = {}  # Ray node id -> what the log last said it waits for
        self._refused: set[str] = set()  # nodes the controller does not use: no agent again
        self._draining: set[str] = set()
        self._restarts = AgentRestarts(WATCH_SECONDS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def listen_host(self) -> str:
        """The address Ray itself uses on this machine: the agents can reach it."""
        return str(self._ray.util.get_node_ip_address())

    def start(self, connect_to: str, token: bytes, lose: Callable[[str, str], None]) -> None:
        """Start agents on every alive node now, and watch the nodes; ``lose`` (node, reason)
        is called for a node Ray reports dead."""
        self._connect_to, self._token, self._lose = connect_to, token.decode(), lose
        self._watch_once()
        self._thread = threading.Thread(target=self._watch, name="hyperfleet-ray", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WATCH_SECONDS * 2)
        # The agents leave on the controller's goodbye, stopping their workers; then their
        # actors go, with the resources they hold, and those Ray has not placed yet with them.
        agents = [agent for node in self._agents.values() for agent in node]
        leaving = [agent.done for agent in agents if agent.placed]
        with contextlib.suppress(Exception):
            self._ray.wait(leaving, num_returns=len(leaving), timeout=LEAVE_SECONDS)
        for agent in agents:
            self._kill(agent)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            with contextlib.suppress(Exception):  # a head that restarts: try again later
                self._watch_once()

    def _watch_once(self) -> None:
        nodes = self._ray.nodes()
        # A dead node's agents ended with it: lost at once, before they are taken for agents
        # that ended on a live node and are started again.
        for node in nodes:
            if not node["Alive"]:
                self._gone(str(node["NodeID"]))
        self._reap()
        free = _free_per_node()
        draining = _draining_nodes()
        for node in nodes:
            node_id = str(node["NodeID"])
            if not node["Alive"]:
                continue
            if node_id in draining:
                self._drain_node(node_id, draining[node_id])
            elif node_id not in self._refused:
                self._fill(node_id, node["Resources"], free.get(node_id, node["Resources"]))

    def _reap(self) -> None:
        """Forget the agents that ended; a node whose agent ended may get a fresh one."""
        done_refs = [agent.done for agents in self._agents.values() for agent in agents]
        if not done_refs:
            return
        ended, _ = self._ray.wait(done_refs, num_returns=len(done_refs), timeout=0)
        for node_id, agents in self._agents.items():
            for agent in [a for a in agents if a.done in ended]:
                agents.remove(agent)
                self._kill(agent)  # its resources go back to Ray
                self._ended(node_id, agent, self._why_ended(agent))

    def _why_ended(self, agent: _Agent) -> str:
        try:
            return str(self._ray.get(agent.done, timeout=0))
        except Exception as exc:  # its process killed, its node lost: Ray says which
            return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

    def _ended(self, node_id: str, agent: _Agent, why: str) -> None:
        if REFUSED in why:
            self._refused.add(node_id)  # the run log has the controller's reason already
            return
        if self._stop.is_set() or node_id in self._draining or why == "goodbye":
            return  # the run is over (its goodbye may come just before close())
        again = self._restarts.ended(node_id, time.monotonic() - agent.asked_at)
        self._say(f"node {agent.name}: its agent ended ({why}); a fresh one starts {again}")

    def _gone(self, node_id: str) -> None:
        for agent in self._agents.pop(node_id, []):
            self._kill(agent)
            self._lose(agent.name, "was reported dead by Ray")
        self._notes.pop(node_id, None)

    def _drain_node(self, node_id: str, deadline_ms: int) -> None:
        """Ray takes the node back (at ``deadline_ms``, wall clock; 0: no deadline given)."""
        if node_id in self._draining:
            return
        self._draining.add(node_id)
        left = max(0.0, deadline_ms / 1000 - time.time()) if deadline_ms else None
        for agent in self._agents.get(node_id, []):
            self._drain(agent.name, left)

    def _fill(self, node_id: str, total: dict[str, float], free: dict[str, float]) -> None:
        """Start an agent for what the node has free, if the run does not hold it yet."""
        agents = self._agents.setdefault(node_id, [])
        if not self._all_placed(node_id, agents, free):
            return
        if not self._restarts.due(node_id):
            return
        gpus_total, cpus_total = int(total.get("GPU", 0)), int(total.get("CPU", 0))
        gpus_free, cpus_free = int(free.get("GPU", 0)), int(free.get("CPU", 0))
        held = sum(agent.gpus for agent in agents)
        if agents and (gpus_total == 0 or gpus_free == 0):
            # A node without GPUs has its agent; one with GPUs waits for those others hold.
            self._note(node_id, _waiting(node_name(node_id), gpus_total - held, 0, bool(agents)))
            return
        if gpus_total and not gpus_free:
            self._note(node_id, _waiting(node_name(node_id), gpus_total, 0, False))
            return
        cpus = cpu_share(cpus_total, cpus_free, gpus_total, gpus_free)
        if cpus_total and not cpus:
            self._note(node_id, _waiting(node_name(node_id), 0, cpus_total, bool(agents)))
            return
        agent = self._launch(node_id, agents, gpus_free, cpus)
        agents.append(agent)
        self._note(node_id, _waiting(node_name(node_id), gpus_total - held - gpus_free, 0, True))

    def _all_placed(self, node_id: str, agents: list[_Agent], free: dict[str, float]) -> bool:
        """Whether Ray placed every agent of the node, a moment ago at least (its resources
        show as taken by then). One it has not placed for a while, where the node no longer
        has what it asked for, is withdrawn: the node is planned again."""
        waiting = [agent for agent in agents if not agent.placed]
        if waiting:
            placed, _ = self._ray.wait(
                [agent.ready for agent in waiting], num_returns=len(waiting), timeout=0
            )
            now = time.monotonic()
            for agent in waiting:
                if agent.ready in placed:
                    agent.placed, agent.asked_at = True, now
                elif now - agent.asked_at > REPLAN_SECONDS and not _fits(agent, free):
                    agents.remove(agent)
                    self._kill(agent)
        return all(
            agent.placed and time.monotonic() - agent.asked_at >= WATCH_SECONDS for agent in agents
        )

    def _note(self, node_id: str, text: str) -> None:
        """Say what the node waits for, once each time it changes ("" when it waits for
        nothing)."""
        if text and self._notes.get(node_id) != text:
            self._say(text)
        self._notes[node_id] = text

    def _launch(self, node_id: str, agents: list[_Agent], gpus: int, cpus: int) -> _Agent:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = _agent_name(node_id, [agent.name for agent in agents])
        first_core = _first_free_core(agents, cpus)
        actor = self._actor_class.options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote()
        ready = actor.ready.remote()
        done = actor.serve.remote(self._connect_to, self._token, name, first_core, cpus)
        return _Agent(name, actor, ready, done, gpus, cpus, first_core, time.monotonic())

    def _kill(self, agent: _Agent) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(agent.actor)


def cpu_share(cpus_total: int, cpus_free: int, gpus_total: int, gpus_free: int) -> int:
    """The CPUs an agent taking ``gpus_free`` GPUs reserves: the free ones, but on a node
    where other work holds GPUs, no more than those GPUs' share of the node's CPUs, so the
    agent that takes the others when they free up finds CPUs for them."""
    if gpus_total == 0 or gpus_free >= gpus_total:
        return cpus_free
    return min(cpus_free, math.ceil(cpus_total * gpus_free / gpus_total))


def _fits(agent: _Agent, free: dict[str, float]) -> bool:
    return agent.gpus <= free.get("GPU", 0) and agent.cpus <= free.get("CPU", 0)


def _waiting(name: str, gpus: int, cpus: int, running: bool) -> str:
    """What the node waits for, in one line ("" for nothing)."""
    if gpus > 0:
        what = f"{gpus} GPU{'s' * (gpus != 1)} held by other Ray work"
        it = "it when it frees" if gpus == 1 else "them when they free"
        then = f"the run takes {it} up" if running else "its agent starts when one frees up"
        return f"node {name}: waiting for {what}; {then}"
    if cpus > 0:
        return (
            f"node {name}: waiting for a CPU: Ray gave all {cpus} of the node's to other work; "
            f"{'the run grows' if running else 'its agent starts'} when one frees up"
        )
    return ""


def _agent_name(node_id: str, taken: list[str]) -> str:
    """``ray-1a2b3c`` for the node's first agent, ``ray-1a2b3c-2`` for a second one."""
    base = node_name(node_id)
    k = 1
    while (base if k == 1 else f"{base}-{k}") in taken:
        k += 1
    return base if k == 1 else f"{base}-{k}"


def _first_free_core(agents: list[_Agent], count: int) -> int:
    """Where a new agent's cores start: the first run of ``count`` no agent of the node has."""
    start = 0
    for agent in sorted(agents, key=lambda a: a.first_core):
        if agent.first_core - start >= count:
            break
        start = max(start, agent.first_core + agent.cpus)
    return start


def _free_per_node() -> dict[str, dict[str, float]]:
    """Each alive node's free resources, as Ray's scheduler counts them."""
    try:  # a developer API: a Ray without it counts every node's resources as free
        return dict(_ray_state().available_resources_per_node())
    except Exception:
        return {}


def _draining_nodes() -> dict[str, int]:
    """The nodes Ray is draining, and when each goes (ms since the epoch; 0: no deadline),
    read as Ray Train reads its preemption notices."""
    try:
        return dict(_ray_state().get_draining_nodes())
    except Exception:
        return {}


def _ray_state() -> Any:
    return importlib.import_module("ray._private.state").state


def node_name(node_id: str) -> str:
    """Slot names say the node: ``ray-1a2b3c/gpu0#0``."""
    return f"ray-{node_id[:6]}"
