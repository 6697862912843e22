"""Slot shapes, the campaign pool planner and the resource ledger, on fake machines."""

from __future__ import annotations

import itertools

import pytest

from hyperfleet.errors import ConfigError, ResourceError
from hyperfleet.resources.inventory import Gpu, Inventory
from hyperfleet.resources.shapes import (
    ANY,
    Ledger,
    Pool,
    PoolSpec,
    Shape,
    plan_pool,
    single_pool,
)
from hyperfleet.resources.slots import PoolOptions, Slot, plan_slots

HALF = Shape(gpus=0.5)
PAIR = Shape(gpus=2)
FOUR_CORES = Shape(cpus=4)
AUTO = Shape(gpus=1.0, auto=True)
WHERE = 'campaign.toml:12: study "xgb", key "slot"'


def machine(n_gpus: int, n_cores: int) -> Inventory:
    gpus = tuple(Gpu(i, f"GPU-fake-{i}", "fake", kind="fake") for i in range(n_gpus))
    return Inventory(gpus=gpus, cores=tuple(range(n_cores)))


def slots_of(pool: Pool, shape: Shape) -> list[Slot]:
    by_name = {slot.name: slot for slot in pool.slots}
    return [by_name[name] for name in pool.eligible[shape]]


def assert_disjoint_cores(slots: list[Slot]) -> None:
    cores = [core for slot in slots for core in slot.cores]
    assert len(cores) == len(set(cores)), [(s.name, s.cores) for s in slots]


# -- Shape ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (Shape(gpus=-0.5), r"gpus = -0\.5 is not allowed; use 0"),
        (ANY, r"gpus = -1\.0 is not allowed"),
        (Shape(gpus=float("nan")), r"gpus = nan is not allowed"),
        (Shape(gpus=0.3), r"not a share 1/k of one GPU \(the nearest is 1/3.*use 0\.5, 0\.25"),
        (Shape(gpus=0.7), r"not a share 1/k .*nearest is 1/1"),
        (Shape(gpus=1.5), r"gpus = 1\.5 is above 1 but not whole.*use 1 or 2"),
        (Shape(cpus=0), r"cpus = 0 is not a whole number of 1 or more; use 1 or more"),
        (Shape(gpus=1, cpus=-2), r"cpus = -2 is not a whole number"),
        (Shape(gpus=1, fallback_cpus=0), r"fallback_cpus = 0 is not a whole number"),
        (Shape(cpus=2, fallback_cpus=2), r"fallback_cpus = 2 is set on a CPU trial.*Remove it"),
        (Shape(gpus="lots"), r"gpus = 'lots' is not a number nor \"auto\"; use \"auto\""),  # type: ignore[arg-type]
        (Shape(gpus=1.0, auto=True, gpu_memory_mib=-3), r"gpu_memory = -3 is not a positive"),
    ],
)
def test_check_refuses_impossible_shapes_and_says_where(shape: Shape, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        shape.check(WHERE)
    assert str(caught.value).startswith(WHERE + ": ")


@pytest.mark.parametrize(
    "shape",
    [
        Shape(),
        Shape(cpus=8),
        Shape(gpus=0.5),
        Shape(gpus=0.25, cpus=2),
        Shape(gpus=1 / 3),
        Shape(gpus=0.333),
        Shape(gpus=1, fallback_cpus=4),
        Shape(gpus=4.0),
    ],
)
def test_check_accepts_shares_whole_gpus_and_cores(shape: Shape) -> None:
    shape.check(WHERE)


@pytest.mark.parametrize(
    ("shape", "kind", "per_gpu", "text"),
    [
        (Shape(), "cpu", 1, "CPU"),
        (Shape(cpus=1), "cpu", 1, "1 core"),
        (Shape(cpus=4), "cpu", 1, "4 cores"),
        (Shape(gpus=0.5), "gpu", 2, "1/2 GPU"),
        (Shape(gpus=0.333, cpus=2), "gpu", 3, "1/3 GPU, 2 cores"),
        (Shape(gpus=1), "gpu", 1, "1 GPU"),
        (Shape(gpus=2, fallback_cpus=8), "gpu", 1, "2 GPUs (or 8 cores without a GPU)"),
        (AUTO, "gpu", 1, "auto-packed GPU"),
        (
            Shape(gpus=1.0, cpus=2, auto=True, gpu_memory_mib=10240),
            "gpu",
            1,
            "auto-packed GPU (10240 MiB per trial), 2 cores",
        ),
    ],
)
def test_kind_per_gpu_and_description(shape: Shape, kind: str, per_gpu: int, text: str) -> None:
    assert (shape.kind, shape.per_gpu, shape.describe()) == (kind, per_gpu, text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PoolSpec(trials_per_gpu=0), r"\[pool\]: trials_per_gpu = 0 is not a whole number"),
        (PoolSpec(threads_per_slot=0), r"\[pool\]: threads_per_slot = 0 is not a whole"),
        (PoolSpec(cpu_slots=-1), r"\[pool\]: cpu_slots = -1 is not a whole number of 0 or more"),
    ],
)
def test_impossible_pool_values_are_refused(spec: PoolSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_pool(machine(1, 4), spec, [Shape()])


def test_plan_refuses_an_impossible_shape() -> None:
    with pytest.raises(ConfigError, match="not a share 1/k"):
        plan_pool(machine(2, 8), PoolSpec(), [Shape(gpus=0.3)])


# -- plan_pool --------------------------------------------------------------------------------


def test_mixed_shapes_tile_the_machine_each_in_its_own_slots() -> None:
    pool = plan_pool(machine(4, 16), PoolSpec(), [HALF, PAIR, FOUR_CORES])

    halves, pairs, cpus = slots_of(pool, HALF), slots_of(pool, PAIR), slots_of(pool, FOUR_CORES)
    assert (len(halves), len(pairs), len(cpus)) == (8, 2, 2)
    assert [slot.name for slot in pool.slots] == [s.name for s in halves + pairs + cpus]
    assert len({slot.name for slot in pool.slots}) == len(pool.slots) == 12
    # Spread first: the first four half slots use four different GPUs.
    assert [s.gpus for s in halves[:4]] == [(0,), (1,), (2,), (3,)]
    assert [s.gpus for s in pairs] == [(0, 1), (2, 3)]
    assert all(s.kind == "gpu" and s.gpu_share == 0.5 for s in halves)
    assert all(s.gpu_share == 1.0 for s in pairs)
    assert pairs[0].gpu_uuids == ("GPU-fake-0", "GPU-fake-1")
    assert pairs[0].gpu_kind == "fake"
    assert all(s.kind == "cpu" and not s.gpus for s in cpus)
    assert all(slot.threads == len(slot.cores) for slot in pool.slots)
    assert pool.notes == ()


def test_mixed_shapes_needs_name_gpu_shares_and_cpu_cores() -> None:
    pool = plan_pool(machine(4, 16), PoolSpec(), [HALF, PAIR, FOUR_CORES])

    halves, pairs, cpus = slots_of(pool, HALF), slots_of(pool, PAIR), slots_of(pool, FOUR_CORES)
    assert dict(pool.needs[halves[1].name]) == {"gpu1": 0.5}
    assert dict(pool.needs[pairs[1].name]) == {"gpu2": 1.0, "gpu3": 1.0}
    assert dict(pool.needs[cpus[0].name]) == {f"core{c}": 1.0 for c in cpus[0].cores}
    assert set(pool.needs) == {slot.name for slot in pool.slots}


def test_cores_are_disjoint_within_a_shape_and_cpu_slots_avoid_gpu_cores() -> None:
    pool = plan_pool(machine(4, 16), PoolSpec(), [HALF, PAIR, FOUR_CORES])

    halves, pairs, cpus = slots_of(pool, HALF), slots_of(pool, PAIR), slots_of(pool, FOUR_CORES)
    assert_disjoint_cores(halves)
    assert_disjoint_cores(pairs)
    assert_disjoint_cores(cpus + halves)
    assert_disjoint_cores(cpus + pairs)
    # Two half slots per GPU, one core each: the GPU blocks take cores 0-7.
    assert sorted(c for s in halves for c in s.cores) == list(range(8))
    assert [s.cores for s in cpus] == [(8, 9, 10, 11), (12, 13, 14, 15)]


def test_a_gpu_block_is_as_large_as_its_hungriest_shape() -> None:
    wide_half, whole = Shape(gpus=0.5, cpus=2), Shape(gpus=1, cpus=3)
    pool = plan_pool(machine(2, 12), PoolSpec(), [wide_half, whole, Shape()])

    # Per GPU: max(2 halves x 2 cores, 1 whole x 3 cores) = 4 cores.
    assert [s.cores for s in slots_of(pool, wide_half)] == [(0, 1), (4, 5), (2, 3), (6, 7)]
    assert [s.cores for s in slots_of(pool, whole)] == [(0, 1, 2), (4, 5, 6)]
    assert [s.cores for s in slots_of(pool, Shape())] == [(8,), (9,), (10,), (11,)]


def test_one_shape_per_side_keeps_the_plan_slots_names() -> None:
    pool = plan_pool(machine(2, 8), PoolSpec(), [HALF, Shape()])
    reference = plan_slots(machine(2, 8), PoolOptions(trials_per_gpu=2))

    assert pool.eligible[HALF] == ("gpu0#0", "gpu1#0", "gpu0#1", "gpu1#1")
    assert pool.eligible[Shape()] == ("cpu#0", "cpu#1", "cpu#2", "cpu#3")
    assert {s.name for s in pool.slots} == {s.name for s in reference}
    pairs = plan_pool(machine(2, 8), PoolSpec(), [PAIR])
    assert pairs.eligible[PAIR] == ("gpu0+1#0",)


def test_names_say_the_shape_when_several_share_a_side() -> None:
    pool = plan_pool(
        machine(2, 16), PoolSpec(), [HALF, Shape(gpus=1), PAIR, Shape(cpus=2), FOUR_CORES]
    )

    assert pool.eligible[HALF] == ("gpu0:2#0", "gpu1:2#0", "gpu0:2#1", "gpu1:2#1")
    assert pool.eligible[Shape(gpus=1)] == ("gpu0", "gpu1")
    assert pool.eligible[PAIR] == ("gpu0+1",)
    assert pool.eligible[Shape(cpus=2)][:2] == ("cpu2#0", "cpu2#1")
    assert pool.eligible[FOUR_CORES][:2] == ("cpu4#0", "cpu4#1")
    assert not any("/" in slot.name for slot in pool.slots)


def test_shapes_differing_only_in_cores_get_separate_slots_with_unique_names() -> None:
    narrow, wide = HALF, Shape(gpus=0.5, cpus=2)
    pool = plan_pool(machine(2, 16), PoolSpec(), [narrow, wide])

    assert pool.eligible[narrow] == ("gpu0:2-1c#0", "gpu1:2-1c#0", "gpu0:2-1c#1", "gpu1:2-1c#1")
    assert pool.eligible[wide] == ("gpu0:2-2c#0", "gpu1:2-2c#0", "gpu0:2-2c#1", "gpu1:2-2c#1")
    assert_disjoint_cores(slots_of(pool, wide))
    assert all(len(s.cores) == 2 for s in slots_of(pool, wide))


def test_identical_resolved_shapes_share_their_slots() -> None:
    pool = plan_pool(
        machine(2, 8),
        PoolSpec(threads_per_slot=2),
        [HALF, Shape(gpus=0.5, cpus=1), Shape(), Shape(cpus=2)],
    )

    assert pool.eligible[HALF] == pool.eligible[Shape(gpus=0.5, cpus=1)]
    assert len(pool.eligible[HALF]) == 4
    # A CPU shape without cpus takes the pool's threads_per_slot.
    assert pool.eligible[Shape()] == pool.eligible[Shape(cpus=2)] == ("cpu#0", "cpu#1")
    assert len(pool.slots) == 6


def test_auto_studies_share_one_slot_per_gpu_that_holds_the_whole_gpu() -> None:
    declared = Shape(gpus=1.0, cpus=2, auto=True, gpu_memory_mib=10240)
    pool = plan_pool(machine(2, 8), PoolSpec(), [AUTO, declared, HALF])

    assert pool.eligible[AUTO] == pool.eligible[declared] == ("gpu0#0", "gpu1#0")
    assert pool.packed == ("gpu0#0", "gpu1#0")  # the slots auto packing grows
    auto = slots_of(pool, AUTO)
    assert [len(slot.cores) for slot in auto] == [2, 2]  # the most any auto study asks for
    assert [pool.needs[slot.name] for slot in auto] == [{"gpu0": 1.0}, {"gpu1": 1.0}]
    assert plan_pool(machine(2, 8), PoolSpec(), [AUTO]).packed == ("gpu0#0", "gpu1#0")
    assert plan_pool(machine(2, 8), PoolSpec(), [HALF]).packed == ()


def test_pool_gpus_limit_the_gpu_slots() -> None:
    pool = plan_pool(machine(4, 16), PoolSpec(gpus=["1", "GPU-fake-3"]), [HALF])

    assert {s.gpus for s in pool.slots} == {(1,), (3,)}
    assert {key for needs in pool.needs.values() for key in needs} == {"gpu1", "gpu3"}


def test_pairs_leave_an_odd_gpu_without_a_pair_slot() -> None:
    pool = plan_pool(machine(3, 12), PoolSpec(), [PAIR, HALF])

    assert [s.gpus for s in slots_of(pool, PAIR)] == [(0, 1)]
    assert [s.gpus for s in slots_of(pool, HALF)][:3] == [(0,), (1,), (2,)]


def test_cpu_slots_and_threads_per_slot_size_the_cpu_side() -> None:
    spec = PoolSpec(cpu_slots=2, threads_per_slot=3)
    pool = plan_pool(machine(1, 16), spec, [Shape(gpus=1), Shape(), Shape(cpus=2)])

    assert [s.cores for s in slots_of(pool, Shape())] == [(1, 2, 3), (4, 5, 6)]
    assert [s.cores for s in slots_of(pool, Shape(cpus=2))] == [(1, 2), (3, 4), (5, 6)]


def test_cpu_slots_zero_leaves_cpu_studies_without_slots() -> None:
    pool = plan_pool(machine(2, 8), PoolSpec(cpu_slots=0), [HALF, FOUR_CORES])

    assert pool.eligible[FOUR_CORES] == ()
    assert len(pool.eligible[HALF]) == 4
    assert pool.notes == ("[pool] cpu_slots = 0: studies that run on CPU get no slot",)


def test_when_gpu_slots_take_every_core_cpu_slots_share_them() -> None:
    pool = plan_pool(machine(2, 2), PoolSpec(), [HALF, Shape()])

    assert [s.cores for s in slots_of(pool, HALF)] == [(0,), (0,), (1,), (1,)]
    assert [s.cores for s in slots_of(pool, Shape())] == [(0,), (1,)]
    assert pool.notes == (
        "GPU slots share cores: they would need 4 cores but 2 are available",
        "CPU slots share cores with GPU slots (the GPU slots took every core)",
    )


def test_any_maps_to_every_slot() -> None:
    pool = plan_pool(machine(2, 6), PoolSpec(), [HALF, ANY, Shape()])

    assert pool.eligible[ANY] == tuple(slot.name for slot in pool.slots)
    assert pool.eligible[ANY] == pool.eligible[HALF] + pool.eligible[Shape()]
    assert len(pool.eligible[ANY]) == 4 + 2


# -- fallback without a GPU -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inventory", "spec"),
    [(machine(0, 8), PoolSpec()), (machine(2, 8), PoolSpec(gpus=[]))],
    ids=["no-gpu-machine", "pool-without-gpus"],
)
def test_without_gpus_a_fallback_shape_runs_on_cpu_slots(
    inventory: Inventory, spec: PoolSpec
) -> None:
    gpu_study = Shape(gpus=0.5, fallback_cpus=2)
    other_gpu_study = Shape(gpus=1, fallback_cpus=2)
    pool = plan_pool(inventory, spec, [gpu_study, other_gpu_study, Shape()])

    fallback = slots_of(pool, gpu_study)
    assert [s.cores for s in fallback] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert all(s.kind == "cpu" and not s.gpus for s in fallback)
    assert pool.eligible[other_gpu_study] == pool.eligible[gpu_study]
    assert len(pool.eligible[Shape()]) == 8
    assert pool.notes == ("no GPU: studies that asked for a GPU run on CPU slots (2 cores)",)


def test_without_gpus_a_shape_without_fallback_gets_no_slot_and_a_note() -> None:
    pool = plan_pool(machine(0, 4), PoolSpec(), [PAIR, Shape()])

    assert pool.eligible[PAIR] == ()
    assert len(pool.eligible[Shape()]) == 4
    assert pool.notes == (
        "no GPU: studies that asked for 2 GPUs have no slot; give them fallback_cpus to run on "
        "CPU slots, or add a GPU to the pool",
    )


# -- what the machine cannot give ------------------------------------------------------------


def test_more_gpus_per_trial_than_the_pool_has_is_refused() -> None:
    with pytest.raises(ResourceError, match=r"needs 4 GPUs per trial but only 2 GPU\(s\)"):
        plan_pool(machine(2, 8), PoolSpec(), [Shape(gpus=4)])


def test_more_cores_per_trial_than_the_cpu_side_has_is_refused() -> None:
    with pytest.raises(ResourceError, match=r"needs 8 cores per CPU trial but .* only 4 cores"):
        plan_pool(machine(0, 4), PoolSpec(), [Shape(cpus=8)])
    with pytest.raises(ResourceError, match=r"the GPU slots hold 4.*ask for 4 or fewer cores"):
        plan_pool(machine(2, 8), PoolSpec(), [Shape(gpus=0.5, cpus=1), Shape(cpus=6)])


def test_cpu_slots_beyond_the_cores_left_are_refused() -> None:
    spec = PoolSpec(cpu_slots=4, threads_per_slot=4)
    with pytest.raises(ResourceError, match="needs 16 cores but only 12 are left"):
        plan_pool(machine(4, 16), spec, [Shape(gpus=1), Shape()])


def test_unknown_pool_gpu_is_refused() -> None:
    with pytest.raises(ResourceError, match="GPU '7' does not exist"):
        plan_pool(machine(2, 8), PoolSpec(gpus=["7"]), [HALF])


# -- Ledger -----------------------------------------------------------------------------------


def mixed_ledger() -> tuple[Pool, Ledger]:
    pool = plan_pool(machine(4, 16), PoolSpec(), [HALF, PAIR, FOUR_CORES])
    return pool, Ledger(pool.needs)


def test_a_pair_trial_blocks_the_half_shares_on_both_its_gpus() -> None:
    pool, ledger = mixed_ledger()
    ledger.claim("gpu0+1")

    blocked = [n for n in pool.eligible[HALF] if not ledger.fits(n)]
    assert blocked == ["gpu0:2#0", "gpu1:2#0", "gpu0:2#1", "gpu1:2#1"]
    assert ledger.fits("gpu2+3") and ledger.fits("cpu4#0")
    with pytest.raises(RuntimeError, match="gpu0:2#0 was claimed but does not fit"):
        ledger.claim("gpu0:2#0")

    ledger.release("gpu0+1")
    assert all(ledger.fits(name) for name in pool.needs)


def test_one_half_share_blocks_the_pair_but_not_the_other_half() -> None:
    _, ledger = mixed_ledger()
    ledger.claim("gpu1:2#0")

    assert not ledger.fits("gpu0+1")
    assert ledger.fits("gpu1:2#1") and ledger.fits("gpu2+3")
    ledger.claim("gpu1:2#1")
    ledger.release("gpu1:2#0")
    assert not ledger.fits("gpu0+1")
    ledger.release("gpu1:2#1")
    assert ledger.fits("gpu0+1")


def test_a_running_slot_does_not_fit_again_and_release_needs_a_claim() -> None:
    _, ledger = mixed_ledger()
    ledger.claim("cpu4#0")

    assert not ledger.fits("cpu4#0")
    assert ledger.fits("cpu4#1")
    with pytest.raises(RuntimeError, match="cpu4#1 was released but is not claimed"):
        ledger.release("cpu4#1")
    with pytest.raises(RuntimeError, match="slot nowhere is not in this ledger"):
        ledger.fits("nowhere")


def test_cpu_slots_of_different_sizes_share_cores_through_the_ledger() -> None:
    pool = plan_pool(machine(0, 8), PoolSpec(), [Shape(), FOUR_CORES])
    ledger = Ledger(pool.needs)
    ledger.claim("cpu1#2")

    assert not ledger.fits("cpu4#0")
    assert ledger.fits("cpu4#1")


def test_load_prefers_busy_gpus_so_whole_gpus_stay_free() -> None:
    pool, ledger = mixed_ledger()
    ledger.claim("gpu0:2#0")

    assert ledger.load("gpu0:2#1") == 0.5
    assert ledger.load("gpu1:2#0") == 0.0
    assert ledger.load("gpu0+1") == 0.5
    fitting = [n for n in pool.eligible[HALF] if ledger.fits(n)]
    assert max(fitting, key=ledger.load) == "gpu0:2#1"
    # Packing the second half there keeps the pair on GPUs 2 and 3 runnable.
    ledger.claim("gpu0:2#1")
    assert ledger.load("gpu0:2#1") == 1.0
    assert ledger.fits("gpu2+3")


def test_thirds_add_up_to_one_gpu_despite_rounding() -> None:
    third = Shape(gpus=1 / 3)
    pool = plan_pool(machine(1, 4), PoolSpec(), [third, Shape(gpus=1)])
    ledger = Ledger(pool.needs)
    names = pool.eligible[third]

    for name in names:
        ledger.claim(name)
    assert not ledger.fits("gpu0")
    for name in names:
        ledger.release(name)
    assert ledger.load("gpu0") == 0.0
    assert ledger.fits("gpu0")


def test_a_gpus_auto_workers_hold_it_together_and_fixed_shares_wait_for_them() -> None:
    pool = plan_pool(machine(1, 4), PoolSpec(), [AUTO, HALF])
    ledger = Ledger(pool.needs)
    ledger.add("gpu0#1", together_with="gpu0#0")  # auto packing adds workers to GPU 0
    ledger.add("gpu0#2", together_with="gpu0#1")

    ledger.claim("gpu0#1")
    assert ledger.fits("gpu0#0") and ledger.fits("gpu0#2")  # any number of them at once
    assert not ledger.fits("gpu0:2#0")  # but no fixed share beside them
    ledger.claim("gpu0#0")
    ledger.release("gpu0#1")
    assert not ledger.fits("gpu0:2#0")
    ledger.release("gpu0#0")
    assert ledger.fits("gpu0:2#0") and ledger.load("gpu0:2#0") == 0.0

    ledger.claim("gpu0:2#0")  # and the other way round
    assert not any(ledger.fits(name) for name in ("gpu0#0", "gpu0#1", "gpu0#2"))


def test_single_pool_slots_never_conflict() -> None:
    slots = plan_slots(machine(2, 4), PoolOptions(trials_per_gpu=2))
    pool = single_pool(slots)
    ledger = Ledger(pool.needs)

    assert pool.slots == tuple(slots)
    assert pool.eligible == {ANY: tuple(s.name for s in slots)}
    for name in pool.eligible[ANY]:
        ledger.claim(name)
    assert all(ledger.load(name) == 0.0 for name in pool.eligible[ANY])


def test_every_pair_of_overlapping_gpu_slots_conflicts_and_others_do_not() -> None:
    pool, _ = mixed_ledger()
    gpu_slots = [s for s in pool.slots if s.kind == "gpu"]
    for a, b in itertools.combinations(gpu_slots, 2):
        ledger = Ledger(pool.needs)
        ledger.claim(a.name)
        shared_gpu = bool(set(a.gpus) & set(b.gpus))
        whole = a.gpu_share == 1.0 or b.gpu_share == 1.0
        assert ledger.fits(b.name) == (not (shared_gpu and whole)), (a.name, b.name)
