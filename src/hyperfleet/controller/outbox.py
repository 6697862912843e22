"""The one way a message leaves the controller for a worker, here or on a node."""

from __future__ import annotations

from typing import Any, Protocol


class Addressee(Protocol):
    """A worker, as far as sending it a message goes."""

    @property
    def conn(self) -> Any: ...


def send(worker: Addressee, message: object) -> bool:
    """Whether the message left; a worker that died meanwhile (its connection broken, or
    closed once its exit was handled) is noticed by the loop."""
    try:
        worker.conn.send(message)
    except OSError:  # ConnectionError, or "handle is closed"
        return False
    return True
