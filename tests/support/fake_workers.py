"""Fake workers, for tests of the controller itself that start no process.

The controller cannot tell a :class:`FakeWorker` from a worker process: it is a
``WorkerHandle`` (the loop tells this machine's workers from remote ones by that class, and
stops them through ``stop_workers``, which reads their ``process``), its connection is a real
socket pair and its ``exit_fd`` a real descriptor that becomes readable when it "exits", as a
pidfd does, so the loop waits on them as it waits on a process. Its other end is a thread that
speaks the worker protocol: it says Ready, loads objectives (the test's callables, by study
name), and runs each trial by calling the objective with a real ``RemoteTrial``, whose every
call goes to the controller over the connection. A signal "kills" it at once (a stop signal or
SIGKILL: a real worker has no handler for either), and an objective ends its worker as a
crash would by raising :class:`WorkerDies`.

Its pid is the thread's id, a real task of this process while the worker lives, and until the
controller closes it (as a dead process's pid stays valid until it is reaped): the controller
reads the CPU use of busy slots through it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import optuna

from hyperfleet.display.runstate import RunState, SlotView
from hyperfleet.errors import TrialInterrupted
from hyperfleet.resources.slots import Slot
from hyperfleet.workers.handle import STOP_SIGNALS, ObjectiveLoading, WorkerHandle
from hyperfleet.workers.protocol import (
    Finished,
    Load,
    Loaded,
    LoadFailed,
    ObjectiveSpec,
    Ready,
    RunTrial,
    Shutdown,
    WorkerSetup,
)
from hyperfleet.workers.remote_trial import Channel, RemoteStudy, RemoteTrial

Objective = Callable[[optuna.Trial], Any]
# How long a dead worker's thread waits for the controller to close it before it ends anyway
# (a test that failed midway closes nothing).
CLOSE_WAIT_SECONDS = 30.0

_serving = threading.local()  # the fake worker whose thread runs the calling objective


class WorkerDies(BaseException):
    """Raised by an objective: its worker dies there, sending no result, killed by
    ``signal`` (SIGKILL: as the kernel's out-of-memory killer or a ``kill -9`` would)."""

    def __init__(self, sig: signal.Signals = signal.SIGKILL) -> None:
        super().__init__(sig.name)
        self.signal = sig


@dataclass(frozen=True)
class Behaviour:
    """How one fake worker behaves, besides running its objectives."""

    starts: bool = True  # False: it dies (SIGKILL) before it says it is ready
    load_error: str = ""  # not "": every load fails with this message, and the worker exits


def current_worker() -> FakeWorker:
    """The fake worker whose thread runs the calling objective."""
    worker: FakeWorker | None = getattr(_serving, "worker", None)
    if worker is None:
        raise RuntimeError("not called from a fake worker's objective")
    return worker


def wait_until_killed() -> None:
    """For an objective that runs until the controller ends its worker (a stop, a timeout)."""
    current_worker().process.wait()


class FakeProcess:
    """What the controller reads of a worker's process: its pid and how it ended."""

    def __init__(self) -> None:
        self.pid = 0  # the thread's id, once it runs
        self.returncode: int | None = None
        self._ended = threading.Event()
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired("fake worker", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def end(self, code: int) -> bool:
        """Record the exit; False if it had ended already (the first cause wins)."""
        with self._lock:
            if self.returncode is not None:
                return False
            self.returncode = code
        self._ended.set()
        return True


class FakeWorker(WorkerHandle):
    """A worker with no process. What the loop calls runs WorkerHandle's own code (terminate,
    kill, shutdown, ask_to_leave, has_exited, exit_description, outside_signal, waitables,
    stop_workers), over a :class:`FakeProcess`; only starting, signalling and closing are its
    own. Its constructor sets the attributes WorkerHandle's constructor sets and its methods
    read (``marker``, ``started_at``, ``_asked_to_leave``, ``_sent_stop_signal``,
    ``_lifeline``)."""

    def __init__(
        self,
        slot: Slot,
        specs: dict[str, ObjectiveSpec],
        objectives: Mapping[str, Objective],
        behaviour: Behaviour,
    ) -> None:
        ObjectiveLoading.__init__(self)  # not WorkerHandle's: that one starts a process
        self.slot = slot
        self.trials_run = 0
        self.ready = False
        self.marker = secrets.token_hex(8)
        self.started_at = time.time() - 1.0
        self._asked_to_leave = False
        self._sent_stop_signal = False
        self._lifeline = -1  # no process to keep alive
        self.process: FakeProcess = FakeProcess()  # type: ignore[assignment]
        self.behaviour = behaviour
        self.trials: list[int] = []  # the numbers of the trials it was sent, in order
        self._objectives = objectives
        ours, theirs = socket.socketpair()
        self._their_socket = theirs  # shut down when the worker "exits": both ends read EOF
        self._their_conn = Connection(os.dup(theirs.fileno()))
        self.conn: Connection = Connection(ours.detach())
        self.exit_fd, self._exit_write = os.pipe()
        self._closed = threading.Event()
        self.conn.send(WorkerSetup(specs, slot.name))
        self._thread = threading.Thread(target=self._serve, name=f"fake-{slot.name}", daemon=True)
        self._thread.start()
        assert self._thread.native_id is not None  # set once start() returns
        self.process.pid = self._thread.native_id

    # ----- the controller's side -----------------------------------------------------------

    def _signal_group(self, sig: signal.Signals) -> None:
        if sig in STOP_SIGNALS:
            self._sent_stop_signal = True
        self.exit(-sig)

    def close(self) -> None:
        super().close()
        self._closed.set()

    def exit(self, code: int) -> None:
        """End the "process": both ends of its connection read EOF and ``exit_fd`` becomes
        readable, in the order a dying process gives (its return code is there first)."""
        if not self.process.end(code):
            return
        with contextlib.suppress(OSError):
            self._their_socket.shutdown(socket.SHUT_RDWR)
        os.close(self._exit_write)

    def join(self, timeout: float) -> bool:
        """Whether its thread has ended within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ----- the worker's side (its thread) --------------------------------------------------

    def _serve(self) -> None:
        _serving.worker = self
        try:
            self._conversation()
        except (EOFError, OSError):
            pass  # killed meanwhile: its connection is shut
        except BaseException:
            self.exit(1)  # a bug here: the controller sees a worker that exited with 1
            raise
        finally:
            self._their_conn.close()
            self._their_socket.close()
            # A dead worker's pid stays valid until the controller has done with it.
            self._closed.wait(CLOSE_WAIT_SECONDS)

    def _conversation(self) -> None:
        conn = self._their_conn
        conn.recv()  # WorkerSetup: the objectives are the test's callables
        if not self.behaviour.starts:
            self.exit(-signal.SIGKILL)
            return
        conn.send(Ready(pid=threading.get_native_id()))  # what .pid says too
        channel = Channel(conn)
        while self.process.returncode is None:
            message = channel.next_message()
            if isinstance(message, Shutdown):
                self.exit(0)
            elif isinstance(message, Load):
                if not self._load(message.study):
                    self.exit(0)  # as a real worker after a failed load
            elif isinstance(message, RunTrial):
                self.trials.append(message.number)
                finished = self._run_trial(channel, message)
                if finished is not None and self.process.returncode is None:
                    conn.send(finished)

    def _load(self, study: str) -> bool:
        problem = self.behaviour.load_error
        if not problem and study not in self._objectives:
            problem = f"KeyError: no objective for study {study!r}"
        if problem:
            self._their_conn.send(LoadFailed(problem, "", study))
            return False
        self._their_conn.send(Loaded(study))
        return True

    def _run_trial(self, channel: Channel, message: RunTrial) -> Finished | None:
        """How the objective ended, as a worker says it; None when the worker died in it."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(message.trial_dir)  # a real worker makes its trial's folder
        study = RemoteStudy(channel, message.study)
        trial = RemoteTrial(
            channel,
            message.number,
            message.datetime_start,
            study,
            message.checkpoint_dir,
            message.suggestions,
        )
        try:
            value = self._objectives[message.objective](trial)
        except WorkerDies as death:
            self.exit(-death.signal)
            return None
        except optuna.TrialPruned as exc:
            return Finished("pruned", message=str(exc))
        except TrialInterrupted as exc:
            return Finished("interrupted", message=str(exc))
        except BaseException as exc:  # SystemExit too, as in a real worker
            kind, text = type(exc).__name__, traceback.format_exc()
            return Finished("error", error_type=kind, message=_describe(exc), traceback=text)
        return Finished("returned", value=value)


def _describe(exc: BaseException) -> str:
    """As a real worker says what the objective raised."""
    return f"sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else str(exc)


class FakeFleet:
    """The ``start_worker`` a test gives the controller: it starts a :class:`FakeWorker` for
    each worker the controller asks for, behaving as ``behaviour(slot name, how many workers
    that slot had before)`` says, and keeps them all."""

    def __init__(
        self,
        objectives: Mapping[str, Objective],
        behaviour: Callable[[str, int], Behaviour] = lambda slot, before: Behaviour(),
    ) -> None:
        self.objectives = dict(objectives)  # by study; a study left out fails to load
        self._behaviour = behaviour
        self.started: list[FakeWorker] = []

    def __call__(
        self, slot: Slot, specs: dict[str, ObjectiveSpec], log_dir: Path, cwd: Path
    ) -> FakeWorker:
        before = len(self.on(slot.name))
        worker = FakeWorker(slot, specs, self.objectives, self._behaviour(slot.name, before))
        self.started.append(worker)
        return worker

    def on(self, slot: str) -> list[FakeWorker]:
        """The workers started for ``slot``, in order."""
        return [worker for worker in self.started if worker.slot.name == slot]

    def all_ended(self, timeout: float = 5.0) -> bool:
        """Whether every worker's thread has ended (the controller closed them all)."""
        deadline = time.monotonic() + timeout
        return all(worker.join(max(0.0, deadline - time.monotonic())) for worker in self.started)


class WatchedSlotView(SlotView):
    """A slot view that keeps every state the controller gave it, in order, in ``states``."""

    states: list[str]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            self.__dict__.setdefault("states", []).append(value)
        super().__setattr__(name, value)


def watch_slots(state: RunState) -> dict[str, WatchedSlotView]:
    """Put watched views in place of the run state's slot views (before the run starts)."""
    watched = [WatchedSlotView(**vars(view)) for view in state.slots]
    state.slots = list(watched)
    return {view.name: view for view in watched}
