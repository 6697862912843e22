"""What a GPU worker's environment says, read from inside real workers on fake GPUs: the
switches that keep JAX and TensorFlow from taking a shared GPU's whole memory, and the cores
near its GPU."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest

import hyperfleet
from hyperfleet.controller.autopack import AutoPack
from hyperfleet.resources.inventory import Gpu, Inventory
from hyperfleet.resources.monitor import GpuSample
from hyperfleet.resources.packing import PackingSettings
from hyperfleet.resources.shapes import PoolSpec, Shape, plan_pool
from hyperfleet.resources.slots import Slot

OBJECTIVES = Path(__file__).parent / "objectives"
SWITCHES = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
UNSET = dict.fromkeys(SWITCHES)


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    return importlib.import_module("slot_probe")


def one_gpu(near: tuple[int, ...] = ()) -> Inventory:
    gpu = Gpu(0, "GPU-fake-0", "Fake GPU", memory_total_mib=1024, kind="fake", near_cores=near)
    return Inventory(gpus=(gpu,), cores=(0, 1))


def each_worker_sees(
    probe: ModuleType, tmp_path: Path, parties: int, **pool: Any
) -> list[dict[str, Any]]:
    """What each of ``parties`` workers saw, each running one trial while all others ran."""
    study = optuna.create_study()
    outcome = hyperfleet.optimize(
        study,
        probe.make_objective,
        n_trials=parties,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
        objective_kwargs={"barrier_dir": str(tmp_path / "barrier"), "parties": parties},
        **pool,
    )
    assert outcome.status == "completed", outcome.message
    return [t.user_attrs for t in study.get_trials()]


def test_workers_sharing_a_gpu_ask_jax_and_tensorflow_to_grow_their_memory(
    probe: ModuleType, tmp_path: Path
) -> None:
    seen = each_worker_sees(probe, tmp_path, 2, inventory=one_gpu(), trials_per_gpu=2, cpu_slots=0)
    assert [s["frameworks"] for s in seen] == [SWITCHES, SWITCHES]


def test_an_auto_packed_gpu_asks_too_and_a_cpu_slot_does_not(
    probe: ModuleType, tmp_path: Path
) -> None:
    seen = each_worker_sees(probe, tmp_path, 2, inventory=one_gpu(), cpu_slots=1)  # auto
    by_kind = {s["slot"]["kind"]: s["frameworks"] for s in seen}
    assert by_kind == {"gpu": SWITCHES, "cpu": UNSET}


def test_a_gpu_of_its_own_keeps_the_frameworks_defaults(probe: ModuleType, tmp_path: Path) -> None:
    seen = each_worker_sees(probe, tmp_path, 1, inventory=one_gpu(), trials_per_gpu=1, cpu_slots=0)
    assert seen[0]["frameworks"] == UNSET


def test_what_the_user_set_is_kept(
    probe: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    seen = each_worker_sees(probe, tmp_path, 2, inventory=one_gpu(), trials_per_gpu=2, cpu_slots=0)
    for s in seen:
        assert s["frameworks"] == {**SWITCHES, "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}


def test_by_default_the_gpu_worker_runs_on_the_core_near_its_gpu(
    probe: ModuleType, tmp_path: Path
) -> None:
    """CPU slots on (the default): the GPU worker's affinity is the core NVML puts near its
    GPU, here the second one, and the CPU slot gets the other."""
    seen = each_worker_sees(probe, tmp_path, 2, inventory=one_gpu(near=(1,)))
    by_kind = {s["slot"]["kind"]: s for s in seen}
    assert by_kind["gpu"]["affinity"] == [1]
    assert by_kind["cpu"]["affinity"] == [0]


def test_workers_auto_packing_adds_get_spare_cores_of_their_own_while_there_are_some() -> None:
    first = Slot(
        "gpu0#0", "gpu", (0,), ("GPU-fake-0",), "fake", cores=(0, 1), threads=2, packed=True
    )
    pack = AutoPack([first], PackingSettings(memory_per_trial_mib=1000), spare_cores=(2, 3, 4))
    grown = [grow(pack, workers) for workers in (1, 2)]

    assert grown[0].name == "gpu0#1" and grown[0].cores == (2, 3)
    assert grown[1].name == "gpu0#2" and grown[1].cores == (0, 1)  # one spare core: shared
    assert grown[1].threads == 2


def grow(pack: AutoPack, workers: int) -> Slot:
    """Let the GPU's ``workers`` workers each complete two one-second trials (one more worker
    having raised the throughput) and return the slot auto packing adds next."""
    start = 10.0 * workers
    for k in range(workers):
        pack.ready(f"gpu0#{k}", start)
    for k in range(workers):
        for t in range(2):
            pack.trial_ended(f"gpu0#{k}", start + t, start + t + 1, None, False)
    sample = GpuSample(0, 10.0, 1000 * workers, 16384, None)
    (change,) = pack.tick({0: sample}, {}, set(), start + 2)
    assert change.start
    return change.slot


def test_a_trial_failing_where_torch_cannot_use_cuda_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """NVML lists a GPU but this torch cannot use it (here a CPU build; on a GPU machine, a
    driver older than the CUDA torch was built for): the failure says so."""
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    failures = importlib.import_module("gpu_failures")
    gpu = Gpu(0, "GPU-00000000-0000-0000-0000-000000000000", "NVIDIA H100", 81559, "cuda")
    study = optuna.create_study()
    hyperfleet.optimize(
        study,
        failures.torch_on_cuda,
        n_trials=1,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
        inventory=Inventory(gpus=(gpu,), cores=(0,)),
        cpu_slots=0,
        trials_per_gpu=1,
    )

    reason = study.trials[0].system_attrs["hyperfleet:fail_reason"]
    assert "cannot use CUDA in this worker although NVML lists its GPU" in reason, reason


def test_a_campaigns_gpu_slots_get_the_cores_near_their_gpu() -> None:
    gpus = (
        Gpu(0, "GPU-fake-0", "Fake GPU", kind="fake", near_cores=(4, 5, 6, 7)),
        Gpu(1, "GPU-fake-1", "Fake GPU", kind="fake", near_cores=(0, 1, 2, 3)),
    )
    inventory = Inventory(gpus=gpus, cores=tuple(range(8)))
    pool = plan_pool(inventory, PoolSpec(), [Shape(gpus=1.0, cpus=2), Shape(cpus=1)])

    cores = {slot.name: slot.cores for slot in pool.slots}
    assert cores["gpu0#0"] == (4, 5) and cores["gpu1#0"] == (0, 1)
    cpu = sorted(c for slot in pool.slots if slot.kind == "cpu" for c in slot.cores)
    assert cpu == [2, 3, 6, 7]
