"""A worker on another node, as the controller's loop sees it: a
:class:`~hyperfleet.workers.handle.Worker`, as a local
:class:`~hyperfleet.workers.handle.WorkerHandle` is.

The loop itself reads the node's connection (see :mod:`hyperfleet.cluster.hub`) and puts each
of the worker's messages in its inbox, which the loop then drains as it drains a local worker's
connection; what the loop sends goes straight to the node's connection. When the worker dies
on its node, or the node is lost, the inbox ends: the loop reads EOF after the last message and
handles the worker's exit as it handles a local one. No thread and no socket per worker: at
hundreds of remote slots, handing each message from a reader thread to the loop through a
socket cost more than the loop's own work on it (each hand-over waits for the other thread to
let go of the interpreter lock).
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

from hyperfleet.cluster.messages import SignalWorker, StopWorker
from hyperfleet.resources.slots import Slot
from hyperfleet.workers.handle import ObjectiveLoading

# The loop hands a message over; this sends it to the node as bytes for the worker.
Forward = Callable[[int, bytes], None]


@dataclass
class _Read:
    """A delivered message already unpickled (by :meth:`Inbox.last`)."""

    value: Any


class Inbox:
    """A remote worker's connection: what its node delivered, in order, until it ended;
    sending hands the pickled message to ``forward``."""

    def __init__(self, worker: int, forward: Forward) -> None:
        self._worker, self._forward = worker, forward
        self._messages: deque[bytes | _Read] = deque()
        self._ended = False

    def deliver(self, payload: bytes) -> None:
        if not self._ended:
            self._messages.append(payload)

    def end(self) -> None:
        self._ended = True

    def poll(self) -> bool:
        """Is there something to read: a message, or the end?"""
        return bool(self._messages) or self._ended

    def recv(self) -> Any:
        if self._messages:
            message = self._messages.popleft()
            return message.value if isinstance(message, _Read) else ForkingPickler.loads(message)
        raise EOFError

    def last(self) -> Any:
        """The newest message delivered (read once, and kept for :meth:`recv`), or None."""
        if not self._messages:
            return None
        message = self._messages[-1]
        if not isinstance(message, _Read):
            message = self._messages[-1] = _Read(ForkingPickler.loads(message))
        return message.value

    def send(self, obj: Any) -> None:
        self._forward(self._worker, bytes(ForkingPickler.dumps(obj)))

    def close(self) -> None:
        self._messages.clear()
        self._ended = True


class RemoteWorker(ObjectiveLoading):
    def __init__(
        self,
        slot: Slot,
        worker: int,
        node: str,
        forward: Forward,
        command: Callable[[Any], None],
        forget: Callable[[], None],
        attention: deque[RemoteWorker],
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
        self.conn: Inbox = Inbox(worker, forward)
        self._exit: tuple[str, str] | None = None
        self._outside_signal = ""  # see WorkerHandle.outside_signal, as its node saw it
        # Where it says it has news for the loop: a message, or its end. The loop looks at
        # these workers only, not at every remote worker at every step.
        self._attention = attention

    # ----- called by the node's link ---------------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        self.conn.deliver(payload)
        self._attention.append(self)

    def end(self, kind: str, reason: str, outside_signal: str = "") -> None:
        """The worker is gone: say why, then end its inbox so the loop notices. Also called
        from the thread that finds a node silent, or from the engine's: setting these fields
        needs no lock."""
        if self._exit is None:
            self._exit = (kind, reason)
            self._outside_signal = outside_signal
        self.conn.end()
        self._attention.append(self)

    # ----- the Worker protocol, as a WorkerHandle has it -------------------------------------

    def waitables(self) -> list[object]:
        return []  # the loop waits on the node's connection instead

    def has_exited(self) -> bool:
        return self._exit is not None

    def exit_description(self) -> tuple[str, str]:
        return self._exit or ("crash", f"worker on node {self.node} ended")

    def outside_signal(self) -> str:
        return self._outside_signal

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
        self.conn.close()
