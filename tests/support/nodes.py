"""Agents started by hand on this machine, each playing a node with its own fake GPUs, and a
controller that waits for them (``hyperfleet run --listen``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from support.background import BackgroundRun
from support.procs import cli_command, cpu_only_env, wait_until

OBJECTIVE = Path(__file__).resolve().parent / "node_objective.py"
TOKEN = "test-token-0123456789abcdef"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def write_token(folder: Path) -> Path:
    path = folder / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def start_controller(
    folder: Path, address: str, n_trials: int, *flags: str, objective: str = ""
) -> BackgroundRun:
    """``objective``: the search's TARGET, by default ``node_objective.py:where_it_runs``."""
    env = cpu_only_env()
    args = [
        "run", objective or f"{OBJECTIVE}:where_it_runs", "--n-trials", str(n_trials),
        "--run-dir", "run", "--listen", address, "--token-file", str(write_token(folder)),
        "--cpu-slots", "0", "--plain", "--no-report", *flags,
    ]  # fmt: skip
    return BackgroundRun(args, folder, env, name="controller")


def can_hide_folders() -> bool:
    """Whether an agent can run where folders of this machine look like disks of its own
    (:func:`unseen_by_controller`): that takes root and unshare."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def unseen_by_controller(*folders: Path) -> list[str]:
    """An :class:`Agent` prefix: the agent runs in a mount namespace of its own, where each
    folder (already there) is an empty disk of its own, as on a node that does not share them
    with the controller."""
    mounts = " && ".join(f'mount -t tmpfs none "{folder}"' for folder in folders)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{mounts} && exec "$0" "$@"']  # fmt: skip


class Agent:
    """``hyperfleet agent`` in a session of its own, so a test can kill its whole group."""

    def __init__(
        self,
        folder: Path,
        address: str,
        node: str,
        gpus: int,
        prefix: Sequence[str] = (),
        nap: float = 0.3,
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``nap``: how long each trial on this node lasts, in seconds; ``env``: more of the
        agent's environment (a fake GPU state folder...)."""
        self.node = node
        agent_env = {
            **cpu_only_env(),
            "HYPERFLEET_FAKE_GPUS": str(gpus),
            "HYPERFLEET_TEST_NODE": node,
            "HYPERFLEET_TEST_NAP": str(nap),
            **(env or {}),
        }
        agent_env.pop("CUDA_VISIBLE_DEVICES")  # fake GPUs are limited by it like real ones
        self.log = folder / f"agent-{node}.log"
        command = cli_command(
            "agent", "--connect", address, "--token-file", str(folder / "token"),
            "--node", node, "--log-dir", str(folder / f"logs-{node}"), *flags,
        )  # fmt: skip
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [*prefix, *command],
                cwd=folder,
                env=agent_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, timeout: float) -> int:
        wait_until(lambda: self.process.poll() is not None, timeout, f"agent {self.node} to exit")
        return self.process.returncode

    def kill_group(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGCONT)
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def node_processes(node: str) -> list[int]:
    """Live processes started for ``node``: its workers and whatever their trials started."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("HYPERFLEET_TEST_NODE") == node and "agent" not in " ".join(
                proc.cmdline()
            ):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def run_log(folder: Path) -> str:
    path = folder / "run" / "run.log"
    return path.read_text() if path.exists() else ""


def wait_for_log(folder: Path, text: str, timeout: float) -> None:
    wait_until(lambda: text in run_log(folder), timeout, f"{text!r} in run.log")
