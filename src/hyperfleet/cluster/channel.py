"""The authenticated connection between a controller and its agents.

It carries pickles, so nobody without the run's token may speak on it: both ends prove they
hold the token, the listening end first, and every later message is sealed with it (see
:mod:`hyperfleet.cluster.sealed`), before anything is unpickled. A peer that does not finish the
handshake and its first message within ``HANDSHAKE_SECONDS`` (a silent peer, garbage bytes, a
wrong token, another build) is cut off, on a thread of its own, so it never holds up the agents
that connect after it. The channel is not encrypted: docs/how-to/many-machines.md says how to
tunnel it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hyperfleet.cluster.messages import PROTOCOL
from hyperfleet.cluster.sealed import (
    HandshakeRefused,
    SealBroken,
    SealedConnection,
    acceptor_handshake,
    connector_handshake,
)
from hyperfleet.errors import ConfigError, NodeError

TOKEN_ENV = "HYPERFLEET_TOKEN"
TOKEN_FILE_NAME = "agent.token"
HANDSHAKE_SECONDS = 5.0
# Handshakes in progress at once: more than a cluster's agents starting together need, few
# enough that a flood of silent connections costs a bounded number of threads.
MAX_HANDSHAKES = 32
REFUSAL_WINDOW = 1.0  # seconds; refusals past REFUSALS_TOLD in one are counted, not told
REFUSALS_TOLD = 5
ACCEPT_RETRY_SECONDS = 0.05
CONNECT_RETRY_SECONDS = 0.5
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


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
        return _token_from_file(token_file)
    text = os.environ.get(TOKEN_ENV, "").strip()
    if not text:
        raise ConfigError(
            f"no token: pass --token-file FILE (the controller writes RUN_DIR/{TOKEN_FILE_NAME})"
            f" or set {TOKEN_ENV}."
        )
    return text.encode()


def _token_from_file(token_file: Path) -> bytes:
    """A token file's text, refusing one that other users may read (as ssh refuses a private
    key they may read): whoever reads the token can run code on the controller and every node.
    """
    try:
        mode = token_file.stat().st_mode
        raw = token_file.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the token file {token_file}: {exc.strerror}; pass the file the "
            f"controller wrote (RUN_DIR/{TOKEN_FILE_NAME}) or set {TOKEN_ENV}."
        ) from None
    if mode & 0o077:
        raise ConfigError(
            f"the token file {token_file} may be read by other users (mode {mode & 0o777:o}); "
            f"whoever reads it can run code on the controller and on every node. Run `chmod 600 "
            f"{token_file}`, and if others may have read it, delete it (a run makes a new one) "
            "and restart the agents with the new token."
        )
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text or not text.isprintable():
        raise ConfigError(
            f"the token file {token_file} does not hold a token (it is empty or not text); pass "
            f"the file the controller wrote (RUN_DIR/{TOKEN_FILE_NAME}), or set {TOKEN_ENV}."
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
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return read_token(path), path


def announced_host(host: str) -> str:
    """The host agents should connect to: a wildcard address is no address to connect to, so
    this machine's name stands for it."""
    return socket.gethostname() if host in WILDCARD_HOSTS else host


def wildcard_warning(host: str) -> str:
    """A warning when the channel listens on every interface; empty otherwise."""
    if host not in WILDCARD_HOSTS:
        return ""
    return (
        f"warning: listening on every interface ({host or 'all'}): the agents' channel is "
        "authenticated but not encrypted, and anyone who can reach this port may try to "
        "connect. Prefer --listen with the address of the cluster's private interface, or "
        "tunnel the port (see docs/how-to/many-machines.md, Security)."
    )


class ChannelListener:
    """Accepts agents on one address; each authenticated connection and its first message go
    to ``on_peer``, each refusal to ``on_refused``, from the listener's threads.

    At most :data:`MAX_HANDSHAKES` handshakes run at once, each on a thread of its own with a
    deadline; a connection beyond that, or one the process has no descriptor left for, is shed
    (an agent retries for its ``--patience``). The accept loop itself never gives up, and what
    it sheds or refuses is told, a few lines a second at most."""

    def __init__(
        self,
        address: tuple[str, int],
        token: bytes,
        on_peer: Callable[[SealedConnection, Any, str], None],
        on_refused: Callable[[str, str], None],
    ) -> None:
        self._token = token
        self._on_peer = on_peer
        self._refusals = _RefusalLog(on_refused)
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
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
        self._socket.listen(128)
        self._socket.settimeout(REFUSAL_WINDOW)  # wakes the loop to tell what it shed
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
            except TimeoutError:
                self._refusals.flush()
                continue
            except OSError as exc:
                if self._closed:
                    return
                # Out of descriptors (a flood): the connection waits in the backlog.
                self._refusals.shed("", f"cannot accept connections: {exc.strerror}")
                time.sleep(ACCEPT_RETRY_SECONDS)  # retry pace while descriptors are short
                continue
            where = f"{address[0]}:{address[1]}"
            if not self._handshakes.acquire(blocking=False):
                peer.close()
                self._refusals.shed(where, f"{MAX_HANDSHAKES} handshakes already in progress")
                continue
            try:
                threading.Thread(
                    target=self._handshake, args=(peer, where), name="hyperfleet-handshake",
                    daemon=True,
                ).start()  # fmt: skip
            except RuntimeError:  # no thread left to start
                self._handshakes.release()
                peer.close()
                self._refusals.shed(where, "no thread left for its handshake")

    def _handshake(self, peer: socket.socket, where: str) -> None:
        try:
            conn, first = self._meet(peer, where)
        except HandshakeRefused:
            return  # told before the peer was cut off
        finally:
            self._handshakes.release()
        self._on_peer(conn, first, where)

    def _meet(self, peer: socket.socket, where: str) -> tuple[SealedConnection, Any]:
        """The handshake and the first message, within :data:`HANDSHAKE_SECONDS`. A refusal
        is told before the peer is cut off, so that the run has heard of it once the peer
        sees its connection close."""
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        conn: SealedConnection | None = None
        try:
            _no_delay(peer)
            keys = acceptor_handshake(peer, self._token, PROTOCOL, deadline)
            peer.settimeout(None)
            _receive_timeout(peer, max(0.001, deadline - time.monotonic()))
            conn = SealedConnection(Connection(os.dup(peer.fileno())), *keys)
            first = conn.recv()  # a peer that stops halfway is cut by the receive timeout
            _receive_timeout_off(conn.fileno())
        except Exception as exc:  # garbage, a wrong token, a peer that hung up or said nothing
            reason = exc.reason if isinstance(exc, HandshakeRefused) else _refusal(exc)
            self._refusals.refuse(where, reason)
            if conn is not None:
                conn.close()
            raise HandshakeRefused(reason) from None
        finally:
            peer.close()
        return conn, first


class _RefusalLog:
    """Tells each refused connection, up to :data:`REFUSALS_TOLD` a window; past that, one
    line per window counts the rest, so that a flood cannot fill the run log."""

    def __init__(self, tell: Callable[[str, str], None]) -> None:
        self._tell = tell
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._told = 0
        self._untold: collections.Counter[str] = collections.Counter()

    def refuse(self, where: str, reason: str) -> None:
        with self._lock:
            self._roll()
            if self._told < REFUSALS_TOLD:
                self._told += 1
                self._tell(where, reason)
            else:
                self._untold[reason] += 1

    def shed(self, where: str, reason: str) -> None:
        self.refuse(where, f"shed: {reason}")

    def flush(self) -> None:
        with self._lock:
            self._roll()

    def _roll(self) -> None:
        """Called under the lock: a window that has passed tells what it did not."""
        if time.monotonic() - self._window_start < REFUSAL_WINDOW:
            return
        if self._untold:
            counts = "; ".join(f"{n} {reason}" for reason, n in self._untold.most_common())
            self._tell(f"{sum(self._untold.values())} more peers", counts)
        self._window_start, self._told, self._untold = time.monotonic(), 0, collections.Counter()


def _receive_timeout(sock: socket.socket, seconds: float) -> None:
    """A kernel timeout on each read of a blocking socket (``multiprocessing`` reads its
    descriptor itself, so a Python socket timeout, which makes it non-blocking, cannot do)."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)


def _receive_timeout_off(fd: int) -> None:
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))


def _no_delay(sock: socket.socket) -> None:
    """Send each message at once. With Nagle's algorithm the kernel holds a small message back
    while an earlier one is not acknowledged, and the peer delays its acknowledgement (up to
    40 ms on Linux): a slot's next trial, or a trial's result, then waited that long."""
    with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to hold back
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _refusal(exc: BaseException) -> str:
    if isinstance(exc, SealBroken):
        return "its first message was not sealed with this run's token"
    if isinstance(exc, (EOFError, ConnectionError)):
        return "it hung up during the handshake"
    if isinstance(exc, (TimeoutError, BlockingIOError)):
        return f"it said nothing, or too little, within {HANDSHAKE_SECONDS:g}s"
    return f"it does not speak hyperfleet's protocol ({type(exc).__name__})"


def connect(address: tuple[str, int], token: bytes, patience: float) -> SealedConnection:
    """Connect and authenticate, for ``patience`` seconds: an engine may start agents before
    the controller listens, and a controller under a flood sheds connections it has no room
    for. A peer that is not this run's controller is told nothing and refused at once."""
    where = f"{address[0]}:{address[1]}"
    deadline = time.monotonic() + patience
    while True:
        attempt_end = min(deadline, time.monotonic() + HANDSHAKE_SECONDS)
        try:
            return _connect_once(address, token, attempt_end)
        except HandshakeRefused as exc:
            raise NodeError(f"cannot join the peer at {where}: {exc.reason}.") from None
        except (OSError, EOFError) as exc:
            if time.monotonic() >= deadline:
                raise NodeError(_unreachable(where, exc, patience)) from None
            time.sleep(CONNECT_RETRY_SECONDS)  # retry pace while the controller is not there


def _connect_once(address: tuple[str, int], token: bytes, deadline: float) -> SealedConnection:
    sock = socket.create_connection(address, timeout=max(0.001, deadline - time.monotonic()))
    with sock:
        _no_delay(sock)
        keys = connector_handshake(sock, token, PROTOCOL, deadline)
        sock.settimeout(None)
        return SealedConnection(Connection(os.dup(sock.fileno())), *keys)


def _unreachable(where: str, exc: BaseException, patience: float) -> str:
    if isinstance(exc, ConnectionRefusedError) or not isinstance(
        exc, (EOFError, TimeoutError, ConnectionResetError)
    ):
        return (
            f"cannot reach the controller at {where} ({exc}) within {patience:g}s; check the "
            "address it printed, and that this node can reach it."
        )
    return (
        f"the peer at {where} accepted connections for {patience:g}s but never finished "
        "hyperfleet's handshake (it hung up or said nothing): check that --connect is the "
        "address the controller printed, and that the controller is still running."
    )
