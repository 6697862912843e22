"""Auto packing on GPUs that take fewer processes than their memory suggests: a GPU whose added
workers fail every trial stops growing and goes back to the workers that completed trials, and
a GPU in EXCLUSIVE_PROCESS compute mode keeps one worker. Real runs on one fake GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from hyperfleet.controller.autopack import AutoPack
from hyperfleet.errors import ResourceError
from hyperfleet.resources.inventory import (
    EXCLUSIVE_MODE,
    FAKE_GPU_MODE_ENV,
    Gpu,
    Inventory,
)
from hyperfleet.resources.monitor import GpuSample
from hyperfleet.resources.packing import GpuPacker, PackingSettings
from hyperfleet.resources.shapes import PoolSpec, Shape, plan_pool
from hyperfleet.resources.slots import PoolOptions, Slot, plan_slots
from hyperfleet.store import schema
from support.autopacking import run_packed, use_one_fake_gpu, workers_over_time


@pytest.fixture(autouse=True)
def one_fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_one_fake_gpu(monkeypatch, tmp_path)


def run(tmp_path: Path, factory: str, n_trials: int, **model: Any) -> tuple[Any, list[str]]:
    return run_packed(tmp_path, "gpu_failures", factory, n_trials, **model)


def test_a_gpu_whose_added_workers_fail_every_trial_stops_growing(tmp_path: Path) -> None:
    # A small model that leaves the GPU room and time to spare: it would grow to 5 workers.
    # 48 trials leave a slow machine time to start the added worker and see it fail 3 times.
    study, log = run(tmp_path, "make_first_worker_only", 48, mib=1000, busy=20.0, seconds=0.15)

    counts = workers_over_time(log)
    assert counts == [1, 2, 1], log
    # Its quick failures tell first, or the measured throughput does (its restarts counted):
    # on a loaded machine that can be after one or two failures.
    told_by_failures = any("gpu0#1 failed 3 trials in a row" in line for line in log)
    assert told_by_failures or any("more no longer helps" in line for line in log), log
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    fewest = 3 if told_by_failures else 1
    assert fewest <= len(failed) <= 5, log  # those that told, and what ran meanwhile
    retired_at = next(line for line in log if "-> 1 worker," in line)[:19]
    after = {
        t.system_attrs[schema.SLOT_ATTR]
        for t in study.get_trials()
        if t.datetime_start is not None and f"{t.datetime_start:%Y-%m-%d %H:%M:%S}" > retired_at
    }
    assert after <= {"gpu0#0"}, after


def test_a_gpu_in_exclusive_process_mode_keeps_one_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAKE_GPU_MODE_ENV, EXCLUSIVE_MODE)
    study, log = run(tmp_path, "make_first_worker_only", 8, mib=1000, busy=20.0, seconds=0.1)

    assert workers_over_time(log) == [1], log
    assert any(
        "gpu0 stays at 1: its compute mode is EXCLUSIVE_PROCESS: one process at a time" in line
        for line in log
    ), log
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())


def test_several_workers_per_gpu_on_an_exclusive_gpu_are_refused() -> None:
    gpu = Gpu(0, "GPU-fake-0", "Fake GPU", 16384, "fake", compute_mode=EXCLUSIVE_MODE)
    with pytest.raises(ResourceError, match="EXCLUSIVE_PROCESS: one process at a time"):
        plan_slots(Inventory(gpus=(gpu,), cores=(0, 1)), PoolOptions(trials_per_gpu=2))


def test_throughput_counts_failed_trials_and_restarts_as_lost_time() -> None:
    """Two workers of which one fails at once and is restarted for a second, trial after
    trial, complete no more trials per second than one worker did: no gain, although the
    trials that completed took no longer than before."""
    packer = GpuPacker("gpu0", PackingSettings())
    packer.observe_trial_memory(100)
    packer.ready(1, 0.0)
    packer.trial_ended(0.0, 1.0)
    packer.trial_ended(1.0, 2.0)
    assert packer.decide(None, 2.0) is not None  # measured (and held: no readings)
    packer.ready(2, 2.0)
    for k in range(4):
        packer.trial_ended(2.0 + k, 3.0 + k)  # the first worker completes its trials
        # The other fails at once, and its worker restarts until the next second.
        packer.trial_ended(2.0 + k, 2.01 + k, failed=True, restart=0.99 if k else 0.0)
    decision = packer.decide(None, 6.0, restarting=(5.01,))  # the last restart is not over
    assert decision is not None and decision.target == 1, decision
    assert "more no longer helps" in decision.reason


def test_a_campaign_slot_sharing_an_exclusive_gpu_is_refused() -> None:
    gpu = Gpu(0, "GPU-fake-0", "Fake GPU", 16384, "fake", compute_mode=EXCLUSIVE_MODE)
    inventory = Inventory(gpus=(gpu,), cores=(0, 1))
    with pytest.raises(ResourceError, match=r"a study's slot of 0.5 GPU puts 2 processes"):
        plan_pool(inventory, PoolSpec(), [Shape(gpus=0.5)])


def test_an_added_worker_failing_three_trials_quickly_is_retired() -> None:
    first = Slot("gpu0#0", "gpu", (0,), ("GPU-fake-0",), "fake", cores=(0,), packed=True)
    pack = AutoPack([first], PackingSettings(memory_per_trial_mib=1000))
    pack.ready("gpu0#0", 0.0)
    pack.trial_ended("gpu0#0", 0.0, 1.0, None, False)
    pack.trial_ended("gpu0#0", 1.0, 2.0, None, False)
    (grown,) = pack.tick({0: GpuSample(0, 10.0, 1000, 16384, None)}, {}, set(), 2.0)
    assert grown.start and grown.slot.name == "gpu0#1"
    pack.ready("gpu0#1", 2.5)
    pack.trial_ended("gpu0#0", 2.0, 3.0, None, False)
    for k in range(3):  # it fails at once, three times (restarting in between)
        pack.trial_ended("gpu0#1", 2.5 + k, 2.52 + k, None, True)

    (retired,) = pack.tick({0: GpuSample(0, 10.0, 2000, 16384, None)}, {}, set(), 5.0)

    assert not retired.start and retired.slot.name == "gpu0#1"
    assert pack.messages[-1].startswith("gpu0: 2 -> 1 worker, gpu0#1 failed 3 trials in a row")
    assert pack.leaving("gpu0#1")
