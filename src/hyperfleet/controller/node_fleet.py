"""The controller's side of many machines: the nodes whose agents join, drain and leave, their
slots in the pool, and their readings in the views (see :mod:`hyperfleet.cluster`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from hyperfleet.cluster.hub import (
    ClusterSettings,
    NodeDraining,
    NodeHub,
    NodeJoined,
    NodeLeft,
)
from hyperfleet.cluster.pools import NodePlanner, NodePool, on_node
from hyperfleet.cluster.readings import node_gpus
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.fleetpack import FleetPack
from hyperfleet.controller.sampler_pools import SamplerPools
from hyperfleet.controller.slot_table import SlotTable
from hyperfleet.controller.studies import StudyBook
from hyperfleet.controller.workforce import Workforce
from hyperfleet.display.runstate import NodeView
from hyperfleet.errors import HyperfleetError
from hyperfleet.resources.inventory import Inventory
from hyperfleet.resources.slots import Slot
from hyperfleet.workers.handle import Worker

# A drained node's trials still running this long (and the kill grace) before it goes are
# ended as interrupted: in time for their end and their logs to come back.
DRAIN_MARGIN_SECONDS = 2.0


class NodeFleet:
    def __init__(
        self,
        ctx: RunContext,
        slots: SlotTable,
        studies: StudyBook,
        workforce: Workforce,
        drain: Callable[[str, Worker], None],
        cluster: ClusterSettings | None,
        planner: NodePlanner | None,
        pools: SamplerPools,
    ) -> None:
        self._ctx, self._slots, self._studies, self._workforce = ctx, slots, studies, workforce
        self._pools = pools  # TPE's sampler pools: a node may offer processes to them
        self._drain = drain  # handles every message a worker sent
        self._cluster, self._planner = cluster, planner
        # When the trials still running on each drained node are ended (monotonic).
        self.drain_cuts: dict[str, float] = {}

    def listen(self) -> None:
        """With a cluster, wait for agents; say where, and how to start one."""
        if self._cluster is None:
            return
        run_dir = self._ctx.run_dir
        self._ctx.hub = NodeHub(
            self._cluster, run_dir.path, run_dir.identity, self._ctx.wake, self._ctx.files
        )
        for line in self._ctx.hub.start_messages():
            self._ctx.announce(line)

    def waiting_note(self) -> str | None:
        """What a run with no worker yet waits for, on a cluster."""
        hub = self._ctx.hub
        if hub is None or self._slots.workers:
            return None
        refused = hub.refused_nodes()
        if refused:
            return (
                f"every node that joined was not used ({', '.join(refused)}; the run log says why)"
            )
        return (
            "no node has joined; start an agent on each node (the command is in the line "
            "that says where the controller listens) and check that they can reach it"
        )

    def take_events(self) -> None:
        hub = self._ctx.hub
        if hub is None:
            return
        for event in hub.take_events():
            if isinstance(event, NodeJoined):
                self._add(event)
            elif isinstance(event, NodeDraining):
                self._drain_node(event)
            elif isinstance(event, NodeLeft):
                self._lost(event.link.node)
                self._ctx.announce(
                    f"node {event.link.node} lost: it {event.reason}; its running trials run "
                    "again elsewhere"
                )
            else:
                self._ctx.announce(event.line())

    # ----- drains --------------------------------------------------------------------------

    def _drain_node(self, event: NodeDraining) -> None:
        """The engine takes the node back: no new trial goes there, its running trials are
        asked to save and stop (``should_stop``), and those still running shortly before it
        goes are ended as interrupted; all run again elsewhere."""
        if event.node in self._slots.drained:
            return
        self._slots.drained.add(event.node)
        when = ""
        if event.deadline is not None:
            cut = event.deadline - self._ctx.settings.kill_grace - DRAIN_MARGIN_SECONDS
            self.drain_cuts[event.node] = cut
            when = f" in {max(0.0, event.deadline - time.monotonic()):.0f}s"
        self._ctx.announce(
            f"node {event.node} is taken back by its engine{when}: no new trials go there; "
            "its running trials finish, or save a checkpoint and run again elsewhere"
        )

    def cut_drained(self, now: float) -> None:
        """A drained node goes soon: its trials still running end as interrupted now."""
        for node, when in list(self.drain_cuts.items()):
            if now < when:
                continue
            del self.drain_cuts[node]
            reason = (
                f"interrupted: node {node} was taken back by its engine before the trial "
                "ended; it runs again"
            )
            names = [n for n in self._slots.active if self._slots.node_of(n) == node]
            self._workforce.interrupt(names, reason)

    # ----- joins and losses ----------------------------------------------------------------

    def _add(self, joined: NodeJoined) -> None:
        link = joined.link
        if self._planner is None or not link.alive or self._ctx.stops.level:
            return
        self._drop_slots(link.node)  # an earlier link of the same node, lost
        try:
            pool = on_node(link.node, self._planner(joined.inventory))
        except HyperfleetError as exc:
            self._ctx.announce(f"node {link.node} not used: {exc}")
            link.refuse(f"node {link.node} is not used: {exc}")
            return
        used = {name for names in pool.study_slots.values() for name in names}
        slots = [slot for slot in pool.slots if slot.name in used]
        for run in self._studies.runs.values():
            extra = pool.study_slots.get(run.plan.name, ())
            run.plan = replace(run.plan, slots=run.plan.slots + extra)
        for slot in slots:
            self._slots.add(slot, link)
            self._slots.ledger.add(slot.name, pool.needs[slot.name])
            self._workforce.start(slot)
        self._pack(link.node, slots, pool, joined.inventory)
        gpus = len({gpu for slot in slots for gpu in slot.gpus})
        cores = len(joined.inventory.cores)
        self._ctx.state.nodes[link.node] = NodeView(link.node, link.where, cores=cores)
        offers = link.samplers.offered
        sampling = f", sampler processes offered: {offers}" if offers else ""
        self._ctx.announce(
            f"node {link.node} joined from {link.where}: {len(slots)} slots, {gpus} GPUs, "
            f"{cores} cores{sampling}; {link.run_folder_note()}"
        )
        self._pools.node_joined(link)

    def _pack(self, node: str, slots: list[Slot], pool: NodePool, inventory: Inventory) -> None:
        """Auto packing grows the node's GPUs from its agent's readings, as this machine's."""
        packed = [slot for slot in slots if slot.packed]
        if pool.packing is None or not packed:
            return
        taken = {core for slot in slots for core in slot.cores}
        spare = tuple(sorted(set(inventory.cores) - taken))  # the node's, lent to added workers
        if self._ctx.autopack is None:
            self._ctx.autopack = FleetPack()
        self._ctx.autopack.add(node, packed, pool.packing, spare)

    def _lost(self, node: str) -> None:
        """The node's view says it is lost, and its GPUs are packed no more, unless it joined
        again meanwhile."""
        hub = self._ctx.hub
        view = self._ctx.state.nodes.get(node)
        back = hub is not None and any(link.node == node for link in hub.links())
        if view is not None and not back:
            view.state, view.gpus, view.cpu_percent = "lost", {}, None
        if self._ctx.autopack is not None and not back:
            self._ctx.autopack.drop(node)

    def _drop_slots(self, node: str) -> None:
        """Before a node's new link takes its slot names: the old link's workers end as lost
        now, if the loop has not handled them yet."""
        for name, link in list(self._slots.links.items()):
            if link.node != node:
                continue
            worker = self._slots.workers.get(name)
            if worker is not None:
                link.lose("connected again")
                self._drain(name, worker)
                self._workforce.on_exit(name, worker)
            elif name in self._workforce.outside_stops:  # its trial ends with the old link
                link.lose("connected again")
                self._workforce.settle_outside_stops()
            elif name in self._slots.links:
                self._workforce.remove_slot(name)

    # ----- readings ------------------------------------------------------------------------

    def read(self) -> None:
        """The nodes' newest readings into the run state (see cluster/readings.py); a GPU's
        health change on a node is said once, as the controller's own machine's."""
        hub = self._ctx.hub
        if hub is None:
            return
        for link in hub.links():
            view, reading = self._ctx.state.nodes.get(link.node), link.reading
            if view is None or reading is None:
                continue
            view.state = "joined"
            view.gpus = node_gpus(reading, time.time() - (link.read_at or 0.0))
            view.cpu_percent = reading.cpu_percent
            view.memory_used_mib = reading.memory_used_mib
            view.memory_total_mib = reading.memory_total_mib
            view.updated = link.read_at
            for line in link.problems:
                self._ctx.announce(f"{link.node}/{line}")
            link.problems.clear()
