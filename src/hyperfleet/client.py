"""Talk to hyperfleet from a training script run by ``hyperfleet run --cmd``.

::

    from hyperfleet import client

    state = client.checkpoint_dir() / "state.pt"  # kept for the next attempt of this trial
    start = load(state) if state.exists() else 0
    for epoch in range(start, epochs):
        accuracy = train_one_epoch()
        client.report(accuracy, step=epoch)   # intermediate value, for pruning
        save(state, epoch + 1)
        if client.should_prune():             # the pruner says stop
            sys.exit(0)                       # hyperfleet records the trial as PRUNED
        if client.should_stop():              # SIGTERM: the run is stopping
            sys.exit(0)                       # recorded as interrupted; resumed from state.pt
    client.result(accuracy)                   # the final value (also printed as a JSON line)

Run by hand, outside hyperfleet, the same script still works: :func:`report` does nothing,
:func:`should_prune` and :func:`should_stop` answer False, :func:`checkpoint_dir` is a fresh
temporary folder (removed when the script exits) and :func:`result` only prints
``{"value": ...}``.

Under hyperfleet, the command's environment names a local socket in ``HYPERFLEET_CLIENT``;
each call sends one JSON line there and waits for the one-line answer of the trial's worker,
which forwards it to the real ``optuna.Trial``. This module needs only the standard library.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hyperfleet.errors import HyperfleetError

ADDRESS_ENV = "HYPERFLEET_CLIENT"
PARAMS_ENV = "HYPERFLEET_PARAMS"
TRIAL_NUMBER_ENV = "HYPERFLEET_TRIAL_NUMBER"
CHECKPOINT_ENV = "HYPERFLEET_CHECKPOINT_DIR"


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


_local_checkpoint_dir: Path | None = None


def checkpoint_dir() -> Path:
    """The folder this trial shares with every repeat of it: what an earlier attempt saved
    there is still there. Outside hyperfleet, a fresh temporary folder, removed at exit."""
    global _local_checkpoint_dir
    given = os.environ.get(CHECKPOINT_ENV)
    if given:
        return Path(given)
    if _local_checkpoint_dir is None:
        _local_checkpoint_dir = Path(tempfile.mkdtemp(prefix="hyperfleet-checkpoint-"))
        atexit.register(shutil.rmtree, _local_checkpoint_dir, ignore_errors=True)
    return _local_checkpoint_dir


def should_stop() -> bool:
    """Whether the run is stopping (it got SIGTERM): save a checkpoint and exit soon. The trial
    is then recorded as interrupted, and its next attempt continues from the checkpoint."""
    if not active():
        return False
    return bool(_call({"op": "should_stop"}))


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
