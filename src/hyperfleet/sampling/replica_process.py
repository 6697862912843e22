"""Starting a sampler process (:mod:`hyperfleet.sampling.replica`) and talking to it, shared
by the controller's pool (:mod:`hyperfleet.controller.sampler_pool`) and an agent's node
samplers (:mod:`hyperfleet.cluster.node_samplers`), so that both start, feed and end it alike.

What goes to the process leaves from a thread of its own: the caller (the controller's loop, an
agent's relay) never blocks on a full socket while the process samples. What comes back is read
by the owner: the pool on a thread of its own, an agent in its wait beside its other
connections.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

CLOSE_SECONDS = 2.0  # for the processes to exit once hung up; then they are killed


class ReplicaProcess:
    """One sampler process: its socket, and a thread that sends what the owner queued. The
    first message, ``setup``, is the pickled setup the process starts from."""

    def __init__(self, setup: bytes, log: Path, name: str) -> None:
        parent, child = socket.socketpair()
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hyperfleet.sampling.replica", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Not in the terminal's process group: a Ctrl+C stops the run, whose end
                # closes the socket, rather than killing the processes mid-run.
                start_new_session=True,
            )
        child.close()
        self._socket = parent  # kept to shut down: a close would not wake a reading thread
        self.conn = Connection(os.dup(parent.fileno()))
        self.dead = False
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.send_bytes(setup)
        self.add_thread(self._send_loop, f"hyperfleet-{name}-out")

    def add_thread(self, target: Callable[[], None], name: str) -> None:
        """Start a thread that ends once the socket is shut down (joined by :meth:`reap`)."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def send_bytes(self, payload: bytes) -> None:
        if not self.dead:
            self._outgoing.put(payload)

    def _send_loop(self) -> None:
        while (payload := self._outgoing.get()) is not None:
            try:
                self.conn.send_bytes(payload)
            except OSError:
                self.dead = True
                return

    def hang_up(self) -> None:
        """Shut the socket down: the process reads end-of-file and exits."""
        self.dead = True
        self._outgoing.put(None)
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()

    def reap(self, deadline: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # in the middle of a long sample: not worth waiting
            self.process.kill()
            self.process.wait()
        for thread in self._threads:  # each ends once the socket is shut down
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            self.conn.close()  # not before: its descriptor could be reused under them
