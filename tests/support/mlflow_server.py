"""A real MLflow tracking server for the tracker tests: ``mlflow server`` with a SQLite backend
store and a local artifact root, on loopback and a free port, in its own process group so that
stopping it stops every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from support.nodes import free_port
from support.procs import wait_until

# The server starts in seconds on an idle machine; a loaded two-core one takes much longer.
START_TIMEOUT = 120.0


def _healthy(url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"mlflow server exited with {process.returncode} before it answered")
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """The URL of a fresh tracking server that keeps its runs under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--default-artifact-root", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # No job runner: it starts seven more processes that these tests never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (folder / "server.log").open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url, process), START_TIMEOUT, "the MLflow server to answer")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
