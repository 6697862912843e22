"""The run's sampler pools (:mod:`hyperfleet.controller.sampler_pool`): one per TPE study whose
trials run side by side, with processes on the controller's machine (``sampling_processes``)
and on the nodes whose agents offer some (``hyperfleet agent --sampling-processes``), a node
that joins later included. The run log says once per study how many sample for it and where,
and at the run's end how many of the trials' sets each place's processes made.
"""

from __future__ import annotations

import time

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.cluster.hub import NodeLink
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.sampler_pool import SamplerPool, pooled_sampler
from hyperfleet.controller.study_run import StudyRun, opened
from hyperfleet.sampling.replica_process import CLOSE_SECONDS


class SamplerPools:
    """The run's pools, one per study that uses one, started with the study's first trial
    that runs beside others."""

    def __init__(self, ctx: RunContext, processes: int, studies: int) -> None:
        self._ctx = ctx
        self._studies = max(1, studies)
        # The processes are shared out between the studies, at least one each; so are each
        # node's, as far as they go.
        self._per_study = max(1, processes // self._studies) if processes > 0 else 0
        self._pools: dict[str, SamplerPool | None] = {}
        self._offering: list[NodeLink] = []  # the nodes that offered processes
        self._lent: dict[NodeLink, int] = {}  # the processes each node started for the pools

    def pool(self, run: StudyRun, side_by_side: bool) -> SamplerPool | None:
        """The study's pool, if it samples for it now."""
        if not side_by_side:
            return None
        name = run.plan.name
        if name not in self._pools:
            if self._per_study == 0 and not self._nodes_offering():
                return None  # none yet: a node that offers some may join later
            self._pools[name] = self._start(opened(run))
        pool = self._pools[name]
        if pool is None or pooled_sampler(pool.study.sampler) is None:
            return None
        dead = pool.newly_dead()
        if dead:
            self._ctx.announce(
                f"study {pool.study.study_name}: {dead} of its sampler processes died; the "
                "controller samples what they would have (slower, nothing lost)"
            )
        return pool if pool.alive else None

    def node_joined(self, link: NodeLink) -> None:
        """A node that offers sampler processes joined: each running pool takes its share."""
        if link.samplers.offered <= 0:
            return
        self._offering.append(link)
        for pool in self._pools.values():
            if pool is None or pooled_sampler(pool.study.sampler) is None:
                continue
            added = self._lend(pool, link)
            if added:
                self._ctx.announce(
                    f"study {pool.study.study_name}: sampler processes: {added} more "
                    f"{_place(link.node)}"
                )

    def ended(self, run: StudyRun, trial: FrozenTrial) -> None:
        pool = self._pools.get(run.plan.name)
        if pool is not None:
            pool.ended(trial)

    def close(self) -> None:
        """Say what each pool's processes gave, then end every process: all hung up at once,
        then waited for together."""
        pools = [pool for pool in self._pools.values() if pool is not None]
        for pool in pools:
            used = ", ".join(_used(place, counts) for place, counts in pool.used().items())
            self._ctx.announce(
                f"study {pool.study.study_name}: sets of its sampler processes used: {used}"
            )
            pool.hang_up()
        deadline = time.monotonic() + CLOSE_SECONDS
        for pool in pools:
            pool.reap(deadline)

    def _nodes_offering(self) -> list[NodeLink]:
        self._offering = [link for link in self._offering if link.alive]
        return self._offering

    def _lend(self, pool: SamplerPool, link: NodeLink) -> int:
        """Start the pool's share of the node's processes there; how many it got."""
        share = max(1, link.samplers.offered // self._studies)
        count = max(0, min(share, link.samplers.offered - self._lent.get(link, 0)))
        for _ in range(count):
            pool.add(link.node, link.samplers.start)
        self._lent[link] = self._lent.get(link, 0) + count
        return count

    def _start(self, study: optuna.Study) -> SamplerPool | None:
        sampler = pooled_sampler(study.sampler)
        if sampler is None:
            return None
        try:
            workers_dir = self._ctx.run_dir.workers_dir
            pool = SamplerPool(study, sampler, self._per_study, workers_dir, self._ctx.wake)
        except Exception as exc:  # an unpicklable sampler, no process: sample here, as before
            self._ctx.announce(
                f"study {study.study_name}: no sampler processes ({type(exc).__name__}: {exc}); "
                "the controller samples every trial"
            )
            return None
        for link in self._nodes_offering():
            self._lend(pool, link)
        places = ", ".join(f"{n} {_place(place)}" for place, n in pool.places().items())
        self._ctx.announce(f"study {study.study_name}: sampler processes: {places}")
        return pool


def _place(place: str) -> str:
    return f"on node {place}" if place else "here"


def _used(place: str, counts: list[int]) -> str:
    """``24 on node n1``; with several processes there, each one's too: ``24 here (13, 11)``."""
    each = f" ({', '.join(map(str, counts))})" if len(counts) > 1 else ""
    return f"{sum(counts)} {_place(place)}{each}"
