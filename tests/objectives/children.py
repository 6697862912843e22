"""An objective that starts a process and leaves it running, to check that it ends with its trial.

``CHILD_HOW`` says how the child is started: ``group`` (in the worker's process group, never
waited for), ``session`` (``start_new_session=True``: it left the group) or ``orphan`` (through a
shell that starts it in the background in a new session and exits at once: its parent is gone
too). ``CHILD_END`` says how the trial then ends: ``returns``, ``raises``, ``prunes``, ``exits``
(``os._exit``: the worker dies) or ``hangs`` (until a trial timeout, a stop or a kill).

The child's command line holds its trial folder, so ``processes_of_run`` finds it, and it writes
its pid to ``child.pid`` there. The objective returns how many children of earlier trials in this
worker it still finds alive.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil

HOW_ENV = "CHILD_HOW"
END_ENV = "CHILD_END"
PID_FILE = "child.pid"
_SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"

_started: list[psutil.Process] = []  # this worker's children, from every trial it ran


def leaves_a_child(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    still_alive = sum(1 for child in _started if _alive(child))
    _started.append(_start_child(os.environ[HOW_ENV]))
    _end_trial(os.environ[END_ENV])
    return float(still_alive)


def _start_child(how: str) -> psutil.Process:
    pid_file = Path.cwd() / PID_FILE  # the trial's folder
    argv = [sys.executable, "-c", _SLEEPER, str(pid_file)]
    if how == "orphan":
        script = shlex.join(argv) + " >/dev/null 2>&1 </dev/null &"
        subprocess.run(["setsid", "sh", "-c", script], check=True)
    else:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=how == "session")
    return psutil.Process(_wait_for_pid(pid_file))


def _wait_for_pid(pid_file: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = pid_file.read_text() if pid_file.exists() else ""
        if text:
            return int(text)
        time.sleep(0.01)  # polling for the child's own write
    raise RuntimeError(f"the child never wrote {pid_file}")


def _alive(child: psutil.Process) -> bool:
    try:
        return child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _end_trial(how: str) -> None:
    if how == "raises":
        raise ValueError("failing after starting a child")
    if how == "prunes":
        raise optuna.TrialPruned()
    if how == "exits":
        os._exit(1)
    if how == "hangs":
        time.sleep(300)
