"""Auto packing on every machine of a run: one :class:`~hyperfleet.controller.autopack.AutoPack`
per node, each fed its own node's GPU readings.

The controller's own machine is the node ``""`` and reads its GPUs itself; a node an agent
joined from is read by its agent (see :mod:`hyperfleet.cluster.readings`), and its slots are
named after it (``node3/gpu0#1``), so a slot's name says which packer decides for it. A node
that is lost takes its packer with it; one that joins again starts afresh, with one worker per
GPU, as a new machine would.
"""

from __future__ import annotations

from collections.abc import Mapping

from hyperfleet.controller.autopack import AutoPack, Change
from hyperfleet.resources.monitor import GpuSample
from hyperfleet.resources.packing import PackingSettings
from hyperfleet.resources.slots import Slot


def node_of(name: str) -> str:
    """``node3`` for the slot ``node3/gpu0#1``; "" for the controller's own machine's."""
    return name.rpartition("/")[0]


class FleetPack:
    def __init__(self) -> None:
        self._packs: dict[str, AutoPack] = {}

    def add(
        self,
        node: str,
        slots: list[Slot],
        settings: PackingSettings,
        spare_cores: tuple[int, ...] = (),
    ) -> None:
        """Pack the GPUs of ``slots`` (the first slot of each, on ``node``)."""
        self._packs[node] = AutoPack(slots, settings, spare_cores, node)

    def drop(self, node: str) -> None:
        """The node is gone: nothing more is decided for its GPUs."""
        self._packs.pop(node, None)

    def _of(self, name: str) -> AutoPack | None:
        return self._packs.get(node_of(name))

    def gpu_of(self, name: str) -> str | None:
        """The GPU the slot is on, as the run log names it (``gpu0``, ``node3/gpu0``)."""
        pack = self._of(name)
        gpu = pack.gpu_of(name) if pack is not None else None
        if gpu is None:
            return None
        node = node_of(name)
        return f"{node}/gpu{gpu}" if node else f"gpu{gpu}"

    def costs(self) -> dict[str, float]:
        return {name: cost for pack in self._packs.values() for name, cost in pack.costs().items()}

    def ready(self, name: str, now: float) -> None:
        pack = self._of(name)
        if pack is not None:
            pack.ready(name, now)

    def trial_ended(
        self, name: str, started: float, now: float, peak_mib: int | None, failed: bool
    ) -> None:
        pack = self._of(name)
        if pack is not None:
            pack.trial_ended(name, started, now, peak_mib, failed)

    def out_of_memory(self, name: str, sharing: int) -> bool:
        pack = self._of(name)
        return pack is not None and pack.out_of_memory(name, sharing)

    def leaving(self, name: str) -> bool:
        pack = self._of(name)
        return pack is not None and pack.leaving(name)

    def gone(self, name: str) -> None:
        pack = self._of(name)
        if pack is not None:
            pack.gone(name)

    def tick(
        self,
        samples: Mapping[str, dict[int, GpuSample]],
        pids: dict[str, int],
        busy: set[str],
        now: float,
    ) -> list[Change]:
        """Every node's GPUs, each from its own node's readings (``samples``, by node)."""
        changes: list[Change] = []
        for node, pack in self._packs.items():
            changes += pack.tick(samples.get(node, {}), pids, busy, now)
        return changes

    def take_messages(self) -> list[str]:
        """The decisions and their reasons since the last call, for the run log."""
        messages = []
        for pack in self._packs.values():
            messages += pack.messages
            pack.messages.clear()
        return messages
