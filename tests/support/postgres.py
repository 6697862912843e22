"""A throwaway PostgreSQL server on loopback, from the machine's own packages (Debian's
``postgresql``, which ``.ci/run`` installs), for the tests and benchmarks of ``--storage
postgresql://...``.

``initdb`` refuses to run as root, so as root the server runs as ``nobody``, in a folder of its
own under the system's temporary folder (pytest's own temporary folders are private to root). It
listens on 127.0.0.1 at a free port and on a Unix socket in that folder, trusts local
connections, and skips ``fsync`` unless asked to be durable (its data is thrown away).
:func:`postgres_or_skip` skips the test with the reason when no server can be started.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "postgres"
DRIVER = "postgresql+psycopg"  # psycopg 3, SQLAlchemy 2.1's default for postgresql://
RUN_AS = "nobody"  # as root: initdb refuses root


class Unavailable(Exception):
    """Why no server could be started here (the message is the skip reason)."""


@dataclass
class PostgresServer:
    host: str
    port: int
    folder: Path

    def url(self, database: str = SUPERUSER) -> str:
        return f"{DRIVER}://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def new_database(self, prefix: str = "t") -> str:
        """The URL of a new, empty database: each test its own study tables."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        dsn = f"host={self.host} port={self.port} user={SUPERUSER} dbname={SUPERUSER}"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _binary(name: str) -> str:
    """``name`` from PATH or Debian's versioned folder (/usr/lib/postgresql/N/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    raise Unavailable(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_user() -> dict[str, Any]:
    """Popen's arguments that run the server's programs as :data:`RUN_AS` when this is root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(RUN_AS)
    except KeyError:
        raise Unavailable(f"running as root, no user {RUN_AS!r}: initdb refuses root") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _server_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="hyperfleet-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, user=RUN_AS)
    return folder


def _initdb(folder: Path) -> None:
    command = [_binary("initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", SUPERUSER]
    command += ["-E", "UTF8", "--no-sync"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, **_server_user()
    )
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"initdb failed ({done.returncode}): {last[0]}")


def _ready(server: PostgresServer, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the server takes connections, or say why it did not."""
    import psycopg

    dsn = f"host={server.host} port={server.port} user={SUPERUSER} dbname={SUPERUSER}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"postgres exited ({process.returncode}): {tail[0]}")
        with suppress(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        time.sleep(0.2)
    raise Unavailable("postgres did not take connections within 60 s")


@contextmanager
def postgres_server(durable: bool = False) -> Iterator[PostgresServer]:
    """A running server for the duration of the block; stopped and deleted after it.
    ``durable``: each commit is flushed to disk, as a real server does (benchmarks).
    Raises :class:`Unavailable` when none can be started here."""
    try:
        import psycopg  # noqa: F401 (the tests' driver)
    except ImportError:
        raise Unavailable('no psycopg driver (pip install "psycopg[binary]")') from None
    postgres = _binary("postgres")
    folder = _server_folder()
    server = PostgresServer("127.0.0.1", _free_port(), folder)
    log = folder / "postgres.log"
    process = None
    try:
        _initdb(folder)
        command = [postgres, "-D", str(folder / "data"), "-k", str(folder), "-h", server.host]
        command += ["-p", str(server.port), "-c", "max_connections=200"]
        command += [] if durable else ["-c", "fsync=off", "-c", "synchronous_commit=off"]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, **_server_user()
            )
        _ready(server, process, log)
        yield server
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(folder, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """A fast shutdown (SIGINT: clients are disconnected), then SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def postgres_or_skip() -> Iterator[PostgresServer]:
    """:func:`postgres_server`, or the test skipped with the reason none could be started."""
    try:
        with postgres_server() as server:
            yield server
    except Unavailable as reason:
        pytest.skip(f"no PostgreSQL server: {reason}")
