"""GPU and CPU inventory, slots and GPU sampling."""

from hyperfleet.resources.inventory import Gpu, Inventory, detect_inventory
from hyperfleet.resources.monitor import GpuMonitor, GpuSample
from hyperfleet.resources.slots import PoolOptions, Slot, current_slot, plan_slots

__all__ = [
    "Gpu",
    "GpuMonitor",
    "GpuSample",
    "Inventory",
    "PoolOptions",
    "Slot",
    "current_slot",
    "detect_inventory",
    "plan_slots",
]
