"""Sampler processes beside the controller, so that TPE's cost does not land on its one thread.

With TPE the controller's CPU per trial grows with the study (tens of milliseconds at 1,000
finished trials, a hundred and more at 10,000), and one thread samples for every slot of the
cluster. Optuna's samplers are functions of the study's history, the running trials and their
seed, and the controller holds every record it writes. So each sampler process
(:mod:`hyperfleet.sampling.replica`) keeps a replica of the study, an in-memory study with the
same directions and a reseeded copy of its sampler, current from what the controller sends it
(the trials it has, once; each trial that starts, with the values sent with it; each trial that
ends), and samples suggestion sets ahead of need for the study's known space (the parameters
every complete trial suggested with the same distribution, :mod:`hyperfleet.controller.ahead`).

The processes run on the controller's machine, or on an agent's node that offers some
(:mod:`hyperfleet.cluster.node_samplers`, its links here :mod:`hyperfleet.cluster.remote_samplers`;
the run's pools share them out, :mod:`hyperfleet.controller.sampler_pools`): the pool talks to
each through a link of one interface, and a process that joins a running pool first gets every
trial of the study, then the queue's depth and the space, then the news as the others.

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
on runs with ``WAIT_FROM_SLOTS`` slots per process or more: there the controller's time is
what the run is short of, and its sample would hold up many slots. On a few slots (two CPU
slots, trivial trials) the controller has time to spare, and its sample beside the processes'
gives more trials per second than waiting for them, as long as a core is free for it: where
the processes on this machine and the controller outnumber its cores, the controller's sample
takes a process's core, and slots wait there too (both measured in ``bench/RESULTS.md``).

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
larger than the queue waits for the processes. So the queue holds about an eighth of the
slots (``queue_depth``), at least one set per process: with S slots running, every ask already
sees S - 1 trials without their results, and S / 8 more sampled a little early leaves the
search as good as the controller's own sampling, where S / 4 did not at 8 slots (simulated
over 100 seeds a point, ``bench/parallel_quality.py --ahead``, in ``bench/RESULTS.md``).

Only Optuna's TPE sampler (the default, and what the auto sampler picks for most studies, used
while it is TPE) uses the pool, and only where trials already run side by side (on nodes or on
more than one slot): a seeded single-slot run gives ``study.optimize``'s trials. The pool is
off unless a run's ``sampling_processes`` asks for processes: its suggestions come from
replicas seeded apart from the study's sampler, so a seeded run on several slots would no
longer draw what it draws today, and on a machine without spare cores the processes compete
with the controller and the workers (measured in ``bench/RESULTS.md``).
"""

from __future__ import annotations

import collections
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Protocol

import cloudpickle
import optuna
from optuna.trial import FrozenTrial

from hyperfleet.controller.ahead import Ahead, Space
from hyperfleet.controller.slow_samplers import Prepared
from hyperfleet.resources.inventory import allowed_cores
from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.sampling.replica import LEARNED_FROM
from hyperfleet.sampling.replica_process import ReplicaProcess

WAIT_SECONDS = 1.0  # the longest a slot waits for a set before the controller samples it
WAIT_FROM_SLOTS = 4  # the slots per process from which a slot waits for a set
SLOTS_PER_SET = 8  # the queue holds a set for every this many slots (see the docstring)
OUTBOX_LIMIT = 256  # messages kept for the next start at most
SetKey = tuple[int, int]  # the process's index in its pool, the set's number there


def pooled_sampler(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler | None:
    """The sampler a pool's replicas run for a study with ``sampler``, or None where the pool
    is not used: Optuna's TPE, or the auto sampler while it is TPE."""
    if isinstance(sampler, AutoSampler):
        return pooled_sampler(sampler.current)
    return sampler if isinstance(sampler, optuna.samplers.TPESampler) else None


def queue_depth(slots: int, processes: int) -> int:
    """Sets each process keeps waiting at the controller: about an eighth of the slots in all,
    at least one per process."""
    return max(1, slots // (SLOTS_PER_SET * max(1, processes)))


@dataclass
class SuggestionSet:
    key: SetKey
    version: int  # of the space it was sampled for
    relative: Prepared  # the sampler's relative sample, handed back at the ask
    others: Ahead  # values for the space's other parameters
    known: int  # the finished trials it was sampled from


class Link(Protocol):
    """A sampler process as the pool sees it, here (``_Link``) or on an agent's node
    (:class:`hyperfleet.cluster.remote_samplers.RemoteSampler`): its sets go into the pool's
    queue, with the same wake."""

    index: int  # in its pool: the first half of its sets' keys
    dead: bool

    def send_bytes(self, payload: bytes) -> None: ...

    def hang_up(self) -> None: ...

    def reap(self, deadline: float) -> None: ...


class _Link(ReplicaProcess):
    """A sampler process on the controller's machine, and a thread that collects its sets."""

    def __init__(self, index: int, setup: bytes, log: Path, receive: Callable[[Any], None]) -> None:
        super().__init__(setup, log, f"pool-{index}")
        self.index = index
        self._receive = receive  # called on the reading thread with each set
        self.add_thread(self._read_loop, f"hyperfleet-pool-in-{index}")

    def _read_loop(self) -> None:
        try:
            while True:
                self._receive(self.conn.recv())
        except (EOFError, OSError):
            self.dead = True


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
        self.study = study
        self._setup = {
            "sampler": cloudpickle.dumps(sampler),
            "directions": [d.name for d in study.directions],
        }
        self._ready: deque[Any] = deque()
        self._wake = wake
        self._wanted = False  # slots wait for a set: one that comes in wakes the loop
        self._delivering = False  # sets came in since the start, or since a wait ran out
        self._links: list[Link] = [
            _Link(
                i,
                self.setup_of(i),
                log_dir / f"sampler-{study.study_name}-{i}.log",
                self._receive,
            )
            for i in range(count)
        ]
        self._places = [""] * count  # where each link's process runs: "" here, else its node
        self.cores = len(allowed_cores())  # this machine's, which its processes share
        self._used = [0] * count  # the sets of each link the trials used
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
        self._catch_up(self._links, trials)

    def setup_of(self, index: int) -> bytes:
        """What the pool's process ``index`` starts from, pickled: its first message."""
        return bytes(ForkingPickler.dumps({**self._setup, "index": index}))

    def add(self, place: str, start: Callable[[int, bytes, Callable[[Any], None]], Link]) -> None:
        """One more process, on node ``place``, started by ``start`` (its index in the pool, its
        setup, what it calls with each set). It hears the study first (the trials there are,
        the queue's depth, the space), then the news as every other process."""
        self._flush()  # the news so far to the others: the new one starts from the snapshot
        index = len(self._links)
        link = start(index, self.setup_of(index), self._receive)
        self._links.append(link)
        self._places.append(place)
        self._used.append(0)
        self._catch_up([link], self.study._get_trials(deepcopy=False))
        self._broadcast(("depth", queue_depth(self._slots, len(self._links))))
        self._flush()

    def _catch_up(self, links: list[Link], trials: list[FrozenTrial]) -> None:
        """Tell new processes what the pool's others know: every trial of the study (running
        ones too) and the space, in one message pickled once. The queue's depth follows from
        the count of processes, so each is told it when the count changes (:meth:`add`) or
        the slots do (:meth:`ready`)."""
        news: list[tuple[Any, ...]] = [("trials", trials)]
        if self._space is not None:
            news.append(("space", self._version, self._space))
        payload = bytes(ForkingPickler.dumps(("batch", news)))
        for link in links:
            link.send_bytes(payload)

    def _receive(self, message: Any) -> None:
        """A set came in (on a reading thread, or the loop's for a node's process)."""
        self._ready.append(message)
        self._arrived()

    def places(self) -> dict[str, int]:
        """How many processes sample for the study where: "" here, else the node's name."""
        return dict(collections.Counter(self._places))

    def used(self) -> dict[str, list[int]]:
        """How many sets of each process the trials used, by place (as :meth:`places`)."""
        counts: dict[str, list[int]] = {}
        for place, used in zip(self._places, self._used, strict=True):
            counts.setdefault(place, []).append(used)
        return counts

    @property
    def alive(self) -> int:
        return sum(not link.dead for link in self._links)

    def take(self, space: Space | None, slots: int) -> SuggestionSet | None:
        """A ready set sampled for ``space``, used once; None when none is ready. ``slots``: the
        run's, which the queue's depth follows."""
        if not self.ready(space, slots):
            return None
        _, key, version, search_space, params, attrs, others, known = self._ready.popleft()
        self._used[key[0]] += 1
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
        per process, or where no core is free for the controller's sample (see the module's
        docstring)."""
        many = slots >= WAIT_FROM_SLOTS * len(self._links)
        places = zip(self._links, self._places, strict=True)
        here = sum(not link.dead for link, place in places if not place)
        crowded = here + 1 > self.cores  # the processes on this machine, and the controller
        return (many or crowded) and space is not None and self._delivering and self.alive > 0

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
