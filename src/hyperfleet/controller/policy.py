"""Which study of a campaign gets a free slot: the fair-share policy.

A campaign runs many studies on one pool of slots. Whenever slots are free the controller calls
:func:`pick` in a loop (pick, launch, ``book.start``, drop the slot from the free list) until it
returns ``None``. The rules, in the order they are applied:

1. **Work and stage.** Only studies that can start another trial (``has_work``) are eligible; a
   study that reaches its budget stops being eligible at once, so its share goes to the others.
   In sequential mode only the studies of the lowest ``stage`` that still has work are eligible:
   a later stage starts only once every earlier study has nothing left to start.
2. **Slot sets.** A study may only use the slots in its ``slots`` set (this is how CPU-shape
   studies are kept off GPU slots and the other way round). A study that can use none of the free
   slots is passed over, so the slot goes to someone who can use it.
3. **Priority.** Among the studies that can use a free slot, only those of the highest priority
   compete. A lower-priority study therefore gets exactly the slots no higher-priority study can
   use now, and everything once the higher ones run out of work: no slot is left idle while an
   eligible study could use it.
4. **Fair share.** Among those, the study furthest below its fair share wins: the smallest
   share it would hold after taking the slot, (running cost + slot cost) / weight. Ties go to the
   smallest cumulative usage (cost x seconds, finished and running trials) divided by weight,
   then to the earliest study in file order.

Why shares are measured on the *current allocation* rather than on cumulative usage alone: at
start, and whenever many slots free up together, every study has the same history, so a
usage-only rule would hand every free slot to the same study. Comparing what each study holds
now makes the allocation follow the weights at every moment (weights 2:1 on 6 slots give 4:2,
even while all 6 are being filled).

Why the share *after* taking the slot rather than the share held now: when the slots cannot be
split exactly by weight (weights 2:1 on 5 slots), the last slot is a close call. Compared on
what they would hold, both studies tie (4/2 against 2/1), so cumulative usage decides and the
odd slot alternates between them over time. Compared on what they hold now (3/2 against 1/1),
the same study would win it every time and the other would drift away from its share for good.
It also counts the size of the slot on offer: a study is not handed a two-GPU slot ahead of a
study that would only take half a GPU and stay further below its share.

**Waiting for a bigger slot.** Slots of different shapes overlap: a two-GPU slot cannot start
while half-GPU trials hold either GPU. Left alone, such a study could wait for ever, since every
half that frees up is taken again at once. So when an eligible study can use none of the free
slots but waits for one of ``blocked_slots`` (idle, but its resources are partly held), the
studies of *lower* priority may no longer start on anything that overlaps it; its resources
drain and it starts. Studies of the same priority are not held back (no slot idles for a study
that is not ahead of them): give the big study a higher priority to have it wait this way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from hyperfleet.errors import ConfigError


@dataclass(frozen=True)
class StudyDemand:
    """What one study of a campaign asks for, as seen at the moment of a decision."""

    name: str
    slots: frozenset[str]  # the slots it may use
    has_work: bool = True  # budget and time left to start another trial
    weight: float = 1.0
    priority: int = 0  # bigger number = higher priority
    stage: int = 0  # used only in sequential mode
    # A slot loads its objective for its next trial: that trial is still to start, so its
    # stage is not over (sequential mode) even when the study has no other trial to start.
    loading: bool = False

    def __post_init__(self) -> None:
        # A zero or negative weight would make the share undefined (or reward running more).
        if not self.weight > 0:
            raise ConfigError(
                f"study {self.name!r}: weight must be a positive number, got {self.weight!r}; "
                "set `weight` to a value above 0 (1 is the default share)."
            )


@dataclass(frozen=True)
class _Lease:
    study: str
    cost: float
    started_at: float


@dataclass
class _Held:
    """A study's running trials, summed: pick asks for these for every study at every launch,
    and at hundreds of slots adding up the leases each time cost more than the launch."""

    count: int = 0
    cost: float = 0.0
    cost_since: float = 0.0  # the sum of cost x start time: usage = cost x now - this

    def add(self, cost: float, started_at: float, sign: int) -> None:
        self.count += sign
        self.cost += sign * cost
        self.cost_since += sign * cost * started_at
        if not self.count:
            self.cost = self.cost_since = 0.0  # no rounding residue once nothing runs


class ShareBook:
    """What each study holds now and has used so far.

    The clock is injected so that usage (cost x seconds) can be tested with a fake one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, _Lease] = {}  # by slot
        self._held: dict[str, _Held] = {}  # by study
        self._finished_usage: dict[str, float] = {}  # by study

    def start(self, study: str, slot: str, cost: float) -> None:
        """A trial of ``study`` begins on ``slot``, which costs ``cost``."""
        if slot in self._leases:
            held_by = self._leases[slot].study
            raise ValueError(f"slot {slot!r} is already held by study {held_by!r}")
        lease = _Lease(study, cost, self._clock())
        self._leases[slot] = lease
        self._held.setdefault(study, _Held()).add(cost, lease.started_at, +1)

    def stop(self, slot: str) -> None:
        """The trial on ``slot`` ended; its cost-seconds move to the study's finished usage."""
        lease = self._leases.pop(slot, None)
        if lease is None:
            raise ValueError(f"slot {slot!r} holds no trial")
        self._held[lease.study].add(lease.cost, lease.started_at, -1)
        spent = lease.cost * (self._clock() - lease.started_at)
        self._finished_usage[lease.study] = self._finished_usage.get(lease.study, 0.0) + spent

    def running_cost(self, study: str) -> float:
        held = self._held.get(study)
        return held.cost if held is not None else 0.0

    def usage(self, study: str) -> float:
        """Cost-seconds used: finished trials plus the running ones up to now."""
        held = self._held.get(study)
        running = held.cost * self._clock() - held.cost_since if held is not None else 0.0
        return self._finished_usage.get(study, 0.0) + running

    def running(self, study: str) -> int:
        held = self._held.get(study)
        return held.count if held is not None else 0


def pick(
    demands: Sequence[StudyDemand],
    free_slots: Sequence[str],
    book: ShareBook,
    slot_cost: Mapping[str, float],
    sequential: bool = False,
    blocked_slots: Sequence[str] = (),
    overlaps: Callable[[str, str], bool] = lambda a, b: False,
    loaded: Mapping[str, Collection[str]] | None = None,
) -> tuple[str, str] | None:
    """The (study, slot) to launch next, or None when no eligible study can use any free slot.

    `demands` are in file order; `free_slots` in the caller's order of preference: the chosen study
    gets the first free slot in that order that it may use. `slot_cost` gives the cost of every
    slot (e.g. 0.5 for half a GPU, 2 for two GPUs, the number of cores for a CPU slot).
    `blocked_slots` are idle slots that cannot start now because running trials hold part of
    what they need, best first; `overlaps` says whether two slots share a resource. `loaded`
    names the studies whose objective each slot's worker holds: the chosen study gets one of
    those slots first, since any other must load it before the trial starts.
    """
    unpriced = [slot for slot in free_slots if slot not in slot_cost]
    if unpriced:
        raise ValueError(f"free slots without a cost: {unpriced}")
    eligible = _eligible(demands, sequential)
    loaded = loaded or {}
    candidates = _candidates(eligible, free_slots, loaded)
    waiting = _waiting(eligible, candidates, blocked_slots)
    if waiting is not None:
        priority, reserved = waiting
        candidates = _candidates(eligible, free_slots, loaded, reserved, priority, overlaps)
    if not candidates:
        return None
    top_priority = max(demand.priority for _, demand, _ in candidates)
    contenders = [entry for entry in candidates if entry[1].priority == top_priority]

    def furthest_below_share(entry: tuple[int, StudyDemand, str]) -> tuple[float, float, int]:
        file_index, demand, slot = entry
        return (
            (book.running_cost(demand.name) + slot_cost[slot]) / demand.weight,
            book.usage(demand.name) / demand.weight,
            file_index,
        )

    _, chosen, slot = min(contenders, key=furthest_below_share)
    return chosen.name, slot


def _eligible(demands: Sequence[StudyDemand], sequential: bool) -> list[tuple[int, StudyDemand]]:
    """Studies that may start a trial now, with their file-order index."""
    with_work = [(index, demand) for index, demand in enumerate(demands) if demand.has_work]
    if not sequential or not with_work:
        return with_work
    # A later stage waits for every study of an earlier one, even one whose slots are all busy.
    current_stage = min(d.stage for d in demands if d.has_work or d.loading)
    return [(index, demand) for index, demand in with_work if demand.stage == current_stage]


def _candidates(
    eligible: Sequence[tuple[int, StudyDemand]],
    free_slots: Sequence[str],
    loaded: Mapping[str, Collection[str]],
    reserved: Sequence[str] = (),
    reserved_for: int = 0,
    overlaps: Callable[[str, str], bool] = lambda a, b: False,
) -> list[tuple[int, StudyDemand, str]]:
    """Each eligible study that may use a free slot, with the first such slot in caller order,
    one whose worker holds the study's objective first.

    A study of priority below ``reserved_for`` may not use a slot that overlaps a reserved one."""
    candidates = []
    for index, demand in eligible:
        usable = [s for s in free_slots if s in demand.slots]
        if demand.priority < reserved_for:
            usable = [s for s in usable if not any(overlaps(s, r) for r in reserved)]
        usable.sort(key=lambda s: demand.name not in loaded.get(s, ()))  # stable: caller order
        if usable:
            candidates.append((index, demand, usable[0]))
    return candidates


def _waiting(
    eligible: Sequence[tuple[int, StudyDemand]],
    candidates: Sequence[tuple[int, StudyDemand, str]],
    blocked_slots: Sequence[str],
) -> tuple[int, list[str]] | None:
    """The highest priority among studies that can use no free slot but wait for a blocked one,
    and the blocked slot each of them waits for (the first of its own in caller order)."""
    served = {demand.name for _, demand, _ in candidates}
    waits = [
        (demand.priority, slot)
        for _, demand in eligible
        if demand.name not in served
        for slot in [next((s for s in blocked_slots if s in demand.slots), None)]
        if slot is not None
    ]
    if not waits:
        return None
    top = max(priority for priority, _ in waits)
    return top, [slot for priority, slot in waits if priority == top]
