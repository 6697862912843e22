"""The worker process: ``python -m hyperfleet.workers.main CONN_FD LIFELINE_FD``.

It is started by the controller with its slot's environment already set (GPUs, thread limits),
pins itself to its cores, loads each study's objective when asked, then runs trial after trial.
It never opens the Optuna storage: every trial call goes to the controller over the connection.

Its stdout and stderr are its log, ``RUN_DIR/workers/<slot>.log``: a line when it starts and
one per trial it runs, and whatever the objective's module printed while it loaded (a trial's
own output goes to the trial's folder).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sys
import threading

from hyperfleet.workers.logline import say

# Holds the worker's pid while it runs: hyperfleet.optimize refuses to start a search inside a
# worker (a script without an ``if __name__ == "__main__":`` guard, imported there). A pid, not
# a flag, because the objective's own child processes inherit the environment.
WORKER_PID_ENV = "HYPERFLEET_WORKER_PID"


def pin_cores_first() -> None:
    # Before anything else is imported, so every thread a library starts inherits the affinity.
    raw = os.environ.get("HYPERFLEET_SLOT")
    if raw and hasattr(os, "sched_setaffinity"):
        cores = json.loads(raw).get("cores") or []
        if cores:
            # Containers may forbid it; the thread limits still hold.
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cores)


def _watch_lifeline(fd: int) -> None:
    """Kill this worker and everything it started as soon as the controller is gone.

    The controller holds the write end of a pipe; the kernel closes it however the controller
    dies (even SIGKILL), the read below returns, and every descendant goes (those that left the
    process group too: this worker is their subreaper), then the whole process group.
    """

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        from hyperfleet.workers.descendants import kill_tree  # already loaded by main()

        try:
            kill_tree(os.getpid())
        finally:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="hyperfleet-lifeline", daemon=True).start()


def _say_started() -> None:
    slot = json.loads(os.environ.get("HYPERFLEET_SLOT") or "{}")
    cores = ",".join(str(c) for c in slot.get("cores", ())) or "any"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    say(
        f"worker {os.getpid()} for slot {slot.get('name', '?')} started: {sys.executable}, "
        f"cores {cores}, CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'}"
    )


def main() -> None:
    pin_cores_first()
    _say_started()
    os.environ[WORKER_PID_ENV] = str(os.getpid())
    # A segfault in the objective then leaves the Python stack of every thread in the trial's
    # stderr.log (fd 2 is redirected there while a trial runs), not just a signal number.
    faulthandler.enable(all_threads=True)
    conn_fd, lifeline_fd = int(sys.argv[1]), int(sys.argv[2])
    from hyperfleet.workers.descendants import become_subreaper

    # Before the objective can start anything: a process it starts that double-forks or whose
    # parent exits is then re-parented to this worker, where the cleanup after each trial (and
    # the lifeline) finds it, instead of to init.
    become_subreaper()
    _watch_lifeline(lifeline_fd)
    from multiprocessing.connection import Connection

    from hyperfleet.workers.runner import serve

    serve(Connection(conn_fd))


if __name__ == "__main__":
    main()
