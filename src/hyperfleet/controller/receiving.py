"""Waiting for the workers' news, and handing each message to the part that handles it.

One wait covers every local worker's connection and exit, the agents' connections, and a wake
socket that other threads (a finished commit, a slow sampler, a signal handler) write to. A
result frees its slot: the slot's prepared next trial leaves before anything is recorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from hyperfleet.cluster.remote import RemoteWorker
from hyperfleet.controller.answers import CallAnswers
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.prepared import Preparer
from hyperfleet.controller.slot_table import SlotTable
from hyperfleet.controller.trial_ends import TrialEnds
from hyperfleet.controller.waiting import Waiter, Wakeup
from hyperfleet.controller.workforce import Workforce
from hyperfleet.store.rundir import NO_ROOM
from hyperfleet.workers.handle import Worker, WorkerHandle
from hyperfleet.workers.protocol import Call, Finished, Loaded, LoadFailed, Ready

CLOSED = object()  # what reading a closed worker connection gives
LOOK_AGAIN_SECONDS = 0.001  # how often long work looks for new remote results (glance)


class Receiver:
    def __init__(self, ctx: RunContext, slots: SlotTable, wakeup: Wakeup) -> None:
        self._ctx, self._slots, self._wakeup = ctx, slots, wakeup
        self._waiter = Waiter()
        # Remote workers with news that a glance between pieces of other work found: their
        # prepared next trials are sent; the rest of their news waits for the next step.
        self._glanced: list[RemoteWorker] = []
        self._glance_waiter = Waiter()  # its own poll set: the step's holds more
        self._looked = 0.0  # when the agents' connections were last looked at

    def connect(
        self,
        preparer: Preparer,
        answers: CallAnswers,
        ends: TrialEnds,
        workforce: Workforce,
        node_events: Callable[[], None],
    ) -> None:
        """The parts that handle what comes in (made after this one: they wake the loop)."""
        self._preparer, self._answers, self._ends = preparer, answers, ends
        self._workforce, self._node_events = workforce, node_events

    def close(self) -> None:
        self._waiter.close()
        self._glance_waiter.close()

    # ----- a step --------------------------------------------------------------------------

    def step(self, timeout: float) -> None:
        """Wait up to ``timeout`` for news, and handle what came."""
        local = list(self._slots.local_workers())
        hub = self._ctx.hub
        waitables: list[Any] = [self._wakeup.readable]
        if hub is not None:
            waitables.extend(hub.waitables())
            if hub.attention or self._glanced:
                timeout = 0.0  # news already in: from a glance, or a worker the loop ended
        for _, worker in local:
            waitables.extend(worker.waitables())
        ready = self._waiter.wait(waitables, timeout)
        if self._wakeup.readable in ready:
            self._wakeup.clear()
            self._node_events()
        self._take_local(local, ready)
        if hub is not None:
            self._take_remote(ready)

    def _take_local(self, local: list[tuple[str, WorkerHandle]], ready: list[Any]) -> None:
        received = [(n, h, self._read(h)) for n, h in local if h.conn in ready]
        sent = False
        for name, handle, message in received:
            if isinstance(message, Finished):  # prepared next trials leave first
                sent = self._preparer.start_next(name, handle, message) or sent
        if sent:
            # Hand this core to the workers just sent a trial before recording their results:
            # with as many busy processes as cores, a worker woken by its trial otherwise
            # waited for the rest of this step (on 2 cores, the median turnaround went from
            # 3.3-3.8 ms to 2.2-2.5 with it). With a core to spare this returns at once.
            os.sched_yield()
        ended = {
            name
            for name, handle, message in received
            if message is CLOSED or not self._handle_guarded(name, handle, message)
        }
        for name, handle in local:
            # An exit makes the connection (EOF) or the process's pidfd ready; without a pidfd
            # the process is asked at every step.
            if name in ended or handle.exit_fd is None or handle.exit_fd in ready:
                self._after_news(name, handle)

    def _take_remote(self, ready: list[Any]) -> None:
        """Handle the remote workers' news, with what glances found since the last step."""
        news, self._glanced = [*self._glanced, *self._remote_news(ready)], []
        self._looked = time.monotonic()
        for remote in news:
            name = remote.slot.name
            if self._slots.workers.get(name) is remote:
                self.drain(name, remote)
                self._after_news(name, remote)
            self.glance()
            news += self._glanced  # handled in this step, like the rest
            self._glanced = []

    def glance(self) -> None:
        """Between pieces of a long piece of work (a step that handles tens of results, the
        effects of a commit, preparing trials): once a millisecond, look at the agents'
        connections, and send the prepared next trial of each slot whose result came in
        meanwhile, instead of leaving the slot waiting until the work is done (at 512 slots,
        the 99th percentile of a slot's wait went from 22-26 ms to 7-11 ms)."""
        hub = self._ctx.hub
        if hub is None or time.monotonic() - self._looked < LOOK_AGAIN_SECONDS:
            return
        ready = self._glance_waiter.wait(hub.waitables(), 0.0)
        self._glanced += self._remote_news(ready)
        self._looked = time.monotonic()

    def _remote_news(self, ready: list[Any]) -> list[RemoteWorker]:
        """The remote workers with news, once their prepared next trials are on their way."""
        hub = self._ctx.hub
        assert hub is not None
        hub.pump(ready)  # remote workers' messages into their inboxes
        # Only the remote workers with news: at hundreds of slots, looking at each one at
        # every step would cost more than the step's own work.
        news = [w for w in hub.take_attention() if self._slots.workers.get(w.slot.name) is w]
        for remote in news:  # prepared next trials leave first, together
            last = remote.conn.last()
            if isinstance(last, Finished):
                self._preparer.start_next(remote.slot.name, remote, last)
        hub.flush()
        return news

    def _after_news(self, name: str, worker: Worker) -> None:
        if self._slots.workers.get(name) is worker and worker.has_exited():
            self.drain(name, worker)
            self._workforce.on_exit(name, worker)

    # ----- messages ------------------------------------------------------------------------

    def drain(self, name: str, worker: Worker) -> None:
        """Handle every message the worker has sent; a worker that died sends EOF."""
        while worker.conn.poll() and self._receive(name, worker):
            pass

    def _receive(self, name: str, worker: Worker) -> bool:
        """Handle one message of a worker whose connection is ready; False once it is closed."""
        message = self._read(worker)
        return message is not CLOSED and self._handle_guarded(name, worker, message)

    def _read(self, worker: Worker) -> object:
        """One message of a worker whose connection is ready, or CLOSED. The loop takes one
        per step: its poll says so again if there are more, where asking the connection
        itself would build a poll of its own for each message."""
        try:
            return worker.conn.recv()
        except EOFError:
            return CLOSED
        except OSError as exc:
            raise_if_no_room(exc)
            return CLOSED

    def _handle_guarded(self, name: str, worker: Worker, message: object) -> bool:
        """Handle a message; False when the worker's connection failed meanwhile."""
        try:
            self._handle(name, worker, message)
        except OSError as exc:
            raise_if_no_room(exc)
            return False
        return True

    def _handle(self, name: str, worker: Worker, message: object) -> None:
        if isinstance(message, Call):
            self._answers.answer(name, worker, message)
        elif isinstance(message, Finished):
            self._on_finished(name, worker, message)
        elif isinstance(message, Ready):
            self._workforce.on_ready(name, worker, message)
        elif isinstance(message, Loaded):
            self._workforce.on_loaded(name, worker, message.study)
        elif isinstance(message, LoadFailed):
            self._workforce.on_load_failed(name, message)

    def _on_finished(self, name: str, worker: Worker, finished: Finished) -> None:
        active = self._slots.active.get(name)
        if active is None:
            return
        worker.trials_run += 1
        failed = self._ends.finish(name, active, finished)
        self._workforce.after_trial(name, worker, active, finished, failed)


def raise_if_no_room(exc: OSError) -> None:
    """A dead worker's connection fails, and that is handled as its exit; a run folder that
    can no longer be written stops the run (see launch.run_search)."""
    if exc.errno in NO_ROOM or isinstance(exc, FileNotFoundError):
        raise exc
