"""The worker contract as the controller holds it: the :class:`Worker` protocol, and the local
worker process behind it (starting, watching and stopping it).

The controller's loop sees every worker through :class:`Worker`, whether it runs here
(:class:`WorkerHandle`) or on another node (:class:`~hyperfleet.cluster.remote.RemoteWorker`,
whose connection relays to the node's agent); both share :class:`ObjectiveLoading`.

Each worker is a fresh interpreter (never a fork: CUDA must not be inherited) started with its
slot's environment, in its own session so that the terminal's Ctrl+C reaches only the controller
and a kill of its process group takes everything the objective started with it. What the
objective started outside the group is found as described in
:mod:`hyperfleet.workers.descendants`: among the worker's descendants while it lives, by the
marker in its environment once it is dead.

A worker killed by a stop signal (SIGTERM, SIGINT, SIGHUP) that hyperfleet did not send it was
stopped from outside, and says so (:meth:`WorkerHandle.outside_signal`). Most often that is the
end of the job the run is part of: ``scancel``, a time limit or a preemption sends SIGTERM to
every process of the job at once, workers included, and a worker may die of it before the
controller's own SIGTERM has started its stop. The controller then waits a moment for its own
stop before it calls the trial a crash (see ``Workforce.on_exit`` in ``controller.workforce``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from hyperfleet.resources.slots import Slot
from hyperfleet.workers import descendants
from hyperfleet.workers.protocol import Load, ObjectiveSpec, Release, Shutdown, WorkerSetup

# How long idle workers asked to leave get to exit on their own before they are killed.
SHUTDOWN_SECONDS = 2.0
# The signals that ask a process to end: what a scheduler sends every process of a job at its
# end, and what a person sends with kill or Ctrl+C.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class MessageConnection(Protocol):
    """What the loop reads a worker's messages from and sends it messages through: a pipe to a
    local worker, an inbox for a remote one."""

    def poll(self) -> bool: ...

    def recv(self) -> Any: ...

    def send(self, obj: Any) -> None: ...

    def close(self) -> None: ...


class Worker(Protocol):
    """What the controller's loop asks of a worker, local or remote."""

    slot: Slot
    trials_run: int  # trials it ran, counted by the loop
    ready: bool  # it said Ready and takes trials
    loaded: set[str]
    loading: str | None
    leaving: bool

    @property
    def pid(self) -> int:
        """Its process id (on its node, for a remote worker; 0 until that node says)."""

    @property
    def conn(self) -> MessageConnection: ...

    def load(self, study: str) -> None: ...

    def release(self, study: str) -> None: ...

    def waitables(self) -> list[object]:
        """What the loop waits on for its messages (none for a remote worker: its node's
        connection is waited on instead)."""

    def has_exited(self) -> bool: ...

    def exit_description(self) -> tuple[str, str]:
        """(kind, reason) for a worker that died during a trial."""

    def outside_signal(self) -> str:
        """The stop signal from outside hyperfleet that ended it ("SIGTERM"), or ""."""

    def terminate(self, grace: float) -> None: ...

    def kill(self) -> None: ...

    def shutdown(self) -> None: ...

    def ask_to_leave(self) -> None: ...

    def close(self) -> None: ...

    # Private by name, but part of the contract: the loop signals a worker's whole process
    # group when its node is taken back, before it terminates the worker.
    def _signal_group(self, sig: signal.Signals) -> None: ...


class ObjectiveLoading:
    """Which studies' objectives a worker holds, as the controller asked: the same for a
    worker here and one on another node (whose ``conn`` relays to it)."""

    conn: MessageConnection

    def __init__(self) -> None:
        self.loaded: set[str] = set()  # the studies whose objective this worker holds
        self.loading: str | None = None  # the study whose objective it is loading now
        # It exits on its own (asked to leave, or after a failed load): no trial goes to it,
        # and its exit is neither a start failure nor a crash of a trial.
        self.leaving = False

    def load(self, study: str) -> None:
        self.loading = study
        # A worker that died meanwhile is noticed by the loop, which frees what it held.
        with contextlib.suppress(ConnectionError):
            self.conn.send(Load(study))

    def release(self, study: str) -> None:
        self.loaded.discard(study)
        with contextlib.suppress(ConnectionError):
            self.conn.send(Release(study))


class WorkerHandle(ObjectiveLoading):
    def __init__(
        self,
        slot: Slot,
        specs: dict[str, ObjectiveSpec],
        log_dir: Path,
        cwd: Path,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.slot = slot
        self.trials_run = 0
        self.ready = False
        self.marker = secrets.token_hex(8)  # inherited by everything the worker starts
        # Epoch seconds, as process start times are; a second early for clock granularity.
        self.started_at = time.time() - 1.0
        self._asked_to_leave = False
        self._sent_stop_signal = False  # hyperfleet itself asked it to end (see outside_signal)
        parent_sock, child_sock = socket.socketpair()
        lifeline_read, self._lifeline = os.pipe()
        log_name = slot.name.replace("#", "-").replace("/", "-")  # node3/gpu1#0: node3-gpu1-0
        log = open(log_dir / f"{log_name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hyperfleet.workers.main",
                    str(child_sock.fileno()),
                    str(lifeline_read),
                ],
                env={
                    **os.environ,
                    **(extra_env or {}),
                    **slot.environment(),
                    descendants.MARKER_ENV: self.marker,
                },
                pass_fds=(child_sock.fileno(), lifeline_read),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
        finally:
            log.close()
            child_sock.close()
            os.close(lifeline_read)
        self.conn: Connection = Connection(parent_sock.detach())
        self.exit_fd = _pidfd(self.process.pid)
        self.conn.send(WorkerSetup(specs, slot.name))

    @property
    def pid(self) -> int:
        return self.process.pid

    def waitables(self) -> list[object]:
        return [self.conn] if self.exit_fd is None else [self.conn, self.exit_fd]

    def has_exited(self) -> bool:
        return self.process.poll() is not None

    def exit_description(self) -> tuple[str, str]:
        """(kind, reason) for a worker that died during a trial."""
        code = self.process.wait()
        if code < 0:
            sig = signal.Signals(-code)
            if sig == signal.SIGKILL:
                return "crash", "killed by SIGKILL (out of memory, or killed from outside)"
            return "crash", f"killed by signal {sig.name}"
        return "crash", f"worker process exited with status {code}"

    def outside_signal(self) -> str:
        """The name of the stop signal that killed the worker ("SIGTERM") when hyperfleet sent
        it none: it came from outside (the job's end, a person); "" otherwise."""
        code = self.process.poll()
        if code is None or code >= 0 or self._sent_stop_signal:
            return ""
        sig = signal.Signals(-code)
        return sig.name if sig in STOP_SIGNALS else ""

    def terminate(self, grace: float) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``grace`` seconds."""
        self._signal_group(signal.SIGTERM)
        _wait_for_exits([self], time.monotonic() + grace)
        self.kill()

    def kill(self) -> None:
        """Kill the worker and everything it started, at once."""
        stop_workers([self], graceful=False)

    def shutdown(self) -> None:
        """Ask an idle worker to leave, then make sure everything it started is gone."""
        stop_workers([self], graceful=True)

    def ask_to_leave(self) -> None:
        """Ask an idle worker to leave, without waiting: its exit is noticed like any other.
        It takes no trial meanwhile (it is no longer ready)."""
        self.ready = False
        self._ask_to_leave()

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal the worker's process group and every descendant of the worker, so that what
        left the group (``start_new_session=True``, ``setsid``) is reached too."""
        if sig in STOP_SIGNALS:
            self._sent_stop_signal = True
        # Found before the group is signalled: once the worker is dead its tree is gone.
        tree = descendants.descendants(self.process.pid) if self.process.poll() is None else []
        # The worker leads its own session, so its pid is its process group id; the group lives
        # on while any process the objective started is still in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
        descendants.send(tree, sig)

    def _ask_to_leave(self) -> None:
        self._asked_to_leave = True
        with contextlib.suppress(OSError):
            self.conn.send(Shutdown())

    def _left_cleanly(self) -> bool:
        # A worker that was asked to leave ends its own processes before it exits with 0.
        return self._asked_to_leave and self.process.returncode == 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.exit_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.exit_fd)
            self.exit_fd = None
        if self._lifeline >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = -1


def stop_workers(workers: Iterable[WorkerHandle], graceful: bool) -> None:
    """Stop workers together, so that stopping many takes as long as stopping one.

    ``graceful``: ready (idle) workers are asked to leave and get ``SHUTDOWN_SECONDS``; every
    other worker, and any that does not leave in time, is killed with all it started. A worker
    that did not leave cleanly may have left processes that its death re-parented away from its
    tree: those are found by the worker's marker (one scan for all of them) and killed.
    """
    workers = list(workers)
    for worker in workers:
        if graceful and worker.ready and worker.process.poll() is None:
            worker._ask_to_leave()
        else:
            worker._signal_group(signal.SIGKILL)
    _wait_for_exits(workers, time.monotonic() + SHUTDOWN_SECONDS)
    for worker in workers:
        if worker.process.poll() is None:
            worker._signal_group(signal.SIGKILL)
    for worker in workers:
        worker.process.wait()
    unclean = [worker for worker in workers if not worker._left_cleanly()]
    if unclean:
        since = min(worker.started_at for worker in unclean)
        descendants.kill(descendants.marked({worker.marker for worker in unclean}, since))
    for worker in workers:
        worker.close()


def _wait_for_exits(workers: list[WorkerHandle], deadline: float) -> None:
    """Wait until every worker has exited, or until the deadline. On the workers' pidfds, which
    wake this at each exit: ``Popen.wait`` with a timeout sleeps between looks, up to 50 ms at
    a time, which made a run's end 0.1-0.2 s later than its workers'."""
    running = [worker for worker in workers if worker.process.poll() is None]
    while running and (left := deadline - time.monotonic()) > 0:
        exits = [worker.exit_fd for worker in running if worker.exit_fd is not None]
        if len(exits) == len(running):
            select.select(exits, [], [], left)
        else:  # no pidfd here (before Linux 5.3)
            with contextlib.suppress(subprocess.TimeoutExpired):
                running[0].process.wait(timeout=left)
        running = [worker for worker in running if worker.process.poll() is None]


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the process exits (Linux 5.3+), else None."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None
