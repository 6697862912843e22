"""A real MLflow tracking server for the tracker tests: ``mlflow server`` with a SQLite backend
store and a local artifact root, on loopback and a free port, in its own process group so that
stopping it stops every process it started."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from support.local_server import local_server
from support.nodes import free_port

# The server starts in seconds on an idle machine; a loaded two-core one takes much longer.
START_TIMEOUT = 120.0


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
    log = folder / "server.log"
    with local_server("mlflow server", command, port, "/health", log, START_TIMEOUT, env) as url:
        yield url
