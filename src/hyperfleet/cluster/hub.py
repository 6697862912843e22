"""The controller's side of many machines: it listens for agents and keeps one link per node.

The loop waits on every link's connection with its workers' and reads what arrives
(:meth:`NodeHub.pump`): each worker message goes into that worker's inbox (see
:mod:`hyperfleet.cluster.remote`), and the link notes when it last heard the node. A node is
lost when its connection closes or when it has been silent for ``node_timeout`` seconds (it
sends a heartbeat every ``heartbeat`` seconds, and so does the controller's heartbeat thread,
which also finds the silent ones). A lost node's workers end with the kind ``lost``; the loop
hears of nodes joining and leaving through :meth:`NodeHub.take_events`, after being woken. A
node that connects again is a new link with new workers: a lost link is read no more, so
nothing late from it reaches a trial.

A node that does not see the run directory sends each trial's logs; the loop hands them to
the controller's file writer, ahead of the trial's result (see
:mod:`hyperfleet.cluster.trialfiles`). Each node's newest readings (its GPUs, CPU and memory;
see :mod:`hyperfleet.cluster.readings`) are kept on its link, for the loop to take once a tick.
A node that offers TPE sampler processes runs some for the run's pools; their news leaves with
the node's relays, their sets come in with its messages (see
:mod:`hyperfleet.cluster.remote_samplers`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hyperfleet.cluster.channel import (
    HANDSHAKE_SECONDS,
    ChannelListener,
    announced_host,
    controller_token,
    parse_address,
    wildcard_warning,
)
from hyperfleet.cluster.messages import (
    Beat,
    Goodbye,
    Hello,
    Joined,
    NodeReading,
    Refused,
    Relay,
    Relays,
    SamplerEnded,
    SamplerNews,
    SamplerSet,
    StartWorker,
    Welcome,
    WorkerExited,
    WorkerStarted,
    valid_node_name,
)
from hyperfleet.cluster.remote import RemoteWorker
from hyperfleet.cluster.remote_samplers import RemoteSamplers
from hyperfleet.cluster.sealed import SealBroken, SealedConnection
from hyperfleet.cluster.trialfiles import TrialLogs, run_folder_note, trial_folder, write_logs
from hyperfleet.resources.inventory import Inventory
from hyperfleet.resources.slots import Slot
from hyperfleet.store.files import FileWriter
from hyperfleet.workers.nodefolder import NodeRunFolder
from hyperfleet.workers.protocol import ObjectiveSpec

LOST = "lost"
SILENCE_LOOK_SECONDS = 0.05  # the least the heartbeat thread waits between looks (see _beat)


@dataclass(frozen=True)
class ClusterSettings:
    """How the controller meets its agents."""

    listen: str = ""  # HOST:PORT; "" with an engine: the interface the engine uses
    token_file: Path | None = None
    ray: str | None = None  # "auto" or a Ray address: Ray starts one agent per node
    slurm: bool = False  # inside an allocation: srun starts one agent per node
    heartbeat: float = 2.0  # seconds between heartbeats, both ways
    node_timeout: float = 10.0  # a node silent this long is lost (and so is the controller)


@dataclass(frozen=True)
class NodeJoined:
    link: NodeLink
    inventory: Inventory


@dataclass(frozen=True)
class NodeLeft:
    link: NodeLink
    reason: str


@dataclass(frozen=True)
class Refusal:
    where: str
    reason: str

    def line(self) -> str:
        where = f" from {self.where}" if self.where else ""  # none: accept() itself failed
        return f"refused a connection{where}: {self.reason}"


@dataclass(frozen=True)
class EngineNote:
    """What the engine that starts the agents says for the run log (Ray: a node waits for
    GPUs other work holds)."""

    text: str

    def line(self) -> str:
        return self.text


@dataclass(frozen=True)
class NodeDraining:
    """The engine takes the node back at ``deadline`` (monotonic; None: no deadline given)."""

    node: str
    deadline: float | None


NodeEvent = NodeJoined | NodeLeft | Refusal | EngineNote | NodeDraining


class NodeLink:
    """One agent's connection, from the hello to its loss."""

    def __init__(self, conn: SealedConnection, node: str, where: str, hub: NodeHub) -> None:
        self.node, self.where = node, where
        self.own_folder = ""  # the node's own run folder, when it does not see the run's
        self._conn = conn
        self._hub = hub
        self._send_lock = threading.Lock()
        # Relays and sampler news of this step, sent together by flush.
        self._outbox: list[Relay | SamplerNews] = []
        self._workers: dict[int, RemoteWorker] = {}
        # The sampler processes the node offers to the run's pools, and those it runs.
        self.samplers = RemoteSamplers(hub.next_worker_id, self._forward_news, self.send)
        self._workers_lock = threading.Lock()
        self.alive = True
        self.lost_reason = ""
        self.last_heard = time.monotonic()
        self.joined = False  # set once the node answered the welcome: then it is read
        # The node's newest readings (its GPUs, CPU, memory; see cluster/readings.py), when
        # they came (wall time), and the GPU health changes they said, for the run log.
        self.reading: NodeReading | None = None
        self.read_at: float | None = None
        self.problems: list[str] = []
        # The heartbeat thread looks at the descriptor while the loop may close it: never a
        # look at a number that was closed (and maybe reused) meanwhile.
        self._fd_lock = threading.Lock()
        self._closed = False

    @property
    def conn(self) -> SealedConnection:
        return self._conn

    def send(self, message: Any) -> None:
        """Best effort: a send to a lost node is dropped (its workers end as lost anyway).
        The relays waiting to go leave first, so the node sees every message in order."""
        if not self.alive:
            return
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self._send_relays()
            self._conn.send(message)

    def forward(self, worker: int, payload: bytes) -> None:
        """A message for a worker: it leaves with the step's others (:meth:`flush`)."""
        with self._send_lock:
            self._outbox.append(Relay(worker, payload))

    def _forward_news(self, sampler: int, payload: bytes) -> None:
        """News for a sampler process on the node: it leaves with the step's relays. The pool
        hands the same news to each of its processes in turn: the node gets it once."""
        with self._send_lock:
            last = self._outbox[-1] if self._outbox else None
            if isinstance(last, SamplerNews) and last.payload is payload:
                self._outbox[-1] = SamplerNews((*last.samplers, sampler), payload)
            else:
                self._outbox.append(SamplerNews((sampler,), payload))

    def flush(self) -> None:
        """Send the relays of this step, in one write."""
        if not self._outbox or not self.alive:
            return
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            self._send_relays()

    def _send_relays(self) -> None:
        if self._outbox:
            relays, self._outbox = tuple(self._outbox), []
            self._conn.send(Relays(relays))

    def start_worker(self, slot: Slot, specs: dict[str, ObjectiveSpec], cwd: str) -> RemoteWorker:
        wid = self._hub.next_worker_id()
        worker = RemoteWorker(
            slot,
            wid,
            self.node,
            self.forward,
            self.send,
            lambda: self._forget(wid),
            self._hub.attention,
        )
        with self._workers_lock:
            if not self.alive:  # lost meanwhile: the loop handles it as any lost worker
                worker.end(LOST, self._lost_text())
                return worker
            self._workers[wid] = worker
        self.send(StartWorker(wid, slot, specs, cwd))
        return worker

    def _forget(self, worker: int) -> None:
        with self._workers_lock:
            self._workers.pop(worker, None)

    def lose(self, reason: str) -> None:
        """End the link: its workers end as lost, the node hears EOF, the loop is told."""
        with self._workers_lock:
            if not self.alive:
                return
            self.alive = False
            self.lost_reason = reason
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.end(LOST, self._lost_text())
        self.samplers.end_all(self._lost_text())
        self._hang_up()
        self._hub.forget(self)
        self._hub.post(NodeLeft(self, reason))

    def refuse(self, reason: str) -> None:
        """Tell the node it is not used, and why: its agent exits instead of joining again."""
        self._hub.note_refused(self.node)  # before the agent hears it: no launcher restarts it
        self.send(Refused(reason))
        self.lose("cannot be used here")

    def say_goodbye(self) -> None:
        self.send(Goodbye())
        with self._workers_lock:
            self.alive = False
        self.samplers.end_all("the run ended")
        self._hang_up()

    def _hang_up(self) -> None:
        """The node hears EOF, and the loop, waiting on the connection, wakes to read it. The
        descriptor itself is closed by the loop (:meth:`close`): closing it under a wait could
        hand its number to a new socket the wait would then watch."""
        # Not under the send lock: a send stuck on a silent node's full buffer returns then.
        with self._fd_lock, contextlib.suppress(OSError, ValueError):
            if not self._closed:
                with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Called by the loop once the link is lost or said goodbye."""
        with self._fd_lock, self._send_lock, contextlib.suppress(OSError):
            self._closed = True
            self._conn.close()

    def silent(self, timeout: float) -> bool:
        """Heard nothing for ``timeout`` s, not even what waits unread (the loop may be busy)."""
        if time.monotonic() - self.last_heard < timeout:
            return False
        with self._fd_lock:
            if self._closed:
                return False
            with contextlib.suppress(OSError, ValueError):
                readable, _, _ = select.select([self._conn.fileno()], [], [], 0)
                return not readable
        return False

    def run_folder_note(self) -> str:
        """Where this node's trial folders are, in one line."""
        own = NodeRunFolder(str(self._hub.run_dir), self.own_folder) if self.own_folder else None
        return run_folder_note(self.node, own)

    def _lost_text(self) -> str:
        return f"lost: node {self.node} {self.lost_reason}"

    def pump(self) -> None:
        """Read everything the node has sent (the loop calls this when it is readable)."""
        try:
            while self.alive and self._conn.poll():
                message = self._conn.recv()
                self.last_heard = time.monotonic()
                self._handle(message)
        except SealBroken:
            self.lose("sent a message not sealed with this run's token (tampered with on the way?)")
        except (EOFError, OSError, ValueError):
            self.lose("closed its connection")
        except Exception as exc:  # a message that cannot be unpickled here: the node is broken
            self.lose(f"sent what cannot be read ({type(exc).__name__}: {exc})")

    def _handle(self, message: Any) -> None:
        if isinstance(message, Relays):
            for relay in message.items:
                self._handle(relay)
        elif isinstance(message, Relay):
            worker = self._workers.get(message.worker)
            if worker is not None:
                worker.deliver(message.payload)
        elif isinstance(message, WorkerStarted):
            worker = self._workers.get(message.worker)
            if worker is not None:
                worker.pid = message.pid
        elif isinstance(message, WorkerExited):
            with self._workers_lock:
                worker = self._workers.pop(message.worker, None)
            if worker is not None:
                worker.end(message.kind, message.reason, message.outside_signal)
        elif isinstance(message, NodeReading):
            self.reading, self.read_at = message, time.time()
            self.problems += message.problems
        elif isinstance(message, TrialLogs):
            self._hub.write_logs(message)
        elif isinstance(message, SamplerSet | SamplerEnded):
            self.samplers.handle(message, self.node)


class NodeHub:
    """Listens for agents; knows every node's link. Its threads only queue events and wake the
    loop; the loop alone changes the pool."""

    def __init__(
        self,
        settings: ClusterSettings,
        run_dir: Path,
        run_id: str,
        wake: Callable[[], None],
        files: FileWriter,
    ) -> None:
        self.settings = settings
        self.run_dir, self._run_id = run_dir, run_id
        self._files = files  # the controller's file writer: nodes' trial logs go through it
        self._wake = wake
        self._events: queue.SimpleQueue[NodeEvent] = queue.SimpleQueue()
        self._links: dict[str, NodeLink] = {}
        self._reading: list[NodeLink] = []  # joined and not lost: the loop's alone
        # Remote workers with a message or an end for the loop, appended from any thread.
        self.attention: deque[RemoteWorker] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        token, self.token_file = controller_token(settings.token_file, run_dir)
        self._refused: set[str] = set()  # nodes the controller does not use (any thread)
        self._launcher = _launcher(settings, self.say, self.drain_node, self.refused)
        listen = settings.listen
        if not listen and self._launcher is not None:
            listen = f"{self._launcher.listen_host()}:0"
        self._listener = ChannelListener(
            parse_address(listen), token, self._on_peer, self._on_refused
        )
        self.address = self._listener.address
        self._beats = threading.Thread(target=self._beat, name="hyperfleet-beat", daemon=True)
        self._beats.start()
        if self._launcher is not None:
            connect_to = f"{announced_host(self.address[0])}:{self.address[1]}"
            self._launcher.start(connect_to, token, self.lose_node)

    def next_worker_id(self) -> int:
        return next(self._ids)

    def post(self, event: NodeEvent) -> None:
        self._events.put(event)
        self._wake()

    def take_events(self) -> list[NodeEvent]:
        """What happened since the last call (the loop's thread): a joined link is read from
        now on, a lost one is read no more and closed."""
        events = []
        with contextlib.suppress(queue.Empty):
            while True:
                events.append(self._events.get_nowait())
        for event in events:
            if isinstance(event, NodeJoined) and event.link.alive:
                self._reading.append(event.link)
            elif isinstance(event, NodeLeft):
                if event.link in self._reading:
                    self._reading.remove(event.link)
                event.link.close()
        return events

    def links(self) -> list[NodeLink]:
        """The nodes joined and not lost (the loop's thread)."""
        return list(self._reading)

    def waitables(self) -> list[SealedConnection]:
        """The links to wait on; what the loop has for them leaves now, before it waits."""
        self.flush()
        return [link.conn for link in self._reading]

    def flush(self) -> None:
        """Send what the loop has for the workers now."""
        for link in self._reading:
            link.flush()

    def pump(self, ready: list[Any]) -> None:
        """Read the links that have something to read; their workers' messages go to inboxes."""
        for link in self._reading:
            if link.conn in ready:
                link.pump()

    def take_attention(self) -> list[RemoteWorker]:
        """The remote workers with news since the last call, each once, oldest first."""
        news: dict[RemoteWorker, None] = {}
        with contextlib.suppress(IndexError):
            while True:
                news[self.attention.popleft()] = None
        return list(news)

    def start_messages(self) -> list[str]:
        """Where the controller listens, who starts the agents, and a warning when it listens
        on every interface."""
        warning = wildcard_warning(self.address[0])
        return [self._where_agents_go(), *([warning] if warning else [])]

    def _where_agents_go(self) -> str:
        host, port = announced_host(self.address[0]), self.address[1]
        if self.settings.ray is not None:
            return f"listening for agents on {host}:{port}; Ray starts one on each node"
        if self.settings.slurm:
            return f"listening for agents on {host}:{port}; srun starts one on each node"
        token = f" --token-file {self.token_file}" if self.token_file else ""
        return (
            f"listening for agents on {host}:{port}; start one on each node: "
            f"hyperfleet agent --connect {host}:{port}{token}"
        )

    def lose_node(self, node: str, reason: str) -> None:
        """The engine reports the node dead: lose it now rather than at its timeout."""
        with self._lock:
            link = self._links.get(node)
        if link is not None:
            link.lose(reason)

    def note_refused(self, node: str) -> None:
        with self._lock:
            self._refused.add(node)

    def refused(self, node: str) -> bool:
        """Whether the controller refused the node: an engine does not start its agent again."""
        with self._lock:
            return node in self._refused

    def refused_nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._refused)

    def say(self, text: str) -> None:
        """A line from the engine for the run log (any thread)."""
        self.post(EngineNote(text))

    def drain_node(self, node: str, seconds_left: float | None) -> None:
        """The engine takes the node back in ``seconds_left`` (None: it gave no deadline)."""
        deadline = None if seconds_left is None else time.monotonic() + seconds_left
        self.post(NodeDraining(node, deadline))

    def close(self) -> None:
        """The run is over: every agent is told, stops its workers and exits."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.say_goodbye()
            link.close()
        self._beats.join(timeout=2.0)
        if self._launcher is not None:
            self._launcher.close()

    def _on_peer(self, conn: SealedConnection, first: Any, where: str) -> None:
        if not isinstance(first, Hello) or not valid_node_name(first.node):
            with contextlib.suppress(OSError):
                conn.send(Refused("the first message must be a hello with a node name"))
            conn.close()
            self.post(Refusal(where, "its first message was not an agent's hello"))
            return
        link = NodeLink(conn, first.node, where, self)
        offered = first.sampling_processes
        link.samplers.offered = offered if isinstance(offered, int) and offered > 0 else 0
        with self._lock:
            if self._closed.is_set():
                conn.close()
                return
            old = self._links.get(first.node)
            self._links[first.node] = link
        if old is not None:  # the node came back before its old link was found lost
            old.lose("connected again")
        link.send(
            Welcome(
                self.settings.heartbeat,
                self.settings.node_timeout,
                str(self.run_dir),
                self._run_id,
            )
        )
        try:
            joined = conn.recv() if conn.poll(HANDSHAKE_SECONDS) else None
        except Exception:  # it hung up between its hello and joining, or sent garbage
            joined = None
        if not isinstance(joined, Joined):
            why = f"node {first.node} did not answer the welcome"
            link.send(Refused(why))
            self.forget(link)
            link.say_goodbye()
            link.close()
            self.post(Refusal(where, why))
            return
        if not joined.shares_run_dir:
            link.own_folder = joined.local_run_dir
        link.joined = True
        self.post(NodeJoined(link, first.inventory))

    def write_logs(self, logs: TrialLogs) -> None:
        """Queue a node's trial logs for the file writer; what is not a trial's log is dropped
        (the node is authenticated, but its paths never leave the run directory)."""
        folder = trial_folder(self.run_dir, logs)
        if folder is not None:
            self._files.queue(functools.partial(write_logs, self.run_dir, folder, logs.logs))

    def _on_refused(self, where: str, reason: str) -> None:
        self.post(Refusal(where, reason))

    def forget(self, link: NodeLink) -> None:
        with self._lock:
            if self._links.get(link.node) is link:
                del self._links[link.node]

    def _beat(self) -> None:
        """Send heartbeats, and lose the nodes that have gone silent. The thread wakes for the
        next heartbeat or when the quietest node's silence reaches the node timeout, so a
        silent node is lost on time. Looking once a heartbeat lost it up to a heartbeat late:
        with the defaults, a stopped node's trial ran again 11.2-11.7 s after the stop, now
        9.7 s (bench/recovery.py)."""
        timeout, every = self.settings.node_timeout, self.settings.heartbeat
        next_beat = time.monotonic() + every
        wait = min(every, timeout)
        while not self._closed.wait(wait):
            with self._lock:
                links = [link for link in self._links.values() if link.joined]
            now = time.monotonic()
            beat = now >= next_beat
            if beat:
                next_beat += every
            for link in links:
                if link.silent(timeout):
                    link.lose(f"sent no heartbeat for {timeout:g}s")
                elif beat:
                    link.send(Beat())
            quietest = min((link.last_heard for link in links if link.alive), default=now)
            # Never a busy loop: a node past its timeout whose messages wait unread (the loop
            # is busy) is not silent, and is looked at again shortly.
            wait = max(SILENCE_LOOK_SECONDS, min(next_beat, quietest + timeout) - now)


class Launcher(Protocol):
    """An engine that starts the agents: it places and kills them, hyperfleet does not."""

    def listen_host(self) -> str: ...

    def start(self, connect_to: str, token: bytes, lose: Callable[[str, str], None]) -> None: ...

    def close(self) -> None: ...


def _launcher(
    settings: ClusterSettings,
    say: Callable[[str], None],
    drain: Callable[[str, float | None], None],
    refused: Callable[[str], bool],
) -> Launcher | None:
    if settings.ray is not None:
        from hyperfleet.cluster.ray_launcher import RayLauncher

        return RayLauncher(settings.ray, say, drain)
    if settings.slurm:
        from hyperfleet.cluster.slurm_launcher import SlurmLauncher

        return SlurmLauncher(say, refused)
    return None
