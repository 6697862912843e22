"""Talk to hyperfleet from a training script run by ``hyperfleet run --cmd``.

::

    from hyperfleet import client

    for epoch in range(epochs):
        accuracy = train_one_epoch()
        client.report(accuracy, step=epoch)   # intermediate value, for pruning
        if client.should_prune():             # the pruner says stop
            sys.exit(0)                       # hyperfleet records the trial as PRUNED
    client.result(accuracy)                   # the final value (also printed as a JSON line)

Run by hand, outside hyperfleet, the same script still works: :func:`report` does nothing,
:func:`should_prune` answers False and :func:`result` only prints ``{"value": ...}``.

Under hyperfleet, the command's environment names a local socket in ``HYPERFLEET_CLIENT``;
each call sends one JSON line there and waits for the one-line answer of the trial's worker,
which forwards it to the real ``optuna.Trial``. This module needs only the standard library.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from hyperfleet.errors import HyperfleetError

ADDRESS_ENV = "HYPERFLEET_CLIENT"
PARAMS_ENV = "HYPERFLEET_PARAMS"
TRIAL_NUMBER_ENV = "HYPERFLEET_TRIAL_NUMBER"


class ClientError(HyperfleetError):
    """The trial refused a call (for example ``report`` in a multi-objective study)."""


class _Connection:
    def __init__(self, address: str) -> None:
        self.pid = os.getpid()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(address)
        except OSError as exc:
            self._sock.close()
            raise ClientError(
                f"cannot reach hyperfleet at {address} ({exc.strerror}); the trial that started "
                f"this script has ended. Unset {ADDRESS_ENV} to run the script on its own."
            ) from None
        self._reader = self._sock.makefile("rb")

    def call(self, request: dict[str, Any]) -> Any:
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        line = self._reader.readline()
        if not line:
            raise ClientError("hyperfleet closed the connection; the trial has ended.")
        reply = json.loads(line)
        if "error" in reply:
            raise ClientError(str(reply["error"]))
        return reply.get("value")


_connection: _Connection | None = None


def active() -> bool:
    """Whether this script runs as a hyperfleet trial (and calls reach the trial)."""
    return bool(os.environ.get(ADDRESS_ENV))


def _call(request: dict[str, Any]) -> Any:
    global _connection
    # A forked child (a data loader worker) must not share its parent's socket.
    if _connection is None or _connection.pid != os.getpid():
        _connection = _Connection(os.environ[ADDRESS_ENV])
    return _connection.call(request)


def params() -> dict[str, Any]:
    """This trial's parameters (as also given on the command line); {} outside hyperfleet."""
    return dict(json.loads(os.environ.get(PARAMS_ENV) or "{}"))


def trial_number() -> int | None:
    """This trial's number in the study; None outside hyperfleet."""
    raw = os.environ.get(TRIAL_NUMBER_ENV)
    return int(raw) if raw else None


def report(value: float, step: int) -> None:
    """Report an intermediate value at ``step`` (an epoch or iteration), as ``trial.report``."""
    if active():
        _call({"op": "report", "value": float(value), "step": int(step)})


def should_prune() -> bool:
    """Whether the pruner wants this trial stopped; exit soon after it says True."""
    if not active():
        return False
    return bool(_call({"op": "should_prune"}))


def set_user_attr(key: str, value: Any) -> None:
    """Attach a JSON-serialisable value to the trial, as ``trial.set_user_attr``."""
    if active():
        _call({"op": "set_user_attr", "key": str(key), "value": value})


def result(value: float | Sequence[float]) -> None:
    """The trial's final value (a sequence of values for a multi-objective study).

    It is also printed as the JSON line ``{"value": ...}`` (``{"values": [...]}``), so a run by
    hand shows it and the trial's stdout.log records it.
    """
    line = _result_line(value)
    if active():
        _call({"op": "result", **line})
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _result_line(value: Any) -> dict[str, Any]:
    # float() also takes numpy and torch scalars, which json cannot write as they are; arrays
    # with dimensions are several values.
    if isinstance(value, (list, tuple)) or int(getattr(value, "ndim", 0)) > 0:
        return {"values": [float(v) for v in value]}
    return {"value": float(value)}
