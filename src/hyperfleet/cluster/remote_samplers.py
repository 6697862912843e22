"""A sampler process on an agent's node, as the controller's pool sees one of its own.

The pool (:mod:`hyperfleet.controller.sampler_pool`) talks to its processes through links with
one interface; this one's news goes out with the node's relays (:class:`SamplerNews`), and its
sets come in with the node's messages, read by the loop, into the same queue as the local
processes' sets, with the same wake. A node lost, a process that died there, or one the node
would not start ends the link: the pool samples without it, as for a local process that died.
The sets are checked before they are queued, so that a set always names the process it came
from (a drop goes back to it) and has the shape the pool unpacks. Each node's link keeps its
processes in a :class:`RemoteSamplers`, which the pools start them through.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from typing import Any

from hyperfleet.cluster.messages import SamplerEnded, SamplerSet, StartSampler, StopSampler

SET_FIELDS = 8  # ("set", key, version, search space, values, attributes, others, known)


class RemoteSampler:
    def __init__(
        self,
        index: int,
        sampler: int,
        forward: Callable[[int, bytes], None],
        stop: Callable[[int], None],
        receive: Callable[[Any], None],
    ) -> None:
        """``index``: in its pool; ``sampler``: its id on the node's link; ``forward``: sends
        news to it; ``stop``: tells the node to end it; ``receive``: takes each set."""
        self.index, self.sampler = index, sampler
        self._forward, self._stop, self._receive = forward, stop, receive
        self.dead = False
        self.reason = ""  # why it ended, once it did

    def send_bytes(self, payload: bytes) -> None:
        if not self.dead:
            self._forward(self.sampler, payload)

    def deliver(self, payload: bytes) -> None:
        """A set from the node (the loop's thread)."""
        if self.dead:
            return
        try:
            message = pickle.loads(payload)
        except Exception as exc:  # a broken node: its sets are not used
            self.end(f"sent a set that cannot be read ({type(exc).__name__})")
            return
        if not self._is_own_set(message):
            self.end("sent something other than a set of its own")
            return
        self._receive(message)

    def _is_own_set(self, message: Any) -> bool:
        return (
            isinstance(message, tuple)
            and len(message) == SET_FIELDS
            and message[0] == "set"
            and isinstance(message[1], tuple)
            and len(message[1]) == 2
            and message[1][0] == self.index
        )

    def end(self, reason: str) -> None:
        """The process is gone (or never started): no more news for it, no more sets."""
        self.dead = True
        self.reason = self.reason or reason

    def hang_up(self) -> None:
        """The pool is done: the node ends the process."""
        if not self.dead:
            self._stop(self.sampler)
        self.end("hung up")

    def reap(self, deadline: float) -> None:
        """Nothing to wait for here: the node's agent reaps its processes."""


class RemoteSamplers:
    """A node's sampler processes, as its link knows them: how many it offers, those started
    for the pools, and each message about one handed to it."""

    def __init__(
        self,
        next_id: Callable[[], int],
        forward: Callable[[int, bytes], None],
        send: Callable[[Any], None],
    ) -> None:
        """``next_id``: a new id on the node's link; ``forward``: queues news for a process;
        ``send``: sends a message to the node."""
        self._next_id, self._forward, self._send = next_id, forward, send
        self.offered = 0  # as the node's hello said
        self._started: dict[int, RemoteSampler] = {}  # by id, until they end
        self._lock = threading.Lock()  # the link may be lost on another thread
        self._ended = ""  # why the node runs no more: lost, or the run is over

    def start(self, index: int, setup: bytes, receive: Callable[[Any], None]) -> RemoteSampler:
        """Start a process of a pool on the node: ``index`` in its pool, ``setup`` its first
        message, ``receive`` takes its sets."""
        sid = self._next_id()
        sampler = RemoteSampler(index, sid, self._forward, self._stop, receive)
        with self._lock:
            if self._ended:
                sampler.end(self._ended)
                return sampler
            self._started[sid] = sampler
        self._send(StartSampler(sid, setup))
        return sampler

    def _stop(self, sid: int) -> None:
        self._send(StopSampler(sid))

    def handle(self, message: SamplerSet | SamplerEnded, node: str) -> None:
        """A set from one of the processes (the loop's thread), or its end."""
        sampler = self._started.get(message.sampler)
        if sampler is None:
            return
        if isinstance(message, SamplerSet):
            sampler.deliver(message.payload)
            return
        with self._lock:
            self._started.pop(message.sampler, None)
        sampler.end(f"node {node}: {message.reason}")

    def end_all(self, reason: str) -> None:
        """The node is lost or the run is over: its processes sample for no pool any more."""
        with self._lock:
            self._ended = self._ended or reason
            samplers = list(self._started.values())
            self._started.clear()
        for sampler in samplers:
            sampler.end(reason)
