"""``hyperfleet agent``: one per node; starts the node's workers and relays their messages.

The agent inventories its node (GPUs, cores, fake GPUs, MPS) with the code a single machine
uses, says hello, and then starts each worker the controller asks for, pinned to its slot, as a
local controller would. One thread relays: the controller's messages to the workers, the
workers' messages to the controller, each worker's death to the controller. When the controller
is gone (its connection closes, or it is silent for the node timeout it set) the agent kills
every worker and what they started, and exits: no process outlives its run on any node.
An agent stopped by SIGTERM or Ctrl+C (the job's end, the node taken back) says its workers'
trials were interrupted, so they run again and never count; a worker that a stop signal from
outside killed is reported as such (see :mod:`hyperfleet.workers.handle`).

A node that does not see the controller's run directory runs its trials in a run folder of its
own and sends each trial's logs back (see :mod:`hyperfleet.cluster.trialfiles`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType
from typing import Any

from hyperfleet.cluster.channel import connect, parse_address
from hyperfleet.cluster.messages import (
    Beat,
    Goodbye,
    Hello,
    Joined,
    Refused,
    Relay,
    Relays,
    SamplerNews,
    SignalWorker,
    StartSampler,
    StartWorker,
    StopSampler,
    StopWorker,
    Welcome,
    WorkerExited,
    WorkerStarted,
    valid_node_name,
)
from hyperfleet.cluster.node_samplers import NodeSamplers
from hyperfleet.cluster.readings import READING_SECONDS, NodeSampler
from hyperfleet.cluster.sealed import SealBroken, SealedConnection
from hyperfleet.cluster.trialfiles import collect_logs, run_folder_note
from hyperfleet.errors import HyperfleetError, NodeError
from hyperfleet.resources.inventory import Inventory, detect_inventory
from hyperfleet.store.rundir import RunDir
from hyperfleet.workers.handle import WorkerHandle, stop_workers
from hyperfleet.workers.nodefolder import NodeRunFolder
from hyperfleet.workers.protocol import TRIAL_ENDED, TRIAL_STARTED


class Agent:
    def __init__(
        self,
        conn: SealedConnection,
        welcome: Welcome,
        log_dir: Path,
        node: str,
        folder: NodeRunFolder | None,
        sampler: NodeSampler | None = None,
        sampling_processes: int = 0,
    ) -> None:
        self._conn = conn
        self._heartbeat, self._timeout = welcome.heartbeat, welcome.node_timeout
        self._log_dir = log_dir
        self._node = node
        self._folder = folder  # None when this node shares the controller's run directory
        self._workers: dict[int, WorkerHandle] = {}
        # The sampler processes it runs for the controller's pools, as many as it offered.
        self._samplers = NodeSamplers(sampling_processes, log_dir, node)
        self._outbox: list[Relay] = []  # the workers' messages of this step, sent together
        self._trials: dict[int, str] = {}  # worker -> its trial's folder, on a node's own folder
        self._last_heard = self._last_sent = time.monotonic()
        # The node's readings go about once a second, and serve as heartbeats meanwhile.
        self._sampler = sampler
        self._next_reading = self._last_sent + READING_SECONDS if sampler else float("inf")
        if sampler is not None:
            sampler.workers = self.worker_pids
        self._stopping: list[threading.Thread] = []
        self.ended_by = ""  # why the agent stopped: "goodbye" or what went wrong
        self.controller_lost = False  # it stopped because the controller went away
        # The stop signal the agent got ("SIGTERM"): its node is being stopped from outside
        # (the job's end, the node taken back), so its trials end as interrupted.
        self.signalled = ""

    def run(self) -> None:
        try:
            while not self.ended_by:
                self._step()
        finally:
            if self.signalled:
                self._say_interrupted()
            stop_workers(list(self._workers.values()), graceful=False)
            self._workers.clear()
            self._samplers.close()
            for thread in self._stopping:
                thread.join()
            with contextlib.suppress(OSError):
                self._conn.close()

    def worker_pids(self) -> dict[int, int]:
        """The node's workers now, id -> pid (read by the sampler's thread: a copy)."""
        return {wid: worker.pid for wid, worker in list(self._workers.items())}

    def stop(self, why: str) -> None:
        """End the agent; the first reason is the one it exits with."""
        self.ended_by = self.ended_by or why

    def stop_by_signal(self, name: str) -> None:
        """SIGTERM or Ctrl+C: the node is being stopped; its running trials are interrupted."""
        self.signalled = self.signalled or name
        self.stop(f"stopped by {name}")

    def _say_interrupted(self) -> None:
        """Before the workers are stopped: their trials end as interrupted, not as lost (the
        node did not fail, it was stopped), so they run again and never count."""
        reason = self._interrupted_reason()
        for wid in list(self._workers):
            self._send(WorkerExited(wid, "interrupted", reason))

    def _interrupted_reason(self) -> str:
        return (
            f"interrupted: node {self._node} got {self.signalled} (the job's end, or the node "
            "taken back); it runs again"
        )

    def lose_controller(self, why: str) -> None:
        """End the agent because the controller is gone (killed, its link cut): the node may
        rejoin it, or the controller run again."""
        if not self.ended_by:
            self.controller_lost = True
        self.stop(why)

    def _step(self) -> None:
        waitables: list[Any] = [self._conn]
        for worker in self._workers.values():
            waitables.extend(worker.waitables())
        waitables.extend(self._samplers.waitables())
        now = time.monotonic()
        wake = min(
            self._last_sent + self._heartbeat, self._last_heard + self._timeout, self._next_reading
        )
        ready: list[Any] = wait(waitables, timeout=max(0.0, wake - now))
        if self._conn in ready:
            self._from_controller()
        for wid, worker in list(self._workers.items()):
            if worker.conn in ready or worker.has_exited():
                self._from_worker(wid, worker)
        for said in self._samplers.read(ready):
            self._send(said)
        self._flush()
        now = time.monotonic()
        if now - self._last_heard > self._timeout:
            self.lose_controller(f"the controller sent nothing for {self._timeout:g}s")
            return
        if now >= self._next_reading:
            self._send_reading(now)
        if now - self._last_sent >= self._heartbeat:
            self._send(Beat())

    def _send_reading(self, now: float) -> None:
        """The node's newest reading, if the sampler has one (else a beat says it lives)."""
        assert self._sampler is not None
        self._next_reading = now + READING_SECONDS
        reading = self._sampler.take()
        if reading is not None:
            self._send(reading)

    def _send(self, message: Any) -> None:
        """Send now; the relays waiting to go leave first, so the controller sees every
        message in order (a trial's logs before its result, a result before its worker's
        exit)."""
        try:
            self._send_relays()
            self._conn.send(message)
        except OSError:
            self.lose_controller("the connection to the controller broke")
        self._last_sent = time.monotonic()

    def _flush(self) -> None:
        """Send the relays of this step, in one write."""
        try:
            self._send_relays()
        except OSError:
            self.lose_controller("the connection to the controller broke")

    def _send_relays(self) -> None:
        if self._outbox:
            relays, self._outbox = tuple(self._outbox), []
            self._conn.send(Relays(relays))
            self._last_sent = time.monotonic()

    def _from_controller(self) -> None:
        try:
            while not self.ended_by and self._conn.poll():
                self._last_heard = time.monotonic()
                self._handle(self._conn.recv())
        except SealBroken:
            self.lose_controller("a message from the controller was not sealed with the token")
        except (EOFError, OSError):
            self.lose_controller("the controller closed the connection")

    def _handle(self, message: Any) -> None:
        if isinstance(message, Relays):
            for relay in message.items:
                self._handle(relay)
        elif isinstance(message, Relay):
            worker = self._workers.get(message.worker)
            if worker is not None:
                with contextlib.suppress(OSError):
                    worker.conn.send_bytes(message.payload)
        elif isinstance(message, StartWorker):
            self._start(message)
        elif isinstance(message, StopWorker):
            worker = self._workers.get(message.worker)
            if message.graceful and worker is not None:
                worker.ask_to_leave()  # its exit is reported as any worker's
            else:
                self._stop_worker(message.worker)
        elif isinstance(message, SignalWorker):
            worker = self._workers.get(message.worker)
            if worker is not None:
                worker._signal_group(signal.Signals(message.signum))
        elif isinstance(message, SamplerNews):
            self._samplers.forward(message)
        elif isinstance(message, StartSampler):
            refusal = self._samplers.start(message)
            if refusal is not None:
                self._send(refusal)
        elif isinstance(message, StopSampler):
            self._samplers.stop(message.sampler)
        elif isinstance(message, Goodbye):
            self.stop("goodbye")
        elif isinstance(message, Refused):
            self.stop(f"the controller refused this node: {message.reason}")

    def _start(self, message: StartWorker) -> None:
        if self._folder is None:
            worker = WorkerHandle(message.slot, message.specs, self._log_dir, Path(message.cwd))
        else:
            worker = WorkerHandle(
                message.slot,
                message.specs,
                self._log_dir,
                Path(self._folder.local),
                self._folder.to_env(),
            )
        self._workers[message.worker] = worker
        self._send(WorkerStarted(message.worker, worker.pid))

    def _from_worker(self, wid: int, worker: WorkerHandle) -> None:
        try:
            while worker.conn.poll():
                payload = worker.conn.recv_bytes()
                if self._folder is not None and payload.startswith(TRIAL_STARTED):
                    self._trials[wid] = payload[len(TRIAL_STARTED) :].decode()
                elif self._folder is not None and payload == TRIAL_ENDED:
                    self._send_logs(wid)  # before the result, which follows
                else:
                    self._outbox.append(Relay(wid, payload))
        except (EOFError, OSError):
            pass
        if worker.has_exited():
            kind, reason = worker.exit_description()
            outside = worker.outside_signal()
            if outside and self.signalled:  # the job's end reached the worker and this agent
                kind, reason = "interrupted", self._interrupted_reason()
            self._send_logs(wid)  # what a trial wrote before its worker died tells why
            self._send(WorkerExited(wid, kind, reason, outside))
            self._stop_worker(wid)

    def _send_logs(self, wid: int) -> None:
        """The logs of the worker's trial, from this node's own run folder to the controller."""
        folder = self._trials.pop(wid, None)
        if folder is not None and self._folder is not None:
            self._send(collect_logs(Path(self._folder.local), folder, self._node))

    def _stop_worker(self, wid: int) -> None:
        """Kill the worker and all it started, in the background: the relay waits for no one."""
        self._send_logs(wid)  # a trial the controller ended (its timeout): its logs so far
        worker = self._workers.pop(wid, None)
        if worker is None:
            return
        thread = threading.Thread(
            target=stop_workers, args=([worker], False), name="hyperfleet-stop", daemon=True
        )
        thread.start()
        self._stopping = [t for t in self._stopping if t.is_alive()] + [thread]


def run_agent(
    connect_to: str,
    token: bytes,
    node: str | None,
    log_dir: Path,
    patience: float,
    work_dir: Path = Path("hyperfleet-agent-runs"),
    inventory: Inventory | None = None,
    sampling_processes: int = 0,
) -> str:
    """Serve one controller until it ends the run; returns why the agent stopped.

    When the controller goes away without ending the run (killed, its machine lost, the link
    cut), the node's workers are stopped as always, and the agent tries for ``patience``
    seconds to join it again: a controller run again to resume, or the same one once the link
    is back, gets the node back with fresh workers and nobody restarts agents by hand.
    ``work_dir`` holds the node's own run folders, used when the node does not see the
    controller's run directory. ``inventory``: what an engine reserved for this agent (Ray:
    the GPUs and cores of its share of the node), in place of all the node shows.
    ``sampling_processes``: TPE sampler processes this node offers the controller's pools
    (see cluster/node_samplers.py)."""
    # SLURM may run several slurmd on one host, each with a node name of its own.
    name = node or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if not valid_node_name(name):
        raise NodeError(f"node name {name!r} cannot name slots; pass --node with a plain name.")
    inventory = detect_inventory() if inventory is None else inventory
    address = parse_address(connect_to, "--connect")
    sampler = NodeSampler(inventory.gpus)
    try:
        node_side = _NodeSide(
            connect_to, address, token, name, inventory, log_dir, work_dir, sampling_processes
        )
        return _serve(node_side, patience, sampler)
    finally:
        sampler.close()


@dataclass(frozen=True)
class _NodeSide:
    """What an agent joins with, each time it joins."""

    connect_to: str  # as the user wrote it, for messages
    address: tuple[str, int]
    token: bytes
    name: str
    inventory: Inventory
    log_dir: Path
    work_dir: Path
    sampling_processes: int = 0  # sampler processes it offers the controller's pools


def _serve(node: _NodeSide, patience: float, sampler: NodeSampler) -> str:
    """Join, serve, and join again after losing the controller, for ``run_agent``."""
    agent = _join(node, patience, sampler)
    while True:
        with _stop_on_signals(agent):
            agent.run()
        if not agent.controller_lost:
            return agent.ended_by
        print(
            f"hyperfleet agent {node.name}: {agent.ended_by}; its workers are stopped; trying "
            f"to join it again for {patience:g}s",
            flush=True,
        )
        try:
            agent = _join(node, patience, sampler)
        except NodeError as exc:
            return f"{agent.ended_by}; could not join it again: {exc}"
        except KeyboardInterrupt:
            return "stopped by SIGINT"


def _join(node: _NodeSide, patience: float, sampler: NodeSampler | None = None) -> Agent:
    """Connect, say hello, and take the controller's welcome: an agent ready to run."""
    conn = connect(node.address, node.token, patience)
    try:
        conn.send(Hello(node.name, node.inventory, os.getpid(), node.sampling_processes))
        if not conn.poll(patience):
            raise NodeError("the controller said nothing after the hello; is it still running?")
        welcome = conn.recv()
    except (EOFError, OSError):
        raise NodeError(
            f"the controller at {node.connect_to} closed the connection after this agent's "
            "hello; see its run log for why"
        ) from None
    if isinstance(welcome, Refused):
        raise NodeError(f"the controller refused node {node.name}: {welcome.reason}")
    folder = None if shares_run_dir(welcome) else own_run_folder(welcome, node.work_dir)
    conn.send(Joined(folder is None, folder.local if folder is not None else ""))
    note = run_folder_note(node.name, folder)
    print(f"hyperfleet agent {node.name}: joined {node.connect_to}; {note}", flush=True)
    node.log_dir.mkdir(parents=True, exist_ok=True)
    return Agent(conn, welcome, node.log_dir, node.name, folder, sampler, node.sampling_processes)


def shares_run_dir(welcome: Welcome) -> bool:
    """Whether this node sees the controller's run directory itself (same id), not merely a
    folder at the same path."""
    try:
        return RunDir(welcome.run_dir).identity == welcome.run_id
    except (HyperfleetError, OSError):
        return False


def own_run_folder(welcome: Welcome, work_dir: Path) -> NodeRunFolder:
    """This node's folder in place of the controller's run directory: named after it and its
    id, so the same run resumed finds it again and two runs never share one."""
    local = (work_dir / f"{Path(welcome.run_dir).name}-{welcome.run_id[:8]}").absolute()
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NodeError(
            f"this node does not see the run directory {welcome.run_dir} and cannot make its "
            f"own run folder {local} ({exc.strerror}); pass --work-dir with a folder it may "
            "write"
        ) from exc
    return NodeRunFolder(welcome.run_dir, str(local))


@contextlib.contextmanager
def _stop_on_signals(agent: Agent) -> Any:
    """SIGTERM or Ctrl+C (an engine taking the node back): stop the workers and leave."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        agent.stop_by_signal(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield  # inside an engine's task thread: the engine ends the process itself
        return
    previous = [signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)]
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
