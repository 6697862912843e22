"""A sampler process: a replica of one study, sampling suggestion sets ahead of need.

Started for :mod:`hyperfleet.controller.sampler_pool` as ``python -m
hyperfleet.sampling.replica FD`` (a socket to the controller, or to an agent that relays for
it on its node: :mod:`hyperfleet.sampling.replica_process`), it holds an in-memory Optuna
study with the study's directions and a copy of its sampler (reseeded: every process draws
differently), kept current from what the controller sends: the trials it has (once), each
trial that ends, and each trial that starts with a set's values (so constant liar sees the
running trials). It keeps up to ``depth`` sets ready at the controller (the controller says how
many): a set is a new trial of
the replica (it stays RUNNING there, so the next set is sampled beside it, as a trial asked
while it runs), its relative sample (search space, values, the system attributes the sampler
writes) and values for the known space's other parameters. A set the controller used becomes
that trial; a dropped one is failed, which TPE ignores.

Nothing here writes the study's storage: the controller creates every trial and writes every
record, as without the pool. The process ends when the controller's socket closes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# The trials TPE learns from: a set says how many it was sampled from, and the pool compares
# that with its own count of them (sampler_pool's staleness check), so both count these.
LEARNED_FROM = (TrialState.COMPLETE, TrialState.PRUNED)


class Replica:
    def __init__(
        self, sampler: optuna.samplers.BaseSampler, directions: list[str], index: int
    ) -> None:
        sampler.reseed_rng()
        self.index = index  # this process's in its pool: the first half of its sets' keys
        self.study = optuna.create_study(
            directions=[StudyDirection[d] for d in directions], sampler=sampler
        )
        self._storage = self.study._storage
        self._ids: dict[int, int] = {}  # the controller's trial number: the replica's trial id
        self._sets: dict[int, int] = {}  # a set out at the controller: its replica trial id
        self.space: dict[str, BaseDistribution] | None = None
        self.version = -1
        self.depth = 1  # sets of this process waiting at the controller, at most
        self._next_set = 0

    @property
    def waiting(self) -> int:
        return len(self._sets)

    def ended(self, trial: FrozenTrial) -> None:
        """A trial the controller has as finished (or running, from its first snapshot)."""
        trial_id = self._ids.get(trial.number)
        if trial_id is None:
            self._ids[trial.number] = self._create(trial)
            return
        current = self._storage.get_trial(trial_id)
        if current.state.is_finished():
            return
        for name, value in trial.params.items():
            if name not in current.params:
                distribution = trial.distributions[name]
                internal = distribution.to_internal_repr(value)
                self._storage.set_trial_param(trial_id, name, internal, distribution)
        for step, value in trial.intermediate_values.items():
            self._storage.set_trial_intermediate_value(trial_id, step, value)
        for key, value in trial.system_attrs.items():
            if key.startswith("constraints"):  # what constrained samplers read
                self._storage.set_trial_system_attr(trial_id, key, value)
        if trial.state.is_finished():
            values = trial.values if trial.state == TrialState.COMPLETE else None
            self._storage.set_trial_state_values(trial_id, trial.state, values)

    def started(self, number: int, set_key: tuple[int, int] | None, params: dict[str, Any]) -> None:
        """A trial the controller started: from one of this process's sets, that set's replica
        trial becomes it; else a running trial with the values sent with it."""
        if number in self._ids:
            return
        own = set_key is not None and set_key[0] == self.index
        trial_id = self._sets.pop(set_key[1], None) if own and set_key else None
        if trial_id is None:
            running = optuna.trial.create_trial(
                state=TrialState.RUNNING,
                params={name: value for name, (_, value) in params.items()},
                distributions={name: d for name, (d, _) in params.items()},
            )
            trial_id = self._create(running)
        self._ids[number] = trial_id

    def dropped(self, set_id: int) -> None:
        trial_id = self._sets.pop(set_id, None)
        if trial_id is not None:
            self._storage.set_trial_state_values(trial_id, TrialState.FAIL)

    def sample(self) -> tuple[Any, ...]:
        """A new set: ("set", (process, id), space version, relative search space, relative
        values, system attributes of the relative sample, other values by name, the finished
        trials it was sampled from)."""
        finished = len(self.study._get_trials(deepcopy=False, states=LEARNED_FROM))
        trial = self.study.ask()
        relative = dict(trial.relative_params)
        relative_space = dict(trial.relative_search_space or {})
        system_attrs = dict(self._storage.get_trial(trial._trial_id).system_attrs)
        others: dict[str, tuple[BaseDistribution, Any]] = {}
        for name, distribution in (self.space or {}).items():
            if name in relative or distribution.single():
                continue
            others[name] = (distribution, trial._suggest(name, distribution))
        set_id = self._next_set
        self._next_set += 1
        self._sets[set_id] = trial._trial_id
        key = (self.index, set_id)
        return ("set", key, self.version, relative_space, relative, system_attrs, others, finished)

    def _create(self, trial: FrozenTrial) -> int:
        return self._storage.create_new_trial(self.study._study_id, template_trial=trial)


def handle(replica: Replica, message: tuple[Any, ...]) -> None:
    kind = message[0]
    if kind == "batch":
        for each in message[1]:
            handle(replica, each)
    elif kind == "trials":
        for trial in message[1]:
            replica.ended(trial)
    elif kind == "started":
        replica.started(message[1], message[2], message[3])
    elif kind == "space":
        replica.version, replica.space = message[1], message[2]
    elif kind == "depth":
        replica.depth = message[1]
    elif kind == "drop":
        replica.dropped(message[1])


def serve(conn: Connection) -> None:
    """Answer the controller until it closes the socket."""
    setup = conn.recv()
    sampler = cloudpickle.loads(setup["sampler"])
    replica = Replica(sampler, setup["directions"], setup["index"])
    while True:
        # Take in all the news first: a set is sampled from the freshest history there is.
        while conn.poll(0 if _can_sample(replica) else None):
            handle(replica, conn.recv())
        if _can_sample(replica):
            conn.send(replica.sample())


def _can_sample(replica: Replica) -> bool:
    return replica.space is not None and replica.waiting < replica.depth


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    sock = socket.socket(fileno=int(sys.argv[1]))
    conn = Connection(sock.detach())
    # EOF: the controller closed the socket (the run ended) or is gone.
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        serve(conn)


if __name__ == "__main__":
    main()
