"""The slots of a node that joins: planned by the controller from the node's inventory, with
the same code and options as a single machine's, then named after the node."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hyperfleet.resources.inventory import Inventory
from hyperfleet.resources.shapes import PoolSpec, Shape, plan_pool
from hyperfleet.resources.slots import PoolOptions, Slot, plan_slots


@dataclass(frozen=True)
class NodePool:
    slots: tuple[Slot, ...]
    needs: Mapping[str, Mapping[str, float]]  # as Pool.needs
    study_slots: Mapping[str, tuple[str, ...]]  # study name -> the slots it may use
    notes: tuple[str, ...] = ()


NodePlanner = Callable[[Inventory], NodePool]


def single_search_planner(study: str, options: PoolOptions) -> NodePlanner:
    """Every slot of the node for the one study, cut as ``plan_slots`` cuts one machine."""

    def plan(inventory: Inventory) -> NodePool:
        slots = tuple(plan_slots(inventory, options))
        names = tuple(slot.name for slot in slots)
        return NodePool(slots, {name: {} for name in names}, {study: names})

    return plan


def campaign_planner(pool: PoolSpec, shapes: Sequence[tuple[str, Shape]]) -> NodePlanner:
    """The node cut for every study's shape, as ``plan_pool`` cuts one machine."""

    def plan(inventory: Inventory) -> NodePool:
        planned = plan_pool(inventory, pool, [shape for _, shape in shapes])
        eligible = {study: tuple(planned.eligible.get(shape, ())) for study, shape in shapes}
        return NodePool(planned.slots, planned.needs, eligible, planned.notes)

    return plan


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
    )
