"""The authenticated connection between a controller and its agents.

It carries pickles, so nobody without the run's token may speak on it: both sides prove they
hold the token with ``multiprocessing.connection``'s HMAC challenge, each in turn, before
anything is unpickled. A peer that does not finish the challenge and its first message within
``HANDSHAKE_SECONDS`` (a silent peer, garbage bytes, a wrong token) is cut off, in a thread of
its own, so it never holds up the agents that connect after it. The channel is not encrypted:
the README says how to tunnel it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

from hyperfleet.errors import ConfigError, NodeError

TOKEN_ENV = "HYPERFLEET_TOKEN"
TOKEN_FILE_NAME = "agent.token"
HANDSHAKE_SECONDS = 5.0


def parse_address(text: str, what: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST`` for any free port) as a socket address."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), "0"
    host = host.strip("[]")
    if not host or host.isdigit() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"{what} {text!r}: write HOST:PORT, the address of an interface of this machine "
            "and a port, for example 10.0.0.5:7000 (HOST alone picks a free port)."
        )
    return host, int(port)


def read_token(token_file: Path | None) -> bytes:
    """The token from ``token_file``, else from ``$HYPERFLEET_TOKEN``."""
    if token_file is not None:
        try:
            text = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the token file {token_file}: {exc.strerror}; pass the file the "
                f"controller wrote (RUN_DIR/{TOKEN_FILE_NAME}) or set {TOKEN_ENV}."
            ) from None
        if not text:
            raise ConfigError(f"the token file {token_file} is empty; pass the controller's.")
        return text.encode()
    text = os.environ.get(TOKEN_ENV, "").strip()
    if not text:
        raise ConfigError(
            f"no token: pass --token-file FILE (the controller writes RUN_DIR/{TOKEN_FILE_NAME})"
            f" or set {TOKEN_ENV}."
        )
    return text.encode()


def controller_token(token_file: Path | None, run_dir: Path) -> tuple[bytes, Path | None]:
    """The token the controller accepts and the file that holds it.

    A given file or ``$HYPERFLEET_TOKEN`` is used as is. Otherwise the run directory keeps one,
    readable by its owner only, made once: agents started with it still connect after the
    controller is run again to resume."""
    if token_file is not None or os.environ.get(TOKEN_ENV, "").strip():
        return read_token(token_file), token_file
    path = run_dir / TOKEN_FILE_NAME
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return read_token(path), path


class ChannelListener:
    """Accepts agents on one address; each authenticated connection and its first message go
    to ``on_peer``, each refusal to ``on_refused``, from the listener's threads."""

    def __init__(
        self,
        address: tuple[str, int],
        token: bytes,
        on_peer: Callable[[Connection, Any, str], None],
        on_refused: Callable[[str, str], None],
    ) -> None:
        self._token = token
        self._on_peer, self._on_refused = on_peer, on_refused
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind(address)
        except OSError as exc:
            self._socket.close()
            raise ConfigError(
                f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}; give the address "
                "of an interface of this machine and a free port."
            ) from None
        self._socket.listen(64)
        self.address: tuple[str, int] = self._socket.getsockname()[:2]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="hyperfleet-listen", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._thread.join(timeout=2.0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                peer, address = self._socket.accept()
            except OSError:
                return
            where = f"{address[0]}:{address[1]}"
            threading.Thread(
                target=self._handshake, args=(peer, where), name="hyperfleet-handshake", daemon=True
            ).start()

    def _handshake(self, peer: socket.socket, where: str) -> None:
        _no_delay(peer)
        conn = Connection(os.dup(peer.fileno()))
        # Cutting the socket off wakes a read that waits for a silent peer.
        timer = threading.Timer(HANDSHAKE_SECONDS, _cut, args=(peer,))
        timer.start()
        try:
            deliver_challenge(conn, self._token)
            answer_challenge(conn, self._token)
            first = conn.recv()
        except Exception as exc:  # wrong token, garbage, a peer that hung up or said nothing
            timer.cancel()
            conn.close()
            self._on_refused(where, _refusal(exc))
            return
        finally:
            peer.close()
        timer.cancel()
        self._on_peer(conn, first, where)


def _no_delay(sock: socket.socket) -> None:
    """Send each message at once. With Nagle's algorithm the kernel holds a small message back
    while an earlier one is not acknowledged, and the peer delays its acknowledgement (up to
    40 ms on Linux): a slot's next trial, or a trial's result, then waited that long."""
    with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to hold back
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _cut(peer: socket.socket) -> None:
    with contextlib.suppress(OSError):
        peer.shutdown(socket.SHUT_RDWR)


def _refusal(exc: Exception) -> str:
    if isinstance(exc, AuthenticationError):
        return "it does not hold this run's token"
    if isinstance(exc, EOFError):
        return f"it hung up or said nothing within {HANDSHAKE_SECONDS:g}s"
    return f"it does not speak hyperfleet's protocol ({type(exc).__name__})"


def connect(address: tuple[str, int], token: bytes, patience: float) -> Connection:
    """Connect and authenticate, retrying a refused connection for ``patience`` seconds (an
    engine may start agents before the controller listens)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            sock = socket.create_connection(address, timeout=HANDSHAKE_SECONDS)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise NodeError(
                    f"cannot reach the controller at {address[0]}:{address[1]} ({exc}); check "
                    "the address it printed, and that this node can reach it."
                ) from None
            time.sleep(0.5)  # retry pace while the controller is not listening yet
    sock.settimeout(None)
    _no_delay(sock)
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, token)
        deliver_challenge(conn, token)
    except Exception as exc:
        conn.close()
        raise NodeError(
            f"the controller at {address[0]}:{address[1]} refused this agent ({_refusal(exc)}); "
            "pass the token file the controller wrote, or its HYPERFLEET_TOKEN."
        ) from None
    return conn
