"""A real optuna-dashboard for the dashboard test: ``optuna-dashboard STORAGE --artifact-dir``
on loopback and a free port, in its own process group, stopped when the test is done."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.local_server import local_server
from support.nodes import free_port

# It answers within seconds on an idle machine; a loaded two-core one takes longer.
START_TIMEOUT = 60.0


def dashboard_command() -> str | None:
    """The ``optuna-dashboard`` script of this environment, else the one on PATH; None when
    it is not installed."""
    beside = Path(sys.executable).parent / "optuna-dashboard"
    return str(beside) if beside.exists() else shutil.which("optuna-dashboard")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return bytes(answer.read())


def fetch_json(url: str) -> Any:
    return json.loads(fetch(url))


@contextlib.contextmanager
def optuna_dashboard(storage: str, artifact_dir: Path, log: Path) -> Iterator[str]:
    """The URL of a dashboard on ``storage`` whose artifacts are in ``artifact_dir``; its
    output goes to ``log``."""
    command = dashboard_command()
    assert command is not None, "optuna-dashboard is not installed"
    port = free_port()
    args = [command, storage, "--artifact-dir", str(artifact_dir),
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with local_server("optuna-dashboard", args, port, "/api/meta", log, START_TIMEOUT) as url:
        yield url
