"""Starting, watching and stopping one worker process (the controller's side).

Each worker is a fresh interpreter (never a fork: CUDA must not be inherited) started with its
slot's environment, in its own session so that the terminal's Ctrl+C reaches only the controller
and a kill of its process group takes everything the objective started with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from hyperfleet.resources.slots import Slot
from hyperfleet.workers.protocol import ObjectiveSpec, Shutdown, WorkerSetup


class WorkerHandle:
    def __init__(
        self, slot: Slot, specs: dict[str, ObjectiveSpec], log_dir: Path, cwd: Path
    ) -> None:
        self.slot = slot
        self.trials_run = 0
        self.ready = False
        parent_sock, child_sock = socket.socketpair()
        lifeline_read, self._lifeline = os.pipe()
        log = open(log_dir / f"{slot.name.replace('#', '-')}.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hyperfleet.workers.main",
                    str(child_sock.fileno()),
                    str(lifeline_read),
                ],
                env={**os.environ, **slot.environment()},
                pass_fds=(child_sock.fileno(), lifeline_read),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
        finally:
            log.close()
            child_sock.close()
            os.close(lifeline_read)
        self.conn = Connection(parent_sock.detach())
        self.exit_fd = _pidfd(self.process.pid)
        self.conn.send(WorkerSetup(specs, slot.name))

    @property
    def pid(self) -> int:
        return self.process.pid

    def waitables(self) -> list[object]:
        return [self.conn] if self.exit_fd is None else [self.conn, self.exit_fd]

    def has_exited(self) -> bool:
        return self.process.poll() is not None

    def exit_description(self) -> tuple[str, str]:
        """(kind, reason) for a worker that died during a trial."""
        code = self.process.wait()
        if code < 0:
            sig = signal.Signals(-code)
            if sig == signal.SIGKILL:
                return "crash", "killed by SIGKILL (out of memory, or killed from outside)"
            return "crash", f"killed by signal {sig.name}"
        return "crash", f"worker process exited with status {code}"

    def terminate(self, grace: float) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``grace`` seconds."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.05)
        self.kill()

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self.close()

    def shutdown(self) -> None:
        """Ask an idle worker to leave, then make sure its group is gone."""
        with contextlib.suppress(OSError):
            self.conn.send(Shutdown())
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=2)
        self.kill()

    def _signal_group(self, sig: signal.Signals) -> None:
        # The worker leads its own session, so its pid is its process group id; the group lives
        # on while any process the objective started is still in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.exit_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.exit_fd)
            self.exit_fd = None
        if self._lifeline >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = -1


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the process exits (Linux 5.3+), else None."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None
