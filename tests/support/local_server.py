"""A real HTTP server for a test (an MLflow tracking server, optuna-dashboard): started on
loopback in its own process group, waited for until it answers, and stopped with every process
it started when the test is done."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from support.procs import wait_until


def answers(url: str) -> bool:
    """Whether ``url`` answers with success."""
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def local_server(
    what: str,
    command: list[str],
    port: int,
    ready_path: str,
    log: Path,
    start_timeout: float,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """The URL of the server (``what``, for messages) that ``command`` starts on
    127.0.0.1:``port``, once ``ready_path`` answers; its output goes to ``log``."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode} before it answered")
        return answers(url + ready_path)

    try:
        wait_until(ready, start_timeout, f"{what} to answer")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
