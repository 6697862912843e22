"""Each worker is pinned to its slot: GPUs through CUDA_VISIBLE_DEVICES, cores through CPU
affinity, thread pools through OMP/MKL/OPENBLAS_NUM_THREADS. Read from inside the objective,
in real worker processes, with a fake inventory of GPUs."""

from __future__ import annotations

import importlib
import os
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest

import hyperfleet
from hyperfleet.resources.inventory import Gpu, Inventory

OBJECTIVES = Path(__file__).parent / "objectives"
ALLOWED_CORES = tuple(sorted(os.sched_getaffinity(0)))


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("slot_probe")


def fake_gpus(count: int) -> tuple[Gpu, ...]:
    return tuple(
        Gpu(index=i, uuid=f"GPU-fake-{i}", name="Fake GPU", memory_total_mib=1024, kind="fake")
        for i in range(count)
    )


def run_one_trial_per_worker(
    probe: ModuleType, tmp_path: Path, parties: int, **pool: Any
) -> list[dict[str, Any]]:
    """Run exactly ``parties`` trials, each held until every worker has one, and return what
    each trial saw."""
    study = optuna.create_study()
    outcome = hyperfleet.optimize(
        study,
        probe.make_objective,
        n_trials=parties,
        run_dir=tmp_path / "run",
        display="quiet",
        objective_kwargs={"barrier_dir": str(tmp_path / "barrier"), "parties": parties},
        **pool,
    )
    assert outcome.status == "completed"
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * parties
    return [t.user_attrs for t in trials]


def assert_pinned_to_own_slot(seen: dict[str, Any]) -> None:
    slot = seen["slot"]
    assert seen["affinity"] == slot["cores"]
    assert seen["threads"] == dict.fromkeys(seen["threads"], str(slot["threads"]))


def test_four_gpus_give_four_workers_each_seeing_one_different_gpu(
    probe: ModuleType, tmp_path: Path
) -> None:
    inventory = Inventory(gpus=fake_gpus(4), cores=ALLOWED_CORES)
    seen = run_one_trial_per_worker(probe, tmp_path, 4, inventory=inventory)

    # Pinned by UUID, which CUDA reads as NVML does: NVML's index may not be CUDA's.
    assert sorted(s["cuda_visible_devices"] for s in seen) == [f"GPU-fake-{i}" for i in range(4)]
    assert len({s["pid"] for s in seen}) == 4
    for s in seen:
        assert s["slot"]["kind"] == "gpu"
        assert s["slot"]["device"] == "cuda:0"
        assert s["slot"]["gpu_uuids"] == [s["cuda_visible_devices"]]
        assert s["slot"]["gpus"] == [int(s["cuda_visible_devices"].removeprefix("GPU-fake-"))]
        assert_pinned_to_own_slot(s)


def test_trials_per_gpu_two_puts_two_workers_on_each_gpu(probe: ModuleType, tmp_path: Path) -> None:
    inventory = Inventory(gpus=fake_gpus(4), cores=ALLOWED_CORES)
    seen = run_one_trial_per_worker(probe, tmp_path, 8, inventory=inventory, trials_per_gpu=2)

    assert Counter(s["cuda_visible_devices"] for s in seen) == {
        f"GPU-fake-{i}": 2 for i in range(4)
    }
    assert len({s["pid"] for s in seen}) == 8
    assert len({s["slot"]["name"] for s in seen}) == 8
    for s in seen:
        assert_pinned_to_own_slot(s)


def test_gpus_per_trial_two_gives_two_workers_with_two_gpus_each(
    probe: ModuleType, tmp_path: Path
) -> None:
    inventory = Inventory(gpus=fake_gpus(4), cores=ALLOWED_CORES)
    seen = run_one_trial_per_worker(probe, tmp_path, 2, inventory=inventory, gpus_per_trial=2)

    assert sorted(s["cuda_visible_devices"] for s in seen) == [
        "GPU-fake-0,GPU-fake-1",
        "GPU-fake-2,GPU-fake-3",
    ]
    assert sorted(tuple(s["slot"]["gpus"]) for s in seen) == [(0, 1), (2, 3)]
    for s in seen:
        assert_pinned_to_own_slot(s)


def test_cpu_slots_get_disjoint_cores_thread_limits_and_no_gpu(
    probe: ModuleType, tmp_path: Path
) -> None:
    if len(ALLOWED_CORES) < 2:
        pytest.skip("needs two CPU cores to give two slots disjoint cores")
    inventory = Inventory(gpus=(), cores=ALLOWED_CORES[:2])
    seen = run_one_trial_per_worker(probe, tmp_path, 2, inventory=inventory)

    assert sorted(tuple(s["affinity"]) for s in seen) == [(c,) for c in ALLOWED_CORES[:2]]
    for s in seen:
        assert s["slot"]["kind"] == "cpu"
        assert s["slot"]["device"] == "cpu"
        # A CPU slot sees no GPU, so CPU trials never grab one by accident.
        assert s["cuda_visible_devices"] == ""
        assert s["threads"] == dict.fromkeys(s["threads"], "1")
        assert_pinned_to_own_slot(s)


def test_threads_per_slot_sets_thread_limits_and_core_count(
    probe: ModuleType, tmp_path: Path
) -> None:
    if len(ALLOWED_CORES) < 2:
        pytest.skip("needs two CPU cores for a two-thread slot")
    inventory = Inventory(gpus=(), cores=ALLOWED_CORES[:2])
    seen = run_one_trial_per_worker(
        probe, tmp_path, 1, inventory=inventory, cpu_slots=1, threads_per_slot=2
    )

    assert seen[0]["affinity"] == list(ALLOWED_CORES[:2])
    assert seen[0]["threads"] == dict.fromkeys(seen[0]["threads"], "2")


@pytest.mark.parametrize(
    ("visible", "expected"),
    [("2,3", ["2", "3"]), ("GPU-fake-3,GPU-fake-1", ["1", "3"])],
    ids=["indices", "uuids"],
)
def test_users_cuda_visible_devices_limits_the_gpus_used(
    probe: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    visible: str,
    expected: list[str],
) -> None:
    monkeypatch.setenv("HYPERFLEET_FAKE_GPUS", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    seen = run_one_trial_per_worker(probe, tmp_path, 2, cpu_slots=0)

    # Each worker gets one of the allowed GPUs, by its UUID.
    assert sorted(s["slot"]["gpus"][0] for s in seen) == [int(i) for i in expected]
    for s in seen:
        assert s["cuda_visible_devices"] == f"GPU-fake-{s['slot']['gpus'][0]}"
        assert s["slot"]["gpu_uuids"] == [s["cuda_visible_devices"]]
