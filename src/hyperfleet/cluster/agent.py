"""``hyperfleet agent``: one per node; starts the node's workers and relays their messages.

The agent inventories its node (GPUs, cores, fake GPUs, MPS) with the code a single machine
uses, says hello, and then starts each worker the controller asks for, pinned to its slot, as a
local controller would. One thread relays: the controller's messages to the workers, the
workers' messages to the controller, each worker's death to the controller. When the controller
is gone (its connection closes, or it is silent for the node timeout it set) the agent kills
every worker and what they started, and exits: no process outlives its run on any node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection, wait
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
    SignalWorker,
    StartWorker,
    StopWorker,
    Welcome,
    WorkerExited,
    WorkerStarted,
    valid_node_name,
)
from hyperfleet.controller.workers import WorkerHandle, stop_workers
from hyperfleet.errors import HyperfleetError, NodeError
from hyperfleet.resources.inventory import detect_inventory
from hyperfleet.rundir import RunDir


class Agent:
    def __init__(self, conn: Connection, welcome: Welcome, log_dir: Path) -> None:
        self._conn = conn
        self._heartbeat, self._timeout = welcome.heartbeat, welcome.node_timeout
        self._log_dir = log_dir
        self._workers: dict[int, WorkerHandle] = {}
        self._last_heard = self._last_sent = time.monotonic()
        self._stopping: list[threading.Thread] = []
        self.ended_by = ""  # why the agent stopped: "goodbye" or what went wrong

    def run(self) -> None:
        try:
            while not self.ended_by:
                self._step()
        finally:
            stop_workers(list(self._workers.values()), graceful=False)
            self._workers.clear()
            for thread in self._stopping:
                thread.join()
            with contextlib.suppress(OSError):
                self._conn.close()

    def stop(self, why: str) -> None:
        """End the agent; the first reason is the one it exits with."""
        self.ended_by = self.ended_by or why

    def _step(self) -> None:
        waitables: list[Any] = [self._conn]
        for worker in self._workers.values():
            waitables.extend(worker.waitables())
        now = time.monotonic()
        wake = min(self._last_sent + self._heartbeat, self._last_heard + self._timeout)
        ready = wait(waitables, timeout=max(0.0, wake - now))
        if self._conn in ready:
            self._from_controller()
        for wid, worker in list(self._workers.items()):
            if worker.conn in ready or worker.has_exited():
                self._from_worker(wid, worker)
        now = time.monotonic()
        if now - self._last_heard > self._timeout:
            self.stop(f"the controller sent nothing for {self._timeout:g}s")
        elif now - self._last_sent >= self._heartbeat:
            self._send(Beat())

    def _send(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except OSError:
            self.stop("the connection to the controller broke")
        self._last_sent = time.monotonic()

    def _from_controller(self) -> None:
        try:
            while not self.ended_by and self._conn.poll():
                self._last_heard = time.monotonic()
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self.stop("the controller closed the connection")

    def _handle(self, message: Any) -> None:
        if isinstance(message, Relay):
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
        elif isinstance(message, Goodbye):
            self.stop("goodbye")
        elif isinstance(message, Refused):
            self.stop(f"the controller refused this node: {message.reason}")

    def _start(self, message: StartWorker) -> None:
        # The controller's run directory when this node shares it, else the agent's own.
        cwd = Path(message.cwd) if Path(message.cwd).is_dir() else Path.cwd()
        worker = WorkerHandle(message.slot, message.specs, self._log_dir, cwd)
        self._workers[message.worker] = worker
        self._send(WorkerStarted(message.worker, worker.pid))

    def _from_worker(self, wid: int, worker: WorkerHandle) -> None:
        try:
            while worker.conn.poll():
                self._send(Relay(wid, worker.conn.recv_bytes()))
        except (EOFError, OSError):
            pass
        if worker.has_exited():
            kind, reason = worker.exit_description()
            self._send(WorkerExited(wid, kind, reason))
            self._stop_worker(wid)

    def _stop_worker(self, wid: int) -> None:
        """Kill the worker and all it started, in the background: the relay waits for no one."""
        worker = self._workers.pop(wid, None)
        if worker is None:
            return
        thread = threading.Thread(
            target=stop_workers, args=([worker], False), name="hyperfleet-stop", daemon=True
        )
        thread.start()
        self._stopping = [t for t in self._stopping if t.is_alive()] + [thread]


def run_agent(
    connect_to: str, token: bytes, node: str | None, log_dir: Path, patience: float
) -> str:
    """Serve one controller until it ends the run; returns why the agent stopped."""
    # SLURM may run several slurmd on one host, each with a node name of its own.
    name = node or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if not valid_node_name(name):
        raise NodeError(f"node name {name!r} cannot name slots; pass --node with a plain name.")
    inventory = detect_inventory()
    conn = connect(parse_address(connect_to, "--connect"), token, patience)
    conn.send(Hello(name, inventory, os.getpid()))
    if not conn.poll(patience):
        raise NodeError("the controller said nothing after the hello; is it a hyperfleet run?")
    welcome = conn.recv()
    if isinstance(welcome, Refused):
        raise NodeError(f"the controller refused node {name}: {welcome.reason}")
    conn.send(Joined(shares_run_dir(welcome)))
    log_dir.mkdir(parents=True, exist_ok=True)
    agent = Agent(conn, welcome, log_dir)
    with _stop_on_signals(agent):
        agent.run()
    return agent.ended_by


def shares_run_dir(welcome: Welcome) -> bool:
    """Whether this node sees the controller's run directory itself (same id), not merely a
    folder at the same path."""
    try:
        return RunDir(welcome.run_dir).identity == welcome.run_id
    except (HyperfleetError, OSError):
        return False


@contextlib.contextmanager
def _stop_on_signals(agent: Agent) -> Any:
    """SIGTERM or Ctrl+C (an engine taking the node back): stop the workers and leave."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        agent.stop(f"stopped by {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():
        yield  # inside an engine's task thread: the engine ends the process itself
        return
    previous = [signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)]
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
