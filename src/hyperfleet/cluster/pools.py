"""The slots of a node that joins: planned by the controller from the node's inventory, with
the same code and options as a single machine's, then named after the node."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hyperfleet.resources.inventory import Inventory
from hyperfleet.resources.packing import PackingSettings
from hyperfleet.resources.shapes import Pool, PoolSpec, Shape, plan_pool
from hyperfleet.resources.slots import PoolOptions, Slot, auto_packing, packing_settings, plan_slots


@dataclass(frozen=True)
class NodePool:
    slots: tuple[Slot, ...]
    needs: Mapping[str, Mapping[str, float]]  # as Pool.needs
    study_slots: Mapping[str, tuple[str, ...]]  # study name -> the slots it may use
    notes: tuple[str, ...] = ()
    # How auto packing may grow the node's GPUs (``--trials-per-gpu auto``), from its inventory
    packing: PackingSettings | None = None


NodePlanner = Callable[[Inventory], NodePool]


def single_search_planner(study: str, options: PoolOptions) -> NodePlanner:
    """Every slot of the node for the one study, cut as ``plan_slots`` cuts one machine."""

    def plan(inventory: Inventory) -> NodePool:
        slots = plan_slots(inventory, options)
        names = tuple(slot.name for slot in slots)
        packing = auto_packing(inventory, options, slots)
        return NodePool(tuple(slots), {name: {} for name in names}, {study: names}, (), packing)

    return plan


def campaign_planner(pool: PoolSpec, shapes: Sequence[tuple[str, Shape]]) -> NodePlanner:
    """The node cut for every study's shape, as ``plan_pool`` cuts one machine."""

    def plan(inventory: Inventory) -> NodePool:
        planned = plan_pool(inventory, pool, [shape for _, shape in shapes])
        eligible = {study: tuple(planned.eligible.get(shape, ())) for study, shape in shapes}
        packing = shapes_packing([shape for _, shape in shapes], planned, inventory)
        return NodePool(planned.slots, planned.needs, eligible, planned.notes, packing)

    return plan


def shapes_packing(
    shapes: Sequence[Shape], pool: Pool, inventory: Inventory
) -> PackingSettings | None:
    """How auto packing grows the GPUs of the studies whose slot says ``gpus = "auto"``.

    Those studies share each GPU's workers, so a worker is added only when one more trial of
    any of them fits: packed by the largest ``gpu_memory`` they declare, and, when some declare
    none, by the most one trial was seen to hold too. None without such a study."""
    if not pool.packed:
        return None
    auto = [shape for shape in shapes if shape.auto]
    declared = [shape.gpu_memory_mib for shape in auto if shape.gpu_memory_mib is not None]
    by_name = {slot.name: slot for slot in pool.slots}
    return packing_settings(
        inventory,
        len(pool.slots),
        [by_name[name] for name in pool.packed],
        max(declared, default=None),
        undeclared_too=len(declared) < len(auto),
    )


def on_node(node: str, pool: NodePool) -> NodePool:
    """The same pool with every slot and resource named after the node: ``node3/gpu1#0``."""

    def named(name: str) -> str:
        return f"{node}/{name}"

    return NodePool(
        slots=tuple(dataclasses.replace(slot, name=named(slot.name)) for slot in pool.slots),
        needs={
            named(slot): {named(resource): amount for resource, amount in needs.items()}
            for slot, needs in pool.needs.items()
        },
        study_slots={
            study: tuple(named(name) for name in names) for study, names in pool.study_slots.items()
        },
        notes=pool.notes,
        packing=pool.packing,
    )
