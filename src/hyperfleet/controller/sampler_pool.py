"""Sampler processes beside the controller, so that TPE's cost does not land on its one thread.

With TPE the controller's CPU per trial grows with the study (tens of milliseconds at 1,000
finished trials, a hundred and more at 10,000), and one thread samples for every slot of the
cluster. Optuna's samplers are functions of the study's history, the running trials and their
seed, and the controller holds every record it writes. So each sampler process
(:mod:`hyperfleet.controller.replica`) keeps a replica of the study, an in-memory study with the
same directions and a reseeded copy of its sampler, current from what the controller sends it
(the trials it has, once; each trial that starts, with the values sent with it; each trial that
ends), and samples suggestion sets ahead of need for the study's known space (the parameters
every complete trial suggested with the same distribution, :mod:`hyperfleet.controller.ahead`).

A set is what the sampler's part of an ask would have made: the relative sample (TPE's
multivariate search space, values and the system attributes TPE writes on the new trial, so
that other processes' constant liar sees it), and values for the space's other parameters.
When the controller starts a trial of the study and a set is ready, it asks with the relative
sample handed back (as for GP's off-thread sample: ``controller.slow_samplers``'s
``Prepared``) and sends the set's values with the trial through the existing ``ahead`` path:
the worker answers ``suggest`` from them, the controller records each through the trial's own
``suggest``, and the storage sees what it sees without the pool. A define-by-run parameter
outside the space is a call, sampled by the controller as before.

The controller's loop never waits for the pool; a slot may. With no set ready while the
processes deliver sets (a burst of results used up the queue), the slot waits for the next set
(``TrialStarts``, as for a slow sampler's suggestion), for ``WAIT_SECONDS`` at most: sampling
it on the controller instead would cost the controller a whole TPE sample (15 ms at 1,000
finished trials, 70 ms at 10,000), during which every other slot waits too. Where the pool
delivers nothing (off, starting, dead, or a wait that ran out: a process that hangs or fell far
behind) the controller samples itself as without one, until a set comes in again. Slots wait
only on runs with ``WAIT_FROM_SLOTS`` slots per process or more: there the controller's time is
what the run is short of, and its sample would hold up many slots; on a few slots (two CPU
slots, trivial trials) the controller has time to spare, and its sample beside the process's
gives more trials per second than waiting for the one process (measured in
``bench/RESULTS.md``).

A set is used once (it is taken out of the queue); a set sampled for an older space is
dropped, and so is a stale one: sampled before TPE's random startup trials were done while they
are done now (a random draw where TPE would model), or more results ago than twice the queue
holds (a process that fell behind). Nothing the processes do reaches the storage, so a process
that dies costs only speed; the run log says so once.

Why processes and not threads: the sampling is Python and numpy under the GIL; a thread would
take the controller's own interpreter. Why sets sampled ahead rather than on request: a request
would make a starting trial wait for the pool. How many sets wait: a set waiting in the queue
was sampled before the results that arrived since, like a trial asked while others ran, so the
queue is short; but trials end in bursts (slots started together end together), and a burst
larger than the queue waits for the processes. So the queue holds about a quarter of the
slots (``queue_depth``), at least two sets per process: with S slots running, every ask already
sees S - 1 trials without their results, and S / 4 more sampled a little early is of that order.

Only Optuna's TPE sampler (the default, and what the auto sampler picks for most studies, used
while it is TPE) uses the pool, and only where trials already run side by side (on nodes or on
more than one slot): a seeded single-slot run gives ``study.optimize``'s trials. The pool is
off unless a run's ``sampling_processes`` asks for processes: its suggestions come from
replicas seeded apart from the study's sampler, so a seeded run on several slots would no
longer draw what it draws today, and on a machine without spare cores the processes compete
with the controller and the workers (measured in ``bench/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import cloudpickle
import optuna
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.controller.ahead import Ahead, Space
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.slow_samplers import Prepared
from hyperfleet.controller.study_run import StudyRun, opened
from hyperfleet.sampling.auto_sampler import AutoSampler

CLOSE_SECONDS = 2.0  # for the processes to exit once hung up; then they are killed
WAIT_SECONDS = 1.0  # the longest a slot waits for a set before the controller samples it
WAIT_FROM_SLOTS = 4  # the slots per process from which a slot waits for a set
OUTBOX_LIMIT = 256  # messages kept for the next start at most
LEARNED_FROM = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials TPE learns from
SetKey = tuple[int, int]  # the process's index in its pool, the set's number there


def pooled_sampler(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler | None:
    """The sampler a pool's replicas run for a study with ``sampler``, or None where the pool
    is not used: Optuna's TPE, or the auto sampler while it is TPE."""
    if isinstance(sampler, AutoSampler):
        return pooled_sampler(sampler.current)
    return sampler if isinstance(sampler, optuna.samplers.TPESampler) else None


def queue_depth(slots: int, processes: int) -> int:
    """Sets each process keeps waiting at the controller: about a quarter of the slots in all,
    at least two per process."""
    return max(2, -(-slots // (4 * max(1, processes))))


@dataclass
class SuggestionSet:
    key: SetKey
    version: int  # of the space it was sampled for
    relative: Prepared  # the sampler's relative sample, handed back at the ask
    others: Ahead  # values for the space's other parameters
    known: int  # the finished trials it was sampled from


class _Link:
    """One sampler process: its socket, a thread that sends what the controller queued (the
    loop never blocks on a full socket) and one that collects its sets."""

    def __init__(
        self,
        index: int,
        setup: dict[str, Any],
        log: Path,
        ready: deque[Any],
        arrived: Callable[[], None],
    ) -> None:
        parent, child = socket.socketpair()
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hyperfleet.controller.replica", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Not in the terminal's process group: a Ctrl+C stops the run, whose end
                # closes the socket, rather than killing the processes mid-run.
                start_new_session=True,
            )
        child.close()
        self.index = index
        self._socket = parent  # kept to shut down: a close would not wake the reading thread
        self.conn = Connection(os.dup(parent.fileno()))
        self.dead = False
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._ready = ready
        self._arrived = arrived  # called on the reading thread after each set
        self.send_bytes(bytes(ForkingPickler.dumps({**setup, "index": index})))
        self._threads = [
            threading.Thread(target=target, name=f"hyperfleet-pool-{way}-{index}", daemon=True)
            for target, way in ((self._send_loop, "out"), (self._read_loop, "in"))
        ]
        for thread in self._threads:
            thread.start()

    def send_bytes(self, payload: bytes) -> None:
        if not self.dead:
            self._outgoing.put(payload)

    def _send_loop(self) -> None:
        while (payload := self._outgoing.get()) is not None:
            try:
                self.conn.send_bytes(payload)
            except OSError:
                self.dead = True
                return

    def _read_loop(self) -> None:
        try:
            while True:
                self._ready.append(self.conn.recv())
                self._arrived()
        except (EOFError, OSError):
            self.dead = True

    def hang_up(self) -> None:
        """Shut the socket down: the process reads end-of-file and exits."""
        self.dead = True
        self._outgoing.put(None)
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()

    def reap(self, deadline: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # in the middle of a long sample: not worth waiting
            self.process.kill()
            self.process.wait()
        for thread in self._threads:  # both end once the socket is shut down
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            self.conn.close()  # not before: its descriptor could be reused under them


class SamplerPool:
    """A study's sampler processes and the sets they made ready. ``wake``: wakes the
    controller's loop, called from a reading thread when a set comes in while slots wait."""

    def __init__(
        self,
        study: optuna.Study,
        sampler: Any,
        count: int,
        log_dir: Path,
        wake: Callable[[], None],
    ) -> None:
        setup = {
            "sampler": cloudpickle.dumps(sampler),
            "directions": [d.name for d in study.directions],
        }
        self._ready: deque[Any] = deque()
        self._wake = wake
        self._wanted = False  # slots wait for a set: one that comes in wakes the loop
        self._delivering = False  # sets came in since the start, or since a wait ran out
        self._links = [
            _Link(
                i,
                setup,
                log_dir / f"sampler-{study.study_name}-{i}.log",
                self._ready,
                self._arrived,
            )
            for i in range(count)
        ]
        self._space: Space | None = None
        self._version = 0
        self._slots = 0  # the slots the queue's depth was set for
        # Messages for every process, sent together at the next start: one pickling and one
        # hand-over to each sending thread per trial rather than per message.
        self._outbox: list[tuple[Any, ...]] = []
        self._said_dead = False
        trials = study._get_trials(deepcopy=False)
        self._finished = sum(t.state in LEARNED_FROM for t in trials)  # what TPE learns from
        self._startup = int(getattr(sampler, "_n_startup_trials", 0))  # TPE's random trials
        self._broadcast(("trials", trials))
        self._flush()

    @property
    def alive(self) -> int:
        return sum(not link.dead for link in self._links)

    def take(self, space: Space | None, slots: int) -> SuggestionSet | None:
        """A ready set sampled for ``space``, used once; None when none is ready. ``slots``: the
        run's, which the queue's depth follows."""
        if not self.ready(space, slots):
            return None
        _, key, version, search_space, params, attrs, others, known = self._ready.popleft()
        return SuggestionSet(key, version, Prepared(search_space, params, attrs), others, known)

    def ready(self, space: Space | None, slots: int) -> bool:
        """Whether a set sampled for ``space`` is ready; the unusable ones before it (an older
        space's, stale ones) are dropped."""
        if slots != self._slots:
            self._slots = slots
            self._broadcast(("depth", queue_depth(slots, len(self._links))))
            self._flush()
        if space is None:
            return False
        if space != self._space:
            self._space, self._version = dict(space), self._version + 1
            self._broadcast(("space", self._version, self._space))
            self._flush()  # rare: the processes sample for the new space at once
        while self._ready:  # only this thread takes sets out: the first stays the first
            _, key, version, *_, known = self._ready[0]
            if version == self._version and not self._stale(known):
                return True
            self._ready.popleft()
            self._send(key[0], ("drop", key[1]))
        return False

    def worth_waiting(self, space: Space | None, slots: int) -> bool:
        """Whether a slot waits for the next set rather than the controller sampling it: while
        the processes deliver sets for a known space, on a run of ``slots`` with enough of them
        per process (see the module's docstring)."""
        many = slots >= WAIT_FROM_SLOTS * len(self._links)
        return many and space is not None and self._delivering and self.alive > 0

    def wait_ran_out(self) -> None:
        """A slot waited ``WAIT_SECONDS`` in vain: no more waits until a set comes in."""
        self._delivering = False

    def want(self, waiting: bool) -> None:
        """Whether slots wait for a set now. A set that came in while none did wakes the loop
        as they start to: it may be the one they wait for."""
        self._wanted = waiting
        if waiting and self._ready:
            self._wake()

    def _arrived(self) -> None:
        """A set came in (on a reading thread)."""
        self._delivering = True
        if self._wanted:
            self._wake()

    def _stale(self, known: int) -> bool:
        """Whether a set sampled from ``known`` finished trials is too old to use: sampled
        before TPE's random startup trials were done while they are done now (a random draw
        where TPE would model), or more results ago than twice the queue holds (a process
        that fell behind)."""
        if known < self._startup <= self._finished:
            return True
        queue = queue_depth(self._slots, len(self._links)) * len(self._links)
        return self._finished - known > 2 * queue

    def started(self, number: int, key: SetKey | None, suggestions: Ahead) -> None:
        """A trial started (with a set's values, or the controller's): the news so far goes
        out, the trials that ended before it included."""
        self._broadcast(("started", number, key, suggestions))
        self._flush()

    def ended(self, trial: FrozenTrial) -> None:
        self._finished += trial.state in LEARNED_FROM
        self._broadcast(("trials", [trial]))

    def newly_dead(self) -> int:
        """How many processes died, the first time any did (0 otherwise, and after)."""
        dead = len(self._links) - self.alive
        if dead and not self._said_dead:
            self._said_dead = True
            return dead
        return 0

    def hang_up(self) -> None:
        for link in self._links:
            link.hang_up()

    def reap(self, deadline: float) -> None:
        for link in self._links:
            link.reap(deadline)

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        if not self.alive:
            return
        self._outbox.append(message)
        if len(self._outbox) >= OUTBOX_LIMIT:  # no trial starts with the pool (GP took over)
            self._flush()

    def _flush(self) -> None:
        if not self._outbox:
            return
        payload = bytes(ForkingPickler.dumps(("batch", self._outbox)))  # once for every process
        self._outbox = []
        for link in self._links:
            link.send_bytes(payload)

    def _send(self, index: int, message: tuple[Any, ...]) -> None:
        self._flush()  # the news first: a process whose sets were stale learns why
        self._links[index].send_bytes(bytes(ForkingPickler.dumps(message)))


class SamplerPools:
    """The run's pools, one per study that uses one, started with the study's first trial
    that runs beside others."""

    def __init__(self, ctx: RunContext, processes: int, studies: int) -> None:
        self._ctx = ctx
        # The processes are shared out between the studies, at least one each.
        self._per_study = max(1, processes // max(1, studies)) if processes > 0 else 0
        self._pools: dict[str, SamplerPool | None] = {}

    def pool(self, run: StudyRun, side_by_side: bool) -> SamplerPool | None:
        """The study's pool, if it samples for it now."""
        if not side_by_side or self._per_study == 0:
            return None
        study = opened(run)
        name = run.plan.name
        if name not in self._pools:
            self._pools[name] = self._start(study)
        pool = self._pools[name]
        if pool is None or pooled_sampler(study.sampler) is None:
            return None
        dead = pool.newly_dead()
        if dead:
            self._ctx.announce(
                f"study {study.study_name}: {dead} of its sampler processes died; the controller "
                "samples what they would have (slower, nothing lost)"
            )
        return pool if pool.alive else None

    def ended(self, run: StudyRun, trial: FrozenTrial) -> None:
        pool = self._pools.get(run.plan.name)
        if pool is not None:
            pool.ended(trial)

    def close(self) -> None:
        """End every process: all hung up at once, then waited for together."""
        pools = [pool for pool in self._pools.values() if pool is not None]
        for pool in pools:
            pool.hang_up()
        deadline = time.monotonic() + CLOSE_SECONDS
        for pool in pools:
            pool.reap(deadline)

    def _start(self, study: optuna.Study) -> SamplerPool | None:
        sampler = pooled_sampler(study.sampler)
        if sampler is None:
            return None
        try:
            workers_dir = self._ctx.run_dir.workers_dir
            return SamplerPool(study, sampler, self._per_study, workers_dir, self._ctx.wake)
        except Exception as exc:  # an unpicklable sampler, no process: sample here, as before
            self._ctx.announce(
                f"study {study.study_name}: no sampler processes ({type(exc).__name__}: {exc}); "
                "the controller samples every trial"
            )
            return None
