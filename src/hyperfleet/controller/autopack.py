"""Auto packing's side in the controller: which slots of a GPU have workers, and when to add or
retire one. The decisions themselves are :mod:`hyperfleet.resources.packing`'s.

A GPU under auto packing starts with its slot ``gpu<i>#0``. Growing makes ``gpu<i>#1``,
``gpu<i>#2``... (the threads of the first, on cores of their own while spare ones are left,
else on the first's; a slot retired earlier is used again, with its cores). Retiring takes the
last slot of the GPU: at once when it is idle, else when its trial ends; its name is used again
only once its worker has exited. The first slot is never retired. An added slot whose trials
fail quickly time after time (QUICK_FAILURES) lowers its GPU's limit, and a GPU that lets one
process in (EXCLUSIVE_PROCESS) keeps its first slot alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hyperfleet.resources.monitor import GpuSample
from hyperfleet.resources.packing import (
    QUICK_FAILURES,
    Decision,
    GpuPacker,
    GpuReading,
    PackingSettings,
)
from hyperfleet.resources.slots import Slot


@dataclass(frozen=True)
class Change:
    """Start a worker on ``slot`` (``start``) or retire its idle worker (not ``start``)."""

    slot: Slot
    start: bool


class AutoPack:
    def __init__(
        self,
        slots: list[Slot],
        settings: PackingSettings,
        spare_cores: tuple[int, ...] = (),
        node: str = "",
    ) -> None:
        """``spare_cores``: cores no slot has, lent to the workers growing adds (a worker that
        launches kernels waits for its core: sharing the first worker's would stall both).
        ``node``: the node the GPUs are on, for its slots' names and messages (``node3/gpu0``);
        "" for the controller's own machine."""
        self._prefix = f"{node}/" if node else ""
        firsts = [s for s in slots if s.packable]
        self._spare = list(spare_cores)
        self._own_cores: dict[str, tuple[int, ...]] = {}  # lent to a grown slot, for good
        self._first = {s.gpus[0]: s for s in firsts}
        self._packers = {i: GpuPacker(f"gpu{i}", settings) for i in self._first}
        self._failed_in_a_row: dict[str, int] = {}  # quick failures of each added worker
        self._failed_at: dict[str, float] = {}  # when a slot's last trial failed
        self._live = {i: [s] for i, s in self._first.items()}  # slots with a worker, in order
        self._starting: dict[int, set[str]] = {i: {s.name} for i, s in self._first.items()}
        self._leaving: set[str] = set()  # retired slots whose worker has not exited yet
        self._by_name = {s.name: s for s in firsts}
        self.messages: list[str] = []  # decisions and their reasons, for the run log
        for index, packer in self._packers.items():
            if settings.single_reason(index):  # said at once: no reading will change it
                self._say(index, packer.keep_one(settings.single_reason(index)))

    def gpu_of(self, name: str) -> int | None:
        slot = self._by_name.get(name)
        return slot.gpus[0] if slot is not None else None

    def costs(self) -> dict[str, float]:
        """What a trial on each live worker holds, for fair shares: 1/n of its GPU when n
        workers share it (a campaign's auto studies share them with its other studies)."""
        return {slot.name: 1 / len(live) for live in self._live.values() for slot in live}

    # ----- what happened ----------------------------------------------------------------

    def ready(self, name: str, now: float) -> None:
        """The slot's worker is ready. Once every worker added is, the GPU's throughput at
        its new count is measured from now (a worker replaced after a failure changes no
        count)."""
        gpu = self.gpu_of(name)
        if gpu is None or name not in self._starting[gpu]:
            return
        self._starting[gpu].discard(name)
        if not self._starting[gpu]:
            self._packers[gpu].ready(len(self._live[gpu]), now)

    def trial_ended(
        self, name: str, started: float, now: float, peak_mib: int | None, failed: bool
    ) -> None:
        gpu = self.gpu_of(name)
        if gpu is None:
            return
        packer = self._packers[gpu]
        # A failed trial's worker is restarted: that time is lost to the GPU's throughput.
        failed_at = self._failed_at.pop(name, None)
        restart = max(0.0, started - failed_at) if failed_at is not None else 0.0
        if failed:
            self._failed_at[name] = now
        packer.trial_ended(started, now, failed, restart)
        if peak_mib:
            packer.observe_trial_memory(peak_mib)
        if name == self._first[gpu].name:
            return  # the first worker is never retired: its failures are the objective's
        quick = failed and packer.quick_failure(now - started)
        self._failed_in_a_row[name] = self._failed_in_a_row.get(name, 0) + 1 if quick else 0
        if self._failed_in_a_row[name] >= QUICK_FAILURES:
            self._failed_in_a_row[name] = 0
            packer.failing_worker(name)

    def out_of_memory(self, name: str, sharing: int) -> bool:
        """A trial on ``name`` ran out of memory beside ``sharing - 1`` others: True (its
        parameters run again) when it shared the GPU; the GPU's limit drops, and the next
        tick retires the workers above it."""
        gpu = self.gpu_of(name)
        return gpu is not None and self._packers[gpu].out_of_memory(sharing)

    def leaving(self, name: str) -> bool:
        """Whether the slot was retired: its worker takes no new trial and is not replaced."""
        return name in self._leaving

    def gone(self, name: str) -> None:
        """The retired slot's worker has exited: the slot may be used again."""
        self._leaving.discard(name)

    # ----- what to do -------------------------------------------------------------------

    def tick(
        self, samples: dict[int, GpuSample], pids: dict[str, int], busy: set[str], now: float
    ) -> list[Change]:
        """Read every GPU, decide, and say which workers to start or retire now."""
        changes: list[Change] = []
        for gpu, packer in self._packers.items():
            reading = self._reading(gpu, samples.get(gpu), pids, busy)
            sample = samples.get(gpu)
            if sample is not None and sample.problem:  # check its health before its trials
                decision = packer.unhealthy(sample.problem)
            else:
                restarting = tuple(self._failed_at.get(s.name, now) for s in self._live[gpu])
                decision = packer.decide(reading, now, restarting)
            if decision is None:
                continue
            self._say(gpu, decision)
            if decision.target > len(self._live[gpu]):
                changes.append(Change(self._grow(gpu), start=True))
            elif decision.target < len(self._live[gpu]):
                changes += self._shrink_to(gpu, decision.target, busy, now)
        return changes

    def _reading(
        self, gpu: int, sample: GpuSample | None, pids: dict[str, int], busy: set[str]
    ) -> GpuReading | None:
        if sample is None:
            return None
        ours = None
        held = sample.process_mib
        mine = [pids[s.name] for s in self._live[gpu] if s.name in pids]
        if held is not None and (not held or any(pid in held for pid in mine)):
            ours = sum(held.get(pid, 0) for pid in mine)
            for slot in self._live[gpu]:
                if slot.name in busy and slot.name in pids:
                    self._packers[gpu].observe_trial_memory(held.get(pids[slot.name], 0))
        # Otherwise the driver's process ids are not ours (a container's own pid namespace):
        # per-process figures cannot be used, and the packer counts all memory as ours.
        return GpuReading(
            sample.memory_total_mib, sample.memory_used_mib, ours, sample.utilization_pct
        )

    def _grow(self, gpu: int) -> Slot:
        used = {s.name for s in self._live[gpu]} | self._leaving
        name = f"{self._prefix}gpu{gpu}"
        k = next(k for k in range(1, len(used) + 2) if f"{name}#{k}" not in used)
        slot = replace(self._first[gpu], name=f"{name}#{k}")
        cores = self._own_cores.get(slot.name) or self._lend(slot.threads)
        if cores:
            self._own_cores[slot.name] = cores
            slot = replace(slot, cores=cores)
        self._live[gpu].append(slot)
        self._by_name[slot.name] = slot
        self._starting[gpu].add(slot.name)
        self._packers[gpu].pending = True
        return slot

    def _lend(self, count: int) -> tuple[int, ...]:
        """``count`` spare cores of their own for a new slot; () when too few are left (it
        shares the first slot's cores)."""
        if len(self._spare) < count:
            return ()
        lent, self._spare = self._spare[:count], self._spare[count:]
        return tuple(lent)

    def _shrink_to(self, gpu: int, target: int, busy: set[str], now: float) -> list[Change]:
        changes = []
        while len(self._live[gpu]) > max(1, target):
            slot = self._live[gpu].pop()
            self._starting[gpu].discard(slot.name)
            self._leaving.add(slot.name)
            if slot.name not in busy:  # a busy one leaves when its trial ends
                changes.append(Change(slot, start=False))
        if not self._starting[gpu]:  # throughput is measured afresh at the new count
            self._packers[gpu].ready(len(self._live[gpu]), now)
        return changes

    def _say(self, gpu: int, decision: Decision) -> None:
        n = len(self._live[gpu])
        if decision.target == n:
            self.messages.append(f"{self._prefix}gpu{gpu} {decision.reason}")
        else:
            workers = f"{decision.target} worker{'s' * (decision.target != 1)}"
            self.messages.append(f"{self._prefix}gpu{gpu}: {n} -> {workers}, {decision.reason}")
