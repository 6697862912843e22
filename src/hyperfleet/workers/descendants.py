"""Finding and ending the processes a trial started, including those that left its worker.

A worker runs in its own process group, so a kill of the group reaches every child that stayed
in it. A child started with ``start_new_session=True`` (or ``setsid``) leaves the group, and a
child whose parent exits is re-parented away from the worker's tree. Three things together
reach those too:

* the worker is a child subreaper (Linux): an orphan of any of its descendants is re-parented
  to the worker instead of to init, so while the worker lives, ``descendants(worker)`` finds
  everything its trials started, however they detached;
* each worker's environment holds a marker (``MARKER_ENV``) that its descendants inherit, so
  after a worker died (crash, timeout kill) the controller finds what it left by that marker;
* the worker ends its trial's processes itself after each trial, and its lifeline kills its
  whole tree when the controller dies.

What escapes: a process that drops the inherited environment *and* is orphaned when its worker
dies before the controller ends it (the controller then has nothing to recognise it by).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Collection, Iterable

import psutil

MARKER_ENV = "HYPERFLEET_WORKER_ID"
# How long a trial's leftover processes get between SIGTERM and SIGKILL: enough for a data
# loader or a shell to exit cleanly, short enough not to delay the slot's next trial.
GRACE_SECONDS = 1.0
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Have orphans of this process's descendants re-parented here (Linux 3.4+); True if so."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every descendant of ``pid`` (none if it is gone), zombies included so they are reaped.

    Costs one scan of the process table (milliseconds), unless ``pid`` has no child at all,
    which the usual trial leaves and which costs a fraction of a millisecond to see.
    """
    if not _may_have_children(pid):
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _may_have_children(pid: int) -> bool:
    """False only when Linux says ``pid`` has no child (``/proc/PID/task/*/children``)."""
    task_dir = f"/proc/{pid}/task"
    if not os.path.exists(f"{task_dir}/{pid}/children"):
        return True  # not Linux, or a kernel without the file: only a scan can tell
    try:
        threads = os.listdir(task_dir)
    except OSError:
        return True
    for thread in threads:
        with contextlib.suppress(OSError), open(f"{task_dir}/{thread}/children") as listed:
            if listed.read().strip():
                return True
    return False


def marked(markers: Collection[str], since: float) -> list[psutil.Process]:
    """Processes started after ``since`` (epoch seconds) whose environment carries one of
    ``markers``: one scan of the process table, and an environment read only for processes as
    young as the workers. Other users' processes cannot be read and are skipped: a worker only
    starts processes of its own user."""
    if not markers:
        return []
    found = []
    for proc in psutil.process_iter(["create_time"]):
        young = (proc.info["create_time"] or 0.0) >= since
        with contextlib.suppress(psutil.Error):
            if young and proc.environ().get(MARKER_ENV) in markers:
                found.append(proc)
    return found


def send(processes: Iterable[psutil.Process], sig: signal.Signals) -> None:
    # psutil checks each process is still the one found (pid and start time), so a pid reused
    # by an unrelated process meanwhile is never signalled.
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def end(processes: list[psutil.Process], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL; children of ours are reaped."""
    if not processes:
        return
    send(processes, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=grace)
    kill(alive)


def kill(processes: list[psutil.Process]) -> None:
    """SIGKILL and wait (briefly: a process in uninterruptible sleep dies when it wakes up)."""
    if not processes:
        return
    send(processes, signal.SIGKILL)
    psutil.wait_procs(processes, timeout=GRACE_SECONDS)


def kill_tree(pid: int, rounds: int = 3) -> None:
    """SIGKILL every descendant of ``pid``, scanning again for any forked meanwhile."""
    for _ in range(rounds):
        found = descendants(pid)
        if not found:
            return
        kill(found)
