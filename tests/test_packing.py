"""Auto packing's decisions (``hyperfleet.resources.packing``), fed readings and trial ends by
hand: no process, no clock; and when a pool is packed automatically."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperfleet.config import parse_memory
from hyperfleet.resources import inventory
from hyperfleet.resources.inventory import Gpu, Inventory
from hyperfleet.resources.packing import GpuPacker, GpuReading, PackingSettings
from hyperfleet.resources.slots import PoolOptions, auto_packing, plan_slots

TOTAL = 16384


def measured(packer: GpuPacker, workers: int, seconds_per_trial: float, start: float) -> float:
    """Let ``workers`` workers each finish two trials of ``seconds_per_trial``; the time after."""
    packer.ready(workers, start)
    end = start
    for k in range(2 * workers):
        begun = start + seconds_per_trial * (k // workers) + 0.001 * k
        end = begun + seconds_per_trial
        packer.trial_ended(begun, end)
    return end


def reading(used: int, busy: float | None, ours: int | None = None) -> GpuReading:
    return GpuReading(TOTAL, used, used if ours is None else ours, busy)


def test_a_small_trial_gets_one_more_worker_with_the_reason() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(1000)
    now = measured(packer, 1, 1.0, 0.0)
    decision = packer.decide(reading(1000, 20.0), now)
    assert decision is not None and decision.target == 2
    assert decision.reason == "6 % memory, 20 % busy"


def test_no_decision_before_two_rounds_of_trials_ended() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(1000)
    packer.ready(1, 0.0)
    packer.trial_ended(0.0, 1.0)
    assert packer.decide(reading(1000, 20.0), 1.5) is None


def test_a_busy_gpu_gets_no_more_workers() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(1000)
    now = measured(packer, 1, 1.0, 0.0)
    decision = packer.decide(reading(1000, 95.0), now)
    assert decision is not None and decision.target == 1 and "busy" in decision.reason
    assert packer.decide(reading(1000, 95.0), now + 1) is None  # said once


def test_memory_for_one_more_trial_with_a_margin_decides() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(7000)
    now = measured(packer, 1, 1.0, 0.0)
    # 2 x 7000 + 10 % of 16384 fits; 3 x 7000 does not.
    decision = packer.decide(reading(7000, 30.0), now)
    assert decision is not None and decision.target == 2
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(7000)
    now = measured(packer, 2, 1.0, 0.0)
    decision = packer.decide(reading(14000, 30.0), now)
    assert decision is not None and decision.target == 2 and "no room" in decision.reason


def test_another_process_memory_counts_as_taken() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(3000)
    now = measured(packer, 1, 1.0, 0.0)
    # Ours: 3000; someone else's: 9000. One more trial would make 15000 + the margin.
    decision = packer.decide(reading(12000, 10.0, ours=3000), now)
    assert decision is not None and decision.target == 1 and "no room" in decision.reason


def test_a_trial_that_fills_the_gpu_stays_alone() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(15000)
    now = measured(packer, 1, 1.0, 0.0)
    decision = packer.decide(reading(15000, 10.0), now)
    assert decision is not None and decision.target == 1


def test_a_worker_that_does_not_raise_throughput_is_retired() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(2000)
    now = measured(packer, 1, 1.0, 0.0)
    assert packer.decide(reading(2000, 56.0), now).target == 2  # type: ignore[union-attr]
    # Two workers each take twice as long: the same trials per second as one.
    now = measured(packer, 2, 2.0, now)
    decision = packer.decide(reading(4000, 100.0), now)
    assert decision is not None and decision.target == 1
    assert "more no longer helps" in decision.reason
    assert packer.limit == 1


def test_out_of_memory_beside_others_lowers_the_limit() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.ready(4, 0.0)
    assert packer.out_of_memory(sharing=4)
    decision = packer.decide(reading(8000, 50.0), 0.5)
    assert decision is not None and decision.target == 3
    assert decision.reason == "out of memory with 4 trials sharing it: at most 3 from now"


def test_out_of_memory_alone_teaches_nothing() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    packer.ready(1, 0.0)
    assert not packer.out_of_memory(sharing=1)
    assert packer.limit == PackingSettings().max_per_gpu


def test_without_readings_a_gpu_keeps_one_worker() -> None:
    packer = GpuPacker("gpu0", PackingSettings())
    now = measured(packer, 1, 1.0, 0.0)
    decision = packer.decide(GpuReading(TOTAL, None, None, None), now)
    assert decision is not None and decision.target == 1
    assert "no memory readings" in decision.reason


def test_declared_memory_packs_without_readings() -> None:
    """Apple MPS: no figures at all, the user's size and the unified memory decide."""
    packer = GpuPacker("gpu0", PackingSettings(memory_per_trial_mib=4096))
    grown = 1
    now = 0.0
    while True:
        now = measured(packer, grown, 1.0, now)
        decision = packer.decide(GpuReading(TOTAL, None, None, None), now)
        assert decision is not None
        if decision.target == grown:
            break
        grown = decision.target
    assert grown == 3  # 4 x 4096 + 10 % would not fit in 16384


def test_declared_and_undeclared_trials_pack_by_the_larger() -> None:
    """A campaign's auto studies on one GPU, some declaring 6000 MiB, some not: one more trial
    must fit at the declared size and at the most one was seen to hold."""
    settings = PackingSettings(memory_per_trial_mib=6000, undeclared_too=True)
    packer = GpuPacker("gpu0", settings)
    now = measured(packer, 1, 1.0, 0.0)
    assert packer.decide(reading(0, 10.0, ours=0), now) is None  # no trial seen holding memory
    packer.observe_trial_memory(2000)
    decision = packer.decide(reading(2000, 10.0), now)
    assert decision is not None and decision.target == 2
    now = measured(packer, 2, 1.0, now)
    # Trials of 2000 MiB would leave room for five more; one of 6000 MiB may start next.
    held = packer.decide(reading(4000, 10.0), now)
    assert held is not None and held.target == 2 and "no room" in held.reason


def test_undeclared_trials_larger_than_the_declared_size_pack_by_what_they_hold() -> None:
    settings = PackingSettings(memory_per_trial_mib=1000, undeclared_too=True)
    packer = GpuPacker("gpu0", settings)
    now = measured(packer, 1, 1.0, 0.0)
    packer.observe_trial_memory(8000)  # 2 x 8000 + 10 % does not fit in 16384
    decision = packer.decide(reading(8000, 10.0), now)
    assert decision is not None and decision.target == 1 and "no room" in decision.reason


def test_auto_packing_is_planned_only_for_auto_on_gpus_that_can_be_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpus = tuple(Gpu(index=i, uuid=f"GPU-fake-{i}", name="f", kind="fake") for i in range(2))
    machine = Inventory(gpus=gpus, cores=(0, 1))
    monkeypatch.setenv(inventory.FAKE_GPU_DIR_ENV, str(tmp_path))
    auto = PoolOptions(trials_per_gpu="auto", cpu_slots=0)
    slots = plan_slots(machine, auto)
    assert [s.name for s in slots] == ["gpu0#0", "gpu1#0"]  # one worker each to start with
    assert auto_packing(machine, auto, slots) is not None
    fixed = PoolOptions(trials_per_gpu=2, cpu_slots=0)  # a fixed count means exactly that
    assert auto_packing(machine, fixed, plan_slots(machine, fixed)) is None
    monkeypatch.delenv(inventory.FAKE_GPU_DIR_ENV)
    assert auto_packing(machine, auto, slots) is None  # nothing to read: one worker each
    declared = PoolOptions(trials_per_gpu="auto", cpu_slots=0, gpu_memory_mib=2048)
    packing = auto_packing(machine, declared, slots)
    assert packing is not None and packing.memory_per_trial_mib == 2048


@pytest.mark.parametrize(
    ("text", "mib"), [("10GiB", 10240), ("512MiB", 512), ("1.5g", 1536), ("300", 300)]
)
def test_gpu_memory_is_read_in_mib(text: str, mib: int) -> None:
    assert parse_memory(text) == mib
