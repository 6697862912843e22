"""Slot planning and GPU inventory, on fake machines (no worker processes here)."""

from __future__ import annotations

import json

import pytest

from hyperfleet.errors import ConfigError, ResourceError
from hyperfleet.resources.inventory import Gpu, Inventory, detect_inventory
from hyperfleet.resources.slots import SLOT_ENV, THREAD_ENV_VARS, PoolOptions, Slot, plan_slots


def machine(n_gpus: int, n_cores: int) -> Inventory:
    gpus = tuple(
        Gpu(index=i, uuid=f"GPU-fake-{i}", name="Fake GPU", kind="fake") for i in range(n_gpus)
    )
    return Inventory(gpus=gpus, cores=tuple(range(n_cores)))


def all_cores(slots: list[Slot]) -> list[int]:
    return [core for slot in slots for core in slot.cores]


def test_one_slot_per_gpu_then_cpu_slots_on_the_cores_left() -> None:
    slots = plan_slots(machine(4, 16), PoolOptions())

    gpu_slots = [s for s in slots if s.kind == "gpu"]
    cpu_slots = [s for s in slots if s.kind == "cpu"]
    assert [s.gpus for s in gpu_slots] == [(0,), (1,), (2,), (3,)]
    # GPU workers get more than one core (half the machine's at most), CPU slots one each.
    assert all(s.threads == len(s.cores) == 2 for s in gpu_slots)
    assert len(cpu_slots) == 8
    assert all(s.threads == len(s.cores) == 1 for s in cpu_slots)
    # Every slot owns its cores: no core is handed out twice.
    assert sorted(all_cores(slots)) == list(range(16))


def test_gpu_workers_get_the_cores_near_their_gpu_beside_cpu_slots() -> None:
    """The default (CPU slots on): each GPU's worker gets up to four cores of its own NUMA
    node, as NVML's CPU affinity says, and the CPU slots the rest."""
    gpus = (
        Gpu(0, "GPU-fake-0", "Fake GPU", kind="fake", near_cores=tuple(range(16, 32))),
        Gpu(1, "GPU-fake-1", "Fake GPU", kind="fake", near_cores=tuple(range(16))),
    )
    slots = plan_slots(Inventory(gpus=gpus, cores=tuple(range(32))), PoolOptions())

    by_name = {s.name: s for s in slots}
    assert by_name["gpu0#0"].cores == (16, 17, 18, 19)
    assert by_name["gpu1#0"].cores == (0, 1, 2, 3)
    assert by_name["gpu0#0"].threads == by_name["gpu1#0"].threads == 4
    cpu_cores = sorted(c for s in slots if s.kind == "cpu" for c in s.cores)
    assert cpu_cores == [*range(4, 16), *range(20, 32)]


def test_trials_per_gpu_packs_workers_onto_each_gpu() -> None:
    slots = plan_slots(machine(4, 16), PoolOptions(trials_per_gpu=2, cpu_slots=0))

    assert [s.gpus for s in slots] == [(0,), (0,), (1,), (1,), (2,), (2,), (3,), (3,)]
    assert len({s.name for s in slots}) == 8
    assert sorted(all_cores(slots)) == list(range(16))
    assert {s.threads for s in slots} == {2}


def test_gpus_per_trial_groups_gpus() -> None:
    slots = plan_slots(machine(4, 8), PoolOptions(gpus_per_trial=2, cpu_slots=0))

    assert [s.gpus for s in slots] == [(0, 1), (2, 3)]
    assert [s.environment()["CUDA_VISIBLE_DEVICES"] for s in slots] == [
        "GPU-fake-0,GPU-fake-1",
        "GPU-fake-2,GPU-fake-3",
    ]
    assert [s.threads for s in slots] == [4, 4]


def test_gpus_per_trial_above_the_gpu_count_is_refused() -> None:
    with pytest.raises(ResourceError, match="--gpus-per-trial 4 or less"):
        plan_slots(machine(4, 8), PoolOptions(gpus_per_trial=5))


def test_cpu_slots_and_threads_per_slot_cut_cores_into_disjoint_blocks() -> None:
    slots = plan_slots(machine(0, 8), PoolOptions(cpu_slots=2, threads_per_slot=4))

    assert [s.cores for s in slots] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    for slot in slots:
        env = slot.environment()
        assert {env[name] for name in THREAD_ENV_VARS} == {"4"}
        assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_slot_environment_round_trips_through_current_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hyperfleet

    slot = plan_slots(machine(2, 4), PoolOptions(cpu_slots=0))[1]
    monkeypatch.setenv(SLOT_ENV, slot.environment()[SLOT_ENV])

    assert hyperfleet.current_slot() == slot
    assert json.loads(slot.environment()[SLOT_ENV])["gpus"] == [1]
    assert slot.environment()["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_gpus_option_picks_gpus_by_index_or_uuid() -> None:
    slots = plan_slots(machine(4, 4), PoolOptions(gpus=["3", "GPU-fake-1"], cpu_slots=0))
    assert [s.gpus for s in slots] == [(3,), (1,)]


def test_unknown_gpu_is_refused_with_the_gpus_available() -> None:
    with pytest.raises(ResourceError, match=r"GPU '7' does not exist.*0 \(GPU-fake-0\)"):
        plan_slots(machine(2, 4), PoolOptions(gpus=["7"]))


def test_no_gpu_and_no_cpu_slot_is_refused() -> None:
    with pytest.raises(ConfigError, match="--cpu-slots 1"):
        plan_slots(machine(0, 4), PoolOptions(cpu_slots=0))


def test_bad_option_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="--trials-per-gpu 1"):
        plan_slots(machine(1, 4), PoolOptions(trials_per_gpu=0))


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("2,3", [2, 3]),
        ("3,1", [3, 1]),
        ("GPU-fake-2,GPU-fake-0", [2, 0]),
        ("fake-1", [1]),  # a UUID without its "GPU-" prefix, as CUDA accepts it
        ("1,9,2", [1]),  # CUDA stops at the first entry that names no GPU
        ("", [0, 1, 2, 3]),  # empty hides real GPUs only: fake ones are asked for explicitly
    ],
)
def test_cuda_visible_devices_limits_the_inventory(
    monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[int]
) -> None:
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [g.index for g in detect_inventory().gpus] == expected


def test_fake_gpu_count_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "four")
    with pytest.raises(ResourceError, match="HYPERFLEET_FAKE_GPUS"):
        detect_inventory()
