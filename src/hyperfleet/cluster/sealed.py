"""The run's token, proved by both ends, and every later message sealed with it.

The handshake is four fixed-size frames, read with a deadline, before anything is unpickled::

    connector -> acceptor   HELLO    magic, protocol, connector's nonce
    acceptor  -> connector  REPLY    status, protocol, acceptor's nonce, acceptor's proof
    connector -> acceptor   ANSWER   connector's proof
    acceptor  -> connector  VERDICT  one byte

Each proof is an HMAC of the run's token over a label naming its role and everything said so
far, so it is bound to this connection's fresh nonces and to the direction it was made for.
The acceptor proves itself first: a connector never answers a peer that has not shown it holds
the token, so an agent pointed at the wrong address cannot be used as an oracle to log someone
else in (``multiprocessing``'s challenge, used before, had the agent answer first).

A peer in the middle can still pass the four frames along unchanged, so each later message is
sealed too: an HMAC under a key of its direction, over its sequence number and its bytes. Such
a peer can forward messages, as any router can, but cannot inject, replay, reorder or reflect
one; a message whose seal is wrong ends the connection before it is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import pickle
import secrets
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

MAGIC = b"HFLEET02"  # names this handshake's layout; a new layout gets a new magic
PROTOCOL_BYTES = 32  # the protocol text, padded with NULs
NONCE_BYTES = 32
PROOF_BYTES = 32  # SHA-256
HELLO_BYTES = len(MAGIC) + PROTOCOL_BYTES + NONCE_BYTES
REPLY_BYTES = 1 + PROTOCOL_BYTES + NONCE_BYTES + PROOF_BYTES
ACCEPTED, REFUSED, OTHER_PROTOCOL = b"+", b"-", b"V"
UNPROVEN = b"-" * PROOF_BYTES  # a connector's answer when the acceptor's proof was wrong


class HandshakeRefused(Exception):
    """The other end spoke the handshake and said no (or failed to prove itself); ``reason``
    says why in a few words, for the side that logs it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SealBroken(ConnectionError):
    """A message whose seal is wrong: the connection can no longer be trusted."""


def acceptor_handshake(
    sock: socket.socket, token: bytes, protocol: str, deadline: float
) -> tuple[bytes, bytes]:
    """The listening side; returns (send key, receive key). Raises HandshakeRefused for a peer
    that speaks the handshake but fails it, EOFError/OSError/TimeoutError for one that does not.
    """
    hello = _read(sock, HELLO_BYTES, deadline)
    if not hello.startswith(MAGIC):
        raise HandshakeRefused("it does not speak hyperfleet's protocol")
    theirs = _unpad(hello[len(MAGIC) : len(MAGIC) + PROTOCOL_BYTES])
    if theirs != protocol:
        _write(sock, OTHER_PROTOCOL + _pad(protocol) + bytes(NONCE_BYTES + PROOF_BYTES), deadline)
        raise HandshakeRefused(
            f"it speaks hyperfleet protocol {theirs}, this controller {protocol}: install the "
            "same hyperfleet version on every node"
        )
    reply_head = ACCEPTED + _pad(protocol) + secrets.token_bytes(NONCE_BYTES)
    reply = reply_head + _proof(token, b"acceptor", hello + reply_head)
    _write(sock, reply, deadline)
    answer = _read(sock, PROOF_BYTES, deadline)
    if answer == UNPROVEN:
        raise HandshakeRefused(
            "it does not hold this run's token (it could not check this controller's proof)"
        )
    if not hmac.compare_digest(answer, _proof(token, b"connector", hello + reply)):
        _write(sock, REFUSED, deadline)
        raise HandshakeRefused("it does not hold this run's token")
    _write(sock, ACCEPTED, deadline)
    transcript = hello + reply + answer
    return _key(token, b"acceptor->connector", transcript), _key(
        token, b"connector->acceptor", transcript
    )


def connector_handshake(
    sock: socket.socket, token: bytes, protocol: str, deadline: float
) -> tuple[bytes, bytes]:
    """The connecting side; returns (send key, receive key). Raises HandshakeRefused when the
    acceptor refuses or cannot prove it holds the token, EOFError/OSError/TimeoutError when it
    hangs up or says nothing."""
    hello = MAGIC + _pad(protocol) + secrets.token_bytes(NONCE_BYTES)
    _write(sock, hello, deadline)
    reply = _read(sock, REPLY_BYTES, deadline)
    status, theirs = reply[:1], _unpad(reply[1 : 1 + PROTOCOL_BYTES])
    if status == OTHER_PROTOCOL:
        raise HandshakeRefused(
            f"it speaks hyperfleet protocol {theirs}, this agent {protocol}: install the same "
            "hyperfleet version on every node"
        )
    proof = reply[-PROOF_BYTES:]
    if status != ACCEPTED or not hmac.compare_digest(
        proof, _proof(token, b"acceptor", hello + reply[:-PROOF_BYTES])
    ):
        with contextlib.suppress(OSError, TimeoutError):  # so that a controller can say why
            _write(sock, UNPROVEN, deadline)
        raise HandshakeRefused(
            "it does not prove it holds this agent's token (no proof was sent to it): it is not "
            "this run's controller, or this agent was given another token. Check --connect "
            "(the address the controller printed) and the token file or HYPERFLEET_TOKEN"
        )
    answer = _proof(token, b"connector", hello + reply)
    _write(sock, answer, deadline)
    if _read(sock, 1, deadline) != ACCEPTED:
        raise HandshakeRefused("it says this agent does not hold this run's token")
    transcript = hello + reply + answer
    return _key(token, b"connector->acceptor", transcript), _key(
        token, b"acceptor->connector", transcript
    )


class SealedConnection:
    """A ``multiprocessing`` connection whose every message carries its seal. It has the few
    methods the hub and the agent use, and a ``fileno`` for ``multiprocessing.connection.wait``.
    """

    def __init__(self, conn: Connection, send_key: bytes, receive_key: bytes) -> None:
        self._conn = conn
        self._send_key, self._receive_key = send_key, receive_key
        self._sent = self._received = 0
        self._send_lock = threading.Lock()  # a sequence number and its write go together

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            seal = _seal(self._send_key, self._sent, data)
            self._conn.send_bytes(seal + data)
            self._sent += 1

    def recv(self) -> Any:
        frame = self._conn.recv_bytes()
        seal, data = frame[:PROOF_BYTES], frame[PROOF_BYTES:]
        if not hmac.compare_digest(seal, _seal(self._receive_key, self._received, data)):
            raise SealBroken("a message's seal does not match this run's token")
        self._received += 1
        return pickle.loads(data)

    def poll(self, timeout: float = 0.0) -> bool:
        return self._conn.poll(timeout)

    def fileno(self) -> int:
        return self._conn.fileno()

    def close(self) -> None:
        self._conn.close()


def _seal(key: bytes, sequence: int, data: bytes) -> bytes:
    return hmac.digest(key, sequence.to_bytes(8, "big") + data, "sha256")


def _proof(token: bytes, role: bytes, said: bytes) -> bytes:
    return hmac.digest(token, b"hyperfleet proof of the " + role + b"\x00" + said, "sha256")


def _key(token: bytes, direction: bytes, transcript: bytes) -> bytes:
    return hmac.digest(token, b"hyperfleet key " + direction + b"\x00" + transcript, "sha256")


def _pad(protocol: str) -> bytes:
    raw = protocol.encode("ascii", "replace")[:PROTOCOL_BYTES]
    return raw.ljust(PROTOCOL_BYTES, b"\x00")


def _unpad(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("ascii", "replace")


def _read(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the peer hung up during the handshake")
        data += chunk
    return bytes(data)


def _write(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(_left(deadline))
    sock.sendall(data)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the handshake took too long")
    return left


def protocol_fingerprint(classes: list[type]) -> str:
    """A short digest of the messages' shapes: two builds whose messages differ (a class or a
    field added, renamed, removed) get different fingerprints and refuse each other at the
    handshake, rather than failing at the first message one of them cannot unpickle."""
    shapes = []
    for cls in classes:
        fields = getattr(cls, "__dataclass_fields__", {})
        shapes.append(f"{cls.__module__}.{cls.__qualname__}({','.join(fields)})")
    return hashlib.sha256("\n".join(sorted(shapes)).encode()).hexdigest()[:10]
