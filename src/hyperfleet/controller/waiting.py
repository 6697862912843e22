"""Waiting on the controller's connections, with the poll set kept between waits.

``multiprocessing.connection.wait`` builds a poll object and registers every connection at each
call; the loop waits thousands of times a second with short trials, on a set that changes only
when a worker starts or ends, so the set is built again only then. What is returned is the
same: the objects that can be read (an ended peer's connection too, which reads as EOF).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
from typing import Any


class Waiter:
    def __init__(self) -> None:
        self._watched: list[Any] = []
        self._selector = selectors.PollSelector()

    def wait(self, objects: list[Any], timeout: float) -> list[Any]:
        """The objects (connections, sockets, file descriptors) ready to read, waiting up to
        ``timeout`` seconds for one."""
        if objects != self._watched:  # a new or a closed worker: by identity, and fd number
            self._selector.close()
            self._selector = selectors.PollSelector()
            for obj in objects:
                self._selector.register(obj, selectors.EVENT_READ)
            self._watched = list(objects)
        return [key.fileobj for key, _ in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()


class Wakeup:
    """A socket the loop waits on that other threads (a finished commit, a slow sampler, a
    signal handler) write a byte to, to wake it."""

    def __init__(self) -> None:
        self.readable, self._writable = socket.socketpair()
        self._writable.setblocking(False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self._writable.send(b"x")

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.readable.recv(4096)

    def close(self) -> None:
        self.readable.close()
        self._writable.close()
