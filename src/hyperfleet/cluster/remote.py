"""A worker on another node, as the controller's loop sees it: the same face as a local
:class:`~hyperfleet.controller.workers.WorkerHandle`.

Its connection is one end of a local socket pair. The node's reader thread writes the worker's
messages into the other end, so the loop waits on it like any worker's; what the loop sends
goes straight to the node's connection. When the worker dies on its node, or the node is lost,
the reader thread records why and closes the other end: the loop reads EOF and handles the
worker's exit as it handles a local one.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from hyperfleet.cluster.messages import SignalWorker, StopWorker
from hyperfleet.controller.workers import ObjectiveLoading
from hyperfleet.resources.slots import Slot

# The loop hands a message over; this sends it to the node as bytes for the worker.
Forward = Callable[[int, bytes], None]


class RelayConnection(Connection):
    """Reads what the reader thread wrote; sends by handing the pickled message to ``forward``."""

    def __init__(self, handle: int, worker: int, forward: Forward) -> None:
        super().__init__(handle)
        self._worker, self._forward = worker, forward

    def send(self, obj: Any) -> None:
        self._forward(self._worker, bytes(ForkingPickler.dumps(obj)))


class RemoteWorker(ObjectiveLoading):
    def __init__(
        self,
        slot: Slot,
        worker: int,
        node: str,
        forward: Forward,
        command: Callable[[Any], None],
        forget: Callable[[], None],
    ) -> None:
        super().__init__()
        self.slot = slot
        self.id = worker
        self.node = node
        self.trials_run = 0
        self.ready = False
        self.pid = 0  # the worker's pid on its node, once the agent says it started
        self._command = command  # sends a message about this worker to its agent
        self._forget = forget  # its node no longer reports about it
        mine, theirs = socket.socketpair()
        self.conn = RelayConnection(mine.detach(), worker, forward)
        self._inbox: Connection | None = Connection(theirs.detach())
        self._exit: tuple[str, str] | None = None
        # The reader thread writes into the inbox while the loop may close it: never a write
        # to a descriptor number that was closed (and maybe reused) meanwhile.
        self._inbox_lock = threading.Lock()

    # ----- called by the node's reader thread ----------------------------------------------

    def deliver(self, payload: bytes) -> None:
        with self._inbox_lock:
            if self._inbox is not None:
                with contextlib.suppress(OSError):
                    self._inbox.send_bytes(payload)

    def end(self, kind: str, reason: str) -> None:
        """The worker is gone: say why, then close its connection so the loop notices."""
        with self._inbox_lock:
            if self._exit is None:
                self._exit = (kind, reason)
            if self._inbox is not None:
                self._inbox.close()
                self._inbox = None

    # ----- the face of a WorkerHandle -------------------------------------------------------

    def waitables(self) -> list[object]:
        return [self.conn]

    def has_exited(self) -> bool:
        return self._exit is not None

    def exit_description(self) -> tuple[str, str]:
        return self._exit or ("crash", f"worker on node {self.node} ended")

    def _signal_group(self, sig: signal.Signals) -> None:
        self._command(SignalWorker(self.id, int(sig)))

    def terminate(self, grace: float) -> None:
        # The agent kills it: SIGTERM, then SIGKILL after its own grace, without our waiting.
        self._stop(graceful=False)

    def kill(self) -> None:
        self._stop(graceful=False)

    def shutdown(self) -> None:
        self._stop(graceful=True)

    def ask_to_leave(self) -> None:
        """Leave once idle; its exit comes back as any worker's does."""
        self.ready = False
        self._command(StopWorker(self.id, graceful=True))

    def _stop(self, graceful: bool) -> None:
        if self._exit is None:
            self._command(StopWorker(self.id, graceful))
        self._forget()
        self.end("crash", "stopped by the controller")
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
