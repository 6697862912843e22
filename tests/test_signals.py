"""Clean stops, driven like a person at a terminal: Ctrl+C typed into a pseudo-terminal, and
SIGTERM as SLURM and cloud preemption send it."""

from __future__ import annotations

import os
import pty
import signal
import threading
import time
from pathlib import Path

from optuna.trial import TrialState

from support.procs import (
    assert_no_leftovers,
    cli_command,
    cpu_only_env,
    load_trials,
    objective,
    run_cli,
    wait_until,
)

KIND = "hyperfleet:fail_kind"
RETRY_OF = "hyperfleet.retry_of"
SOFT_STOP = "Press Ctrl+C again to terminate them"
HARD_STOP = "stopping now: terminating running trials"


class TerminalRun:
    """A command whose controlling terminal is a pseudo-terminal we type into."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the command
            try:
                os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self._fd = pid, fd
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.returncode: int | None = None

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except OSError:  # EIO: the terminal's last user is gone
                return
            if not chunk:
                return
            with self._lock:
                self._output += chunk

    @property
    def output(self) -> str:
        with self._lock:
            return self._output.decode(errors="replace")

    def type_ctrl_c(self) -> None:
        os.write(self._fd, b"\x03")  # the terminal turns it into SIGINT for the foreground

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        wait_until(lambda: text in self.output, timeout, f"{text!r} on the terminal")

    def wait(self, timeout: float = 60) -> int:
        def exited() -> bool:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode is not None

        if self.returncode is None:
            wait_until(exited, timeout, "the command to exit")
        self._reader.join(timeout=5)
        os.close(self._fd)
        assert self.returncode is not None
        return self.returncode


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        objective("waits_for_release"),
        "--run-dir",
        str(run_dir),
        "--study-name",
        "s",
        "--n-trials",
        "4",
        "--cpu-slots",
        "2",
        "--plain",
        "--no-report",
        *extra,
    ]


def _start(tmp_path: Path, *extra: str) -> tuple[TerminalRun, dict[str, str]]:
    env = {**cpu_only_env(), "TEST_FOLDER": str(tmp_path)}
    run = TerminalRun(cli_command(*_args(tmp_path / "run", *extra)), env, tmp_path)
    wait_until(lambda: _log(tmp_path).count("start ") == 2, 60, "both slots to start a trial")
    return run, env


def _log(folder: Path) -> str:
    path = folder / "log"
    return path.read_text() if path.exists() else ""


def test_first_ctrl_c_lets_running_trials_finish(tmp_path: Path) -> None:
    run, _ = _start(tmp_path)
    run.type_ctrl_c()
    run.wait_for_output(SOFT_STOP)
    (tmp_path / "release").touch()  # the running trials may now finish

    assert run.wait() == 130
    trials = load_trials(tmp_path / "run", "s")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # no new trial started
    assert _log(tmp_path).count("end ") == 2
    assert HARD_STOP not in run.output
    assert_no_leftovers(tmp_path / "run")


def test_ctrl_c_leaves_prepared_trials_enqueued_and_the_next_run_takes_them(
    tmp_path: Path,
) -> None:
    # With the random sampler each busy slot's next trial is prepared while it runs
    # (hyperfleet.controller.prepared): a stop leaves them enqueued, never running.
    run, env = _start(tmp_path, "--sampler", "random")
    wait_until(lambda: len(load_trials(tmp_path / "run", "s")) == 4, 30, "two prepared trials")
    run.type_ctrl_c()
    run.wait_for_output(SOFT_STOP)
    (tmp_path / "release").touch()

    assert run.wait() == 130
    stopped = load_trials(tmp_path / "run", "s")
    states = sorted(t.state.name for t in stopped)  # in the order the slots took numbers
    assert states == ["COMPLETE", "COMPLETE", "WAITING", "WAITING"]
    assert _log(tmp_path).count("start ") == 2  # the prepared ones never started
    assert_no_leftovers(tmp_path / "run")

    again = run_cli(_args(tmp_path / "run", "--sampler", "random"), tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    trials = load_trials(tmp_path / "run", "s")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # the budget, no more


def test_second_ctrl_c_interrupts_and_the_next_run_repeats(tmp_path: Path) -> None:
    run, env = _start(tmp_path)
    run.type_ctrl_c()
    run.wait_for_output(SOFT_STOP)
    run.type_ctrl_c()

    assert run.wait() == 130
    assert HARD_STOP in run.output
    assert_no_leftovers(tmp_path / "run")
    interrupted = load_trials(tmp_path / "run", "s")
    failed = [t for t in interrupted if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all(t.system_attrs[KIND] == "interrupted" for t in failed)
    assert "end " not in _log(tmp_path)

    # Running the same command again repeats them and carries on to the same budget.
    (tmp_path / "release").touch()
    again = run_cli(_args(tmp_path / "run"), tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    trials = load_trials(tmp_path / "run", "s")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    repeats = {t.user_attrs[RETRY_OF]: t for t in complete if RETRY_OF in t.user_attrs}
    assert sorted(repeats) == sorted(t.number for t in failed)
    assert all(repeats[t.number].params == t.params for t in failed)


def test_sigterm_stops_softly_then_hard_after_the_grace_period(tmp_path: Path) -> None:
    run, _ = _start(tmp_path, "--stop-grace", "1s", "--kill-grace", "1s")
    sent = time.monotonic()
    os.kill(run.pid, signal.SIGTERM)
    run.wait_for_output("stopping (SIGTERM): no new trials")

    assert run.wait() == 130
    took = time.monotonic() - sent
    assert HARD_STOP in run.output
    assert 1.0 <= took < 15, took  # the grace period was given, and no more than needed
    trials = load_trials(tmp_path / "run", "s")
    assert [t.system_attrs.get(KIND) for t in trials if t.state == TrialState.FAIL] == [
        "interrupted",
        "interrupted",
    ]
    assert_no_leftovers(tmp_path / "run")
