"""A ``hyperfleet run`` in the background, for tests that act on a search while it runs."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from support.procs import cli_command, wait_until


class BackgroundRun:
    """The command's stdout and stderr go to files, so a long run never blocks on a pipe."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], name: str = "run") -> None:
        self.stdout_file = cwd / f"{name}.stdout"
        self.stderr_file = cwd / f"{name}.stderr"
        with self.stdout_file.open("w") as out, self.stderr_file.open("w") as err:
            self.process = subprocess.Popen(
                cli_command(*args), cwd=cwd, env=env, stdout=out, stderr=err
            )

    @property
    def stdout(self) -> str:
        return self.stdout_file.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text()

    def wait(self, timeout: float = 60) -> int:
        wait_until(lambda: self.process.poll() is not None, timeout, "the run to exit")
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a scheduler's preemption or ``kill -9`` does."""
        self.process.send_signal(signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL

    def stop(self) -> None:
        """Clean-up after a failed test: nothing is left running."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def log_lines(folder: Path) -> list[str]:
    """What the test objectives (``waits_for_release`` ...) logged in ``folder/log``."""
    path = folder / "log"
    return path.read_text().splitlines() if path.exists() else []


def started(folder: Path) -> int:
    return sum(line.startswith("start ") for line in log_lines(folder))
