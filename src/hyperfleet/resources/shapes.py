"""Slot shapes, the campaign pool planner and the resource ledger.

A campaign runs several studies on one pool. Each study says what one of its trials needs (a
:class:`Shape`: a share of one GPU, whole GPUs, or CPU cores). :func:`plan_pool` makes, for each
distinct shape, every slot of that shape that tiles the machine. Slots of different shapes
overlap (a half-GPU slot and a 2-GPU slot both use GPU 0), so each slot lists the resources it
holds while it runs (``Pool.needs``) and a :class:`Ledger` lets a slot start only while all of
them have capacity left.

Slot names. A pool with at most one GPU shape and at most one CPU shape uses the names of
``plan_slots``: ``gpu0#0``, ``gpu0#1`` (shares of GPU 0), ``gpu0+1#0`` (GPUs 0 and 1),
``cpu#0``. Otherwise each name says its shape so that names stay unique:

* ``gpu0:2#1``: the second of the 1/2 shares of GPU 0 (``gpu0:4#3`` for quarters);
* ``gpu0``: all of GPU 0; ``gpu0+1``: GPUs 0 and 1 together;
* ``cpu4#0``: the first slot of 4 cores;
* when two GPU shapes differ only in their cores, the core count follows the GPUs:
  ``gpu0:2-2c#1``, ``gpu0-4c``;
* ``gpu0#0``: GPU 0's first auto-packed worker (``gpus = "auto"``), whose GPU auto packing
  grows with ``gpu0#1``, ``gpu0#2``... as for a single search.

Auto packing in a campaign. Every study whose slot says ``gpus = "auto"`` (or ``gpu_memory``)
shares one set of auto-packed slots, one per GPU to begin with, whatever its ``cpus`` (the most
any of them asks for). The controller grows and shrinks each GPU's workers as for a single
search (:mod:`hyperfleet.controller.autopack`), whichever auto study's trials they run: the
fair-share policy picks the study of each trial as for any slot. In the ledger the auto-packed
workers of one GPU hold the whole GPU together (see ``Ledger.add``): while one of them runs a
trial, no fixed share, whole-GPU or multi-GPU trial starts on that GPU, and the other way round.
A GPU is thus at any moment either packed by readings or cut in fixed shares, never both, so
neither kind of trial finds its memory taken by the other.

Names hold no ``/`` because worker logs are files named after their slot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from hyperfleet.errors import ConfigError, ResourceError
from hyperfleet.resources.inventory import Gpu, Inventory, select_gpus
from hyperfleet.resources.slots import (
    Slot,
    check_shared,
    check_worker_count,
    gpu_slot,
    split_gpus,
    take_cores,
)

# 0.333 is accepted as 1/3; 0.3 is not a share of the form 1/k.
_SHARE_TOLERANCE = 2e-3
# Claims of 1/3 shares do not add up exactly; this much over capacity still fits.
_CAPACITY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Shape:
    """What one trial of a study needs."""

    # 0: CPU only; 1/k (0.5, 0.25, 1/3...): a share of one GPU; n >= 1 whole: n GPUs.
    gpus: float = 0.0
    # Cores (and thread limit) per trial; None: 1 for GPU shapes, the pool's threads_per_slot
    # (default 1) for CPU shapes.
    cpus: int | None = None
    # Without any usable GPU, use CPU slots of this many cores instead.
    fallback_cpus: int | None = None
    # gpus = "auto": one GPU per trial, as many trials per GPU as auto packing finds room for
    # (then gpus is 1.0).
    auto: bool = False
    # What one trial takes on its GPU, declared: auto packing packs by it (implies auto).
    gpu_memory_mib: int | None = None

    @property
    def kind(self) -> str:
        """Either "gpu" or "cpu"."""
        return "gpu" if self.gpus > 0 else "cpu"

    @property
    def per_gpu(self) -> int:
        """How many trials of this shape share one GPU: k for a 1/k share, 1 otherwise."""
        if 0 < self.gpus < 1:
            return round(1 / self.gpus)
        return 1

    def describe(self) -> str:
        """For people: "1/2 GPU", "1 GPU", "2 GPUs, 4 cores", "4 cores"."""
        if self == ANY:
            return "any slot"
        if self.kind == "cpu":
            return "CPU" if self.cpus is None else _cores(self.cpus)
        if self.auto:
            return self._describe_auto()
        text = f"1/{self.per_gpu} GPU" if self.per_gpu > 1 else _plural(_gpu_count(self), "GPU")
        if self.cpus is not None:
            text += f", {_cores(self.cpus)}"
        if self.fallback_cpus is not None:
            text += f" (or {_cores(self.fallback_cpus)} without a GPU)"
        return text

    def _describe_auto(self) -> str:
        text = "auto-packed GPU"
        if self.gpu_memory_mib is not None:
            text += f" ({self.gpu_memory_mib} MiB per trial)"
        if self.cpus is not None:
            text += f", {_cores(self.cpus)}"
        if self.fallback_cpus is not None:
            text += f" (or {_cores(self.fallback_cpus)} without a GPU)"
        return text

    def check(self, where: str) -> None:
        """Raise ConfigError naming ``where`` when no machine could give a trial this shape."""
        if self.auto:
            self._check_auto(where)
        else:
            self._check_gpus(where)
        _check_count(self.cpus, f"{where}: cpus", "or leave it out for the default")
        _check_count(self.fallback_cpus, f"{where}: fallback_cpus", "or leave it out")
        if self.fallback_cpus is not None and self.kind == "cpu":
            raise ConfigError(
                f"{where}: fallback_cpus = {self.fallback_cpus} is set on a CPU trial; it only "
                "says how many cores a GPU trial uses when no GPU is available. Remove it, or "
                "use cpus to set the cores of a CPU trial."
            )

    def _check_auto(self, where: str) -> None:
        if self.gpus != 1:
            raise RuntimeError(f"{where}: an auto-packed shape has gpus = 1, not {self.gpus!r}")
        memory = self.gpu_memory_mib
        if memory is not None and (
            isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0
        ):
            raise ConfigError(
                f"{where}: gpu_memory = {memory!r} is not a positive amount of memory; write "
                'what one trial takes on its GPU, such as gpu_memory = "10GiB".'
            )

    def _check_gpus(self, where: str) -> None:
        value = self.gpus
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f'{where}: gpus = {value!r} is not a number nor "auto"; use "auto" to fill '
                "each GPU with as many trials as it has room for, 0.5, 0.25 or 1/k for a share "
                "of one GPU, or a whole number of GPUs."
            )
        if not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"{where}: gpus = {value} is not allowed; use 0 (or leave it out) for a CPU "
                "trial, 0.5, 0.25 or 1/k for a share of one GPU, or a whole number of GPUs."
            )
        if 0 < value < 1 and abs(value * round(1 / value) - 1) > _SHARE_TOLERANCE:
            nearest = round(1 / value)
            raise ConfigError(
                f"{where}: gpus = {value} is not a share 1/k of one GPU (the nearest is "
                f"1/{nearest} = {1 / nearest:.3g}); use 0.5, 0.25 or 1/k; or a whole number "
                "of GPUs."
            )
        if value > 1 and value != int(value):
            raise ConfigError(
                f"{where}: gpus = {value} is above 1 but not whole; a trial uses a share of "
                "one GPU (0.5, 0.25 or 1/k) or a whole number of GPUs (1, 2, ...), so use "
                f"{math.floor(value)} or {math.ceil(value)}."
            )


# "Every slot": the shape of a one-study run, whose study may use any slot. Never valid in a file.
ANY = Shape(gpus=-1.0)


@dataclass(frozen=True)
class PoolSpec:
    """The [pool] table of a campaign file."""

    gpus: list[str] | None = None  # GPUs to use (index or UUID); None: every visible GPU; []: none
    # The share of a study whose slot is just "gpu": 1/trials_per_gpu, or None for auto packing
    # (the default, as for a single search). The campaign parser turns such a slot into
    # Shape(gpus=1/trials_per_gpu) or an auto shape; plan_pool itself only checks the value.
    trials_per_gpu: int | None = None
    cpu_slots: int | None = None  # if set, the CPU side is cpu_slots * threads_per_slot cores
    threads_per_slot: int | None = None  # default cores of a CPU trial (1 when None)

    def check(self, where: str) -> None:
        """Raise ConfigError naming ``where`` ("campaign.toml: [pool]") for impossible values."""
        if self.trials_per_gpu is not None:
            _check_count(self.trials_per_gpu, f"{where}: trials_per_gpu", 'or "auto"')
        _check_count(self.threads_per_slot, f"{where}: threads_per_slot", "or leave it out")
        if self.cpu_slots is not None and (
            isinstance(self.cpu_slots, bool)
            or not isinstance(self.cpu_slots, int)
            or self.cpu_slots < 0
        ):
            raise ConfigError(
                f"{where}: cpu_slots = {self.cpu_slots!r} is not a whole number of 0 or more; "
                "use 0 for no CPU slots, a count, or leave it out to use every core left."
            )


@dataclass(frozen=True)
class Pool:
    """The slots of a campaign, what each one holds while it runs, and who may use which."""

    slots: tuple[Slot, ...]
    # Slot name -> {resource name: amount}; {} never conflicts.
    needs: Mapping[str, Mapping[str, float]]
    # Each requested shape -> names of the slots it may use (possibly none; see notes).
    eligible: Mapping[Shape, tuple[str, ...]]
    notes: tuple[str, ...] = ()  # one line each, for the user (fallbacks used, ...)
    # The first slot of each GPU that auto packing may grow (when the run packs automatically).
    packed: tuple[str, ...] = ()


def single_pool(slots: Sequence[Slot]) -> Pool:
    """The pool of a one-study run from ``plan_slots``: its slots never overlap."""
    names = tuple(slot.name for slot in slots)
    return Pool(
        slots=tuple(slots),
        needs={name: {} for name in names},
        eligible={ANY: names},
        packed=tuple(slot.name for slot in slots if slot.packable),
    )


class Ledger:
    """Which resources the running trials hold, so that overlapping slots never overcommit.

    Every resource has a capacity of 1.0 (one GPU, one core).
    """

    def __init__(self, needs: Mapping[str, Mapping[str, float]]) -> None:
        self._needs = {slot: dict(amounts) for slot, amounts in needs.items()}
        self._used: dict[str, float] = {}
        self._claimed: set[str] = set()
        # Slots that hold their resources together (auto packing's workers of one GPU): slot ->
        # the group's first slot, and group -> how many of its slots run now.
        self._group: dict[str, str] = {}
        self._running: dict[str, int] = {}

    def add(
        self,
        slot: str,
        needs: Mapping[str, float] | None = None,
        together_with: str | None = None,
    ) -> None:
        """A slot made while the run goes on (a node joins, auto packing adds a worker).

        ``together_with``: the slot needs what that slot needs, and holds it together with it
        (and with the others added so): the first of them to run claims it, the last to end
        gives it back, and any number of them may run at once. Auto packing, not the ledger,
        decides how many workers one GPU runs."""
        if together_with is None:
            self._needs.setdefault(slot, dict(needs or {}))
            return
        self._needs.setdefault(slot, dict(self._needs_of(together_with)))
        self._group[slot] = self._group.get(together_with, together_with)

    def remove(self, slot: str) -> None:
        """A slot that left the pool (its node was lost); it holds nothing by then."""
        if slot in self._claimed:
            raise RuntimeError(f"slot {slot} was removed while it runs: {self._describe()}")
        self._needs.pop(slot, None)

    def fits(self, slot: str) -> bool:
        """Whether the slot is idle and every resource it needs has room for it."""
        if slot in self._claimed:
            return False
        if self._running.get(self._group_of(slot)):
            return True  # its group holds the resources already
        return all(
            self._used.get(name, 0.0) + amount <= 1.0 + _CAPACITY_TOLERANCE
            for name, amount in self._needs_of(slot).items()
        )

    def claim(self, slot: str) -> None:
        """Mark the slot running. Claiming a slot that does not fit is a bug of the caller."""
        if not self.fits(slot):
            raise RuntimeError(f"slot {slot} was claimed but does not fit: {self._describe()}")
        self._claimed.add(slot)
        group = self._group_of(slot)
        self._running[group] = self._running.get(group, 0) + 1
        if self._running[group] > 1:
            return  # held already
        for name, amount in self._needs_of(slot).items():
            self._used[name] = self._used.get(name, 0.0) + amount

    def release(self, slot: str) -> None:
        """Give back what the slot held."""
        if slot not in self._claimed:
            raise RuntimeError(f"slot {slot} was released but is not claimed: {self._describe()}")
        self._claimed.remove(slot)
        group = self._group_of(slot)
        self._running[group] -= 1
        if self._running[group]:
            return  # others of its group still hold it
        del self._running[group]
        for name, amount in self._needs_of(slot).items():
            left = self._used[name] - amount
            # Forget rounding residue so that a free resource reads exactly 0.
            if left <= _CAPACITY_TOLERANCE:
                del self._used[name]
            else:
                self._used[name] = left

    def load(self, slot: str) -> float:
        """The highest used fraction among the slot's resources (0 when all are free).

        Preferring fitting slots with the highest load packs shares onto GPUs already busy and
        keeps whole GPUs free for the studies that need them.
        """
        return max((self._used.get(name, 0.0) for name in self._needs_of(slot)), default=0.0)

    def overlaps(self, slot: str, other: str) -> bool:
        """Whether the two slots need any resource in common (they cannot both run in full)."""
        return not self._needs_of(slot).keys().isdisjoint(self._needs_of(other))

    def _group_of(self, slot: str) -> str:
        return self._group.get(slot, slot)

    def _needs_of(self, slot: str) -> dict[str, float]:
        try:
            return self._needs[slot]
        except KeyError:
            raise RuntimeError(f"slot {slot} is not in this ledger") from None

    def _describe(self) -> str:
        used = ", ".join(f"{name}={amount:.3g}" for name, amount in sorted(self._used.items()))
        return f"running {sorted(self._claimed)}; used {used or 'nothing'}"


# -- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GpuKey:
    """A GPU shape with its defaults resolved: equal keys share their slots."""

    per_gpu: int  # k trials share each GPU (1 for whole GPUs)
    count: int  # GPUs per trial
    cpus: int
    auto: bool = False  # gpus = "auto": one slot per GPU, which auto packing grows

    @property
    def share(self) -> float:
        return 1 / self.per_gpu


@dataclass(frozen=True)
class _CpuKey:
    cpus: int


_Key = _GpuKey | _CpuKey
_K = TypeVar("_K", _GpuKey, _CpuKey)


@dataclass
class _Plan:
    """What the planner has decided so far."""

    slots: dict[_Key, list[Slot]] = field(default_factory=dict)
    needs: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: _Key, slot: Slot, needs: dict[str, float]) -> None:
        self.slots.setdefault(key, []).append(slot)
        self.needs[slot.name] = needs


def plan_pool(inventory: Inventory, pool: PoolSpec, shapes: Sequence[Shape]) -> Pool:
    """Make, for each distinct shape, every slot of that shape that tiles the machine.

    GPU slots come first (each shape spread across the GPUs), then CPU slots on the cores the
    GPU slots leave. A shape that cannot get any slot here maps to an empty tuple with a note.
    """
    pool.check("[pool]")
    for shape in shapes:
        if shape != ANY:
            shape.check(f"plan_pool: {shape!r}")
    gpus = select_gpus(inventory, pool.gpus)
    # Every auto-packed study uses the same slots (see the module's documentation).
    auto_cpus = max((shape.cpus or 1 for shape in shapes if shape.auto), default=1)
    keys = {shape: _resolve(shape, pool, bool(gpus), auto_cpus) for shape in shapes if shape != ANY}
    gpu_keys = _distinct(key for key in keys.values() if isinstance(key, _GpuKey))
    cpu_keys = _distinct(key for key in keys.values() if isinstance(key, _CpuKey))
    plain_names = len(gpu_keys) <= 1 and len(cpu_keys) <= 1
    cores = list(inventory.cores) or [0]

    for gpu_key in gpu_keys:
        check_shared(
            gpus,
            gpu_key.per_gpu,
            f"a study's slot of {gpu_key.share:g} GPU",
            'give it whole GPUs (slot = "gpu" or { gpus = "auto" })',
        )
    plan = _Plan(notes=_no_gpu_notes(gpus, shapes))
    used, cores = _plan_gpu_side(plan, gpus, gpu_keys, cores, plain_names)
    _plan_cpu_side(plan, pool, cpu_keys, cores, used, plain_names)

    ordered: list[_Key] = [*gpu_keys, *cpu_keys]
    slots = tuple(slot for key in ordered for slot in plan.slots.get(key, []))
    check_worker_count(
        inventory,
        len(slots),
        f"the pool's {len(ordered)} slot shape{'s' * (len(ordered) != 1)}",
        "lower trials_per_gpu or cpu_slots in [pool], or give the studies fewer distinct slot "
        "shapes (each shape gets its own slots, and each slot its own worker)",
    )
    eligible: dict[Shape, tuple[str, ...]] = {}
    for shape in shapes:
        if shape == ANY:
            eligible[shape] = tuple(slot.name for slot in slots)
        else:
            key = keys[shape]
            chosen = plan.slots.get(key, []) if key is not None else []
            eligible[shape] = tuple(slot.name for slot in chosen)
    packed = [slot.name for key in gpu_keys if key.auto for slot in plan.slots.get(key, [])]
    return Pool(
        slots=slots,
        needs=plan.needs,
        eligible=eligible,
        notes=tuple(plan.notes),
        packed=tuple(packed),
    )


def _resolve(shape: Shape, pool: PoolSpec, has_gpus: bool, auto_cpus: int) -> _Key | None:
    """The key whose slots the shape uses here; None when it has no slot on this machine."""
    if shape.kind == "cpu":
        return _CpuKey(shape.cpus or pool.threads_per_slot or 1)
    if has_gpus and shape.auto:
        return _GpuKey(1, 1, auto_cpus, auto=True)
    if has_gpus:
        return _GpuKey(shape.per_gpu, _gpu_count(shape), shape.cpus or 1)
    if shape.fallback_cpus is not None:
        return _CpuKey(shape.fallback_cpus)
    return None


def _gpu_count(shape: Shape) -> int:
    """How many GPUs one trial uses (0 for a CPU shape, 1 for a share)."""
    return 0 if shape.gpus <= 0 else max(1, round(shape.gpus))


def _distinct(keys: Iterable[_K]) -> list[_K]:
    """Keys without repeats, in the order first seen (which is the order of the slots)."""
    return list(dict.fromkeys(keys))


def _no_gpu_notes(gpus: tuple[Gpu, ...], shapes: Sequence[Shape]) -> list[str]:
    gpu_shapes = [shape for shape in shapes if shape.kind == "gpu"]
    if gpus or not gpu_shapes:
        return []
    notes = []
    fallbacks = sorted({s.fallback_cpus for s in gpu_shapes if s.fallback_cpus is not None})
    if fallbacks:
        sizes = "; ".join(_cores(c) for c in fallbacks)
        notes.append(f"no GPU: studies that asked for a GPU run on CPU slots ({sizes})")
    stranded = list(dict.fromkeys(s.describe() for s in gpu_shapes if s.fallback_cpus is None))
    if stranded:
        notes.append(
            f"no GPU: studies that asked for {', '.join(stranded)} have no slot; give them "
            "fallback_cpus to run on CPU slots, or add a GPU to the pool"
        )
    return notes


def _plan_gpu_side(
    plan: _Plan, gpus: tuple[Gpu, ...], keys: list[_GpuKey], cores: list[int], plain: bool
) -> tuple[int, list[int]]:
    """Add the GPU slots of every key; return how many core positions their blocks took, and
    the cores in position order (each GPU's block holding the cores near it)."""
    if not keys:
        return 0, cores
    groups = {key: _groups(gpus, key.count) for key in keys}
    starts, used = _core_blocks(gpus, keys, groups)
    cores = _near_first(gpus, starts, used, cores)
    if used > len(cores):
        plan.notes.append(
            f"GPU slots share cores: they would need {used} cores but {len(cores)} are available"
        )
    for key in keys:
        for index in range(key.per_gpu):
            for group in groups[key]:
                start = starts[group[0].index] + index * key.cpus
                slot_cores = take_cores(cores, start, key.cpus)
                slot = gpu_slot(group, index, slot_cores, len(slot_cores), key.share)
                slot = replace(slot, packed=key.auto)
                if not plain:
                    slot = replace(slot, name=_gpu_name(group, index, key, keys))
                plan.add(key, slot, {f"gpu{gpu.index}": key.share for gpu in group})
    return used, cores


def _near_first(
    gpus: tuple[Gpu, ...], starts: Mapping[int, int], used: int, cores: list[int]
) -> list[int]:
    """The cores reordered so that each GPU's block of positions holds, as far as there are,
    the cores NVML puts near that GPU; the others keep the machine's order after the blocks.
    Unchanged when nothing is known of nearness or the blocks already share cores."""
    if used > len(cores) or not any(gpu.near_cores for gpu in gpus):
        return cores
    remaining, order = list(cores), []
    ends = [*(starts[gpu.index] for gpu in gpus[1:]), used]
    for gpu, end in zip(gpus, ends, strict=True):
        size = end - starts[gpu.index]
        near = set(gpu.near_cores)
        pick = [core for core in remaining if core in near][:size]
        pick += [core for core in remaining if core not in pick][: size - len(pick)]
        order += pick
        remaining = [core for core in remaining if core not in pick]
    return order + remaining


def _groups(gpus: tuple[Gpu, ...], count: int) -> list[tuple[Gpu, ...]]:
    if count > len(gpus):
        raise ResourceError(
            f"a study needs {count} GPUs per trial but only {len(gpus)} GPU(s) are available "
            f"to the pool; ask for {len(gpus)} or fewer GPUs in its slot, or add GPUs to the "
            "pool's gpus."
        )
    return split_gpus(gpus, count)


def _core_blocks(
    gpus: tuple[Gpu, ...], keys: list[_GpuKey], groups: Mapping[_GpuKey, list[tuple[Gpu, ...]]]
) -> tuple[dict[int, int], int]:
    """Each GPU's first core position, and the positions all blocks take.

    A GPU's block is as large as the hungriest shape on it needs (its slots there x their
    cores), so the slots of one shape on one GPU never share cores.
    """
    starts: dict[int, int] = {}
    position = 0
    for gpu in gpus:
        starts[gpu.index] = position
        position += max(_slots_on(gpu, key, groups[key]) * key.cpus for key in keys)
    return starts, position


def _slots_on(gpu: Gpu, key: _GpuKey, groups: list[tuple[Gpu, ...]]) -> int:
    # A GPU left out of every group (the odd one of 3 for pairs) hosts no slot of that shape.
    return key.per_gpu if any(gpu in group for group in groups) else 0


def _gpu_name(group: tuple[Gpu, ...], index: int, key: _GpuKey, keys: list[_GpuKey]) -> str:
    name = "gpu" + "+".join(str(gpu.index) for gpu in group)
    if key.auto:  # the names auto packing gives the workers it adds: gpu0#1, gpu0#2...
        return f"{name}#0"
    if key.per_gpu > 1:
        name += f":{key.per_gpu}"
    same_gpus = [
        k for k in keys if (k.per_gpu, k.count, k.auto) == (key.per_gpu, key.count, key.auto)
    ]
    if len(same_gpus) > 1:
        name += f"-{key.cpus}c"
    return f"{name}#{index}" if key.per_gpu > 1 else name


def _plan_cpu_side(
    plan: _Plan, pool: PoolSpec, keys: list[_CpuKey], cores: list[int], used: int, plain: bool
) -> None:
    if not keys:
        return
    if pool.cpu_slots == 0:
        plan.notes.append("[pool] cpu_slots = 0: studies that run on CPU get no slot")
        return
    free = _cpu_cores(pool, cores, used)
    if used >= len(cores) and used:
        plan.notes.append("CPU slots share cores with GPU slots (the GPU slots took every core)")
    for key in keys:
        if key.cpus > len(free):
            raise ResourceError(
                f"a study needs {_cores(key.cpus)} per CPU trial but the CPU slots have only "
                f"{_cores(len(free))} ({_where_cores_went(pool, cores, used)}); ask for "
                f"{len(free)} or fewer cores in its slot, or make room for more CPU cores."
            )
        for index in range(len(free) // key.cpus):
            slot_cores = tuple(free[index * key.cpus : (index + 1) * key.cpus])
            name = f"cpu#{index}" if plain else f"cpu{key.cpus}#{index}"
            slot = Slot(name=name, kind="cpu", cores=slot_cores, threads=key.cpus)
            plan.add(key, slot, {f"core{core}": 1.0 for core in slot_cores})


def _cpu_cores(pool: PoolSpec, cores: list[int], used: int) -> list[int]:
    # When the GPU slots took every core, CPU slots share them (as plan_slots does).
    free = cores[used:] if used < len(cores) else cores
    if pool.cpu_slots is None:
        return free
    wanted = pool.cpu_slots * (pool.threads_per_slot or 1)
    if wanted > len(free):
        raise ResourceError(
            f"[pool] cpu_slots = {pool.cpu_slots} of {_cores(pool.threads_per_slot or 1)} needs "
            f"{wanted} cores but only {len(free)} are left (the machine has {len(cores)}, the "
            f"GPU slots hold {min(used, len(cores))}); lower cpu_slots or threads_per_slot, or "
            "leave cpu_slots out to use the cores left."
        )
    return free[:wanted]


def _where_cores_went(pool: PoolSpec, cores: list[int], used: int) -> str:
    text = f"the machine has {len(cores)}, the GPU slots hold {min(used, len(cores))}"
    if pool.cpu_slots:
        asked = pool.cpu_slots * (pool.threads_per_slot or 1)
        text += f", [pool] cpu_slots x threads_per_slot = {asked}"
    return text


def _check_count(value: int | None, what: str, alternative: str) -> None:
    """A count of cores or trials must be a whole number of 1 or more."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = f"use 1 or more{', ' + alternative if alternative else ''}"
        raise ConfigError(f"{what} = {value!r} is not a whole number of 1 or more; {hint}.")


def _cores(count: int) -> str:
    return _plural(count, "core")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
