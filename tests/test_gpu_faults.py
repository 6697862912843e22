"""The NVML path on the machines users have, through a fake ``pynvml`` (``support/nvml/``) with
the real one's names and error codes: GPUs NVML may not open, that fell off the bus or report no
memory, MIG instances, compute modes and the cores near each GPU. The inventory leaves out what
it cannot use, says why in one line, and always ends its NVML session; the monitor reads each
GPU, and each figure, on its own."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from hyperfleet.controller.autopack import AutoPack
from hyperfleet.resources.inventory import detect_inventory
from hyperfleet.resources.monitor import GpuMonitor
from hyperfleet.resources.packing import GpuPacker, GpuReading, PackingSettings
from hyperfleet.resources.slots import PoolOptions, Slot, plan_slots
from support.fake_nvml import device, rewrite, use_fake_nvml

NO_PERMISSION, NOT_SUPPORTED, NOT_FOUND, GPU_IS_LOST = 4, 3, 6, 15
MIG_A = "MIG-aaaaaaaa-0000-0000-0000-000000000000"
MIG_B = "MIG-bbbbbbbb-0000-0000-0000-000000000000"


def machine(*devices: dict[str, Any]) -> dict[str, Any]:
    return {"devices": list(devices)}


def a100_with_mig(index: int) -> dict[str, Any]:
    """An A100 cut into two MIG instances, with an empty MIG slot between them."""
    return device(
        index,
        name="NVIDIA A100-SXM4-40GB",
        memory_mib=40960,
        mig=[
            {"uuid": MIG_A, "name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "memory_mib": 19968},
            None,
            {"uuid": MIG_B, "name": "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "memory_mib": 4864},
        ],
    )


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    def install(*devices: dict[str, Any]) -> ModuleType:
        return use_fake_nvml(monkeypatch, tmp_path, machine(*devices))

    return install


def test_a_gpu_nvml_may_not_open_is_left_out_and_the_others_are_used(nvml: Any) -> None:
    fake = nvml(device(0), device(1, errors={"nvmlDeviceGetHandleByIndex": NO_PERMISSION}))
    inventory = detect_inventory()

    assert [g.index for g in inventory.gpus] == [0]
    assert inventory.note.splitlines()[0] == "1 NVIDIA GPU(s) through NVML"
    assert inventory.warnings == (
        "GPU 1 left out: this process may not open it (Insufficient Permissions: a container "
        "or cgroup without access to its device file)",
    )
    assert fake.sessions == 0


def test_a_lost_gpu_is_left_out_with_its_xid_hint(nvml: Any) -> None:
    fake = nvml(device(0, errors={"*": GPU_IS_LOST}), device(1))
    inventory = detect_inventory()

    assert [g.index for g in inventory.gpus] == [1]
    (warning,) = inventory.warnings
    assert warning.startswith("GPU 0 left out: it fell off the bus (GPU is lost: see `dmesg`")
    assert fake.sessions == 0


def test_every_gpu_failing_gives_a_cpu_only_inventory_not_a_traceback(nvml: Any) -> None:
    fake = nvml(device(0, errors={"*": GPU_IS_LOST}))
    inventory = detect_inventory()

    assert inventory.gpus == ()
    assert inventory.note.startswith("no GPU: GPU 0 left out: it fell off the bus")
    assert inventory.note.endswith("using CPU slots only")
    assert fake.sessions == 0


def test_a_gpu_without_memory_figures_is_kept_with_a_line_saying_so(
    nvml: Any,
) -> None:
    nvml(device(0, name="NVIDIA GB10", errors={"nvmlDeviceGetMemoryInfo": NOT_SUPPORTED}))
    inventory = detect_inventory()

    (gpu,) = inventory.gpus
    assert gpu.memory_total_mib == 0
    (warning,) = inventory.warnings
    assert "NVML reports no memory figures for it (Not Supported" in warning


def test_mig_instances_are_devices_with_their_own_memory_and_uuid(nvml: Any) -> None:
    nvml(device(0), a100_with_mig(1))
    inventory = detect_inventory()

    assert inventory.note == "1 NVIDIA GPU(s) and 2 MIG instance(s) through NVML"
    whole, first, second = inventory.gpus
    assert (whole.index, whole.parent, whole.memory_total_mib) == (0, None, 81559)
    # Numbered after every whole GPU, so an index names one device whatever MIG does.
    assert (first.index, first.uuid, first.parent, first.memory_total_mib) == (2, MIG_A, 1, 19968)
    assert (second.index, second.uuid, second.memory_total_mib) == (3, MIG_B, 4864)
    assert second.name == "NVIDIA A100-SXM4-40GB MIG 1g.5gb"


def test_the_mig_instance_a_scheduler_gives_is_the_inventory(
    nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml(a100_with_mig(0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG_B)
    inventory = detect_inventory()

    assert [g.uuid for g in inventory.gpus] == [MIG_B]
    assert inventory.warnings == ()


def test_a_visible_device_nvml_does_not_list_is_said_and_no_gpu_count_is_claimed(
    nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml(device(0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-cccccccc-0000-0000-0000-000000000000")
    inventory = detect_inventory()

    assert inventory.gpus == ()
    assert inventory.note.splitlines()[0].startswith(
        "no GPU: CUDA_VISIBLE_DEVICES='MIG-cccccccc-0000-0000-0000-000000000000' leaves none of "
        "the 1 device(s) NVML lists"
    )
    assert "NVIDIA GPU(s)" not in inventory.note
    (warning,) = inventory.warnings
    assert "names none of the devices NVML lists" in warning


def test_mig_on_without_instances_is_said(nvml: Any) -> None:
    nvml(device(0, mig=[None, None]), device(1))
    inventory = detect_inventory()

    assert [g.index for g in inventory.gpus] == [1]
    (warning,) = inventory.warnings
    assert warning.startswith("GPU 0 left out: MIG is on but it has no MIG instance")


def test_compute_modes_are_read_and_a_prohibited_gpu_is_left_out(nvml: Any) -> None:
    nvml(device(0, compute_mode=3), device(1, compute_mode=2), device(2))
    inventory = detect_inventory()

    assert [(g.index, g.compute_mode, g.shared) for g in inventory.gpus] == [
        (0, "exclusive_process", False),
        (2, "default", True),
    ]
    (warning,) = inventory.warnings
    assert warning.startswith("GPU 1 left out: its compute mode is PROHIBITED")


def test_each_gpu_knows_the_allowed_cores_nvml_puts_near_it(
    nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 64, 65})
    nvml(device(0, cpus=[0, 1, 64, 100]), device(1, cpus=[2, 3, 65]), device(2))
    inventory = detect_inventory()

    assert [g.near_cores for g in inventory.gpus] == [(0, 1, 64), (2, 3, 65), ()]


# ----- the monitor ------------------------------------------------------------------------


def test_one_lost_gpu_does_not_blank_the_others_and_the_session_ends(nvml: Any) -> None:
    fake = nvml(device(0, used_mib=1000, util=40), device(1, used_mib=500, util=10))
    gpus = detect_inventory().gpus
    fake_lose(fake, 0)  # between the inventory and the run's start
    monitor = GpuMonitor(gpus)
    assert fake.sessions == 1

    before = monitor.sample()
    fake_lose(fake, 1)  # during the run
    after = monitor.sample()
    monitor.close()
    monitor.close()

    assert (before[0].utilization_pct, before[0].memory_used_mib) == (None, None)
    assert (before[1].utilization_pct, before[1].memory_used_mib) == (10.0, 500)
    assert (after[1].utilization_pct, after[1].memory_used_mib) == (None, None)
    assert fake.sessions == 0


def fake_lose(fake: ModuleType, index: int) -> None:
    """GPU ``index`` falls off the bus: every NVML call on it fails with GPU_IS_LOST."""
    fake._machine["devices"][index]["errors"] = {"*": GPU_IS_LOST}
    rewrite(fake._machine)  # for the next session too


def test_a_mig_instance_reads_its_own_memory_without_utilisation(nvml: Any) -> None:
    gpu = a100_with_mig(0)
    gpu["mig"][2].update(used_mib=1200, processes=[[77, 1200]])
    fake = nvml(gpu)
    monitor = GpuMonitor(detect_inventory().gpus)

    samples = monitor.sample()
    monitor.close()

    mig_b = samples[2]
    assert mig_b.utilization_pct is None  # NVML does not report it on MIG
    assert (mig_b.memory_used_mib, mig_b.memory_total_mib) == (1200, 4864)
    assert mig_b.process_mib == {77: 1200}
    assert fake.sessions == 0


def test_the_mig_instance_a_scheduler_gives_is_a_gpu_slot_pinned_by_its_uuid(
    nvml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml(a100_with_mig(0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG_B)
    slots = plan_slots(detect_inventory(), PoolOptions())

    gpu_slots = [s for s in slots if s.kind == "gpu"]
    assert [s.environment()["CUDA_VISIBLE_DEVICES"] for s in gpu_slots] == [MIG_B]
    assert gpu_slots[0].gpu_uuids == (MIG_B,)


def test_a_gpu_lost_during_the_run_is_said_once_and_auto_packing_does_not_grow_it(
    nvml: Any,
) -> None:
    fake = nvml(device(0, used_mib=1000, util=10))
    (gpu,) = detect_inventory().gpus
    monitor = GpuMonitor((gpu,))
    first = Slot("gpu0#0", "gpu", (0,), (gpu.uuid,), "cuda", cores=(0,), packed=True)
    pack = AutoPack([first], PackingSettings(memory_per_trial_mib=1000))
    pack.ready("gpu0#0", 0.0)
    for t in range(2):
        pack.trial_ended("gpu0#0", float(t), t + 1.0, None, False)

    assert monitor.problems() == []
    fake_lose(fake, 0)
    lost = monitor.sample()
    changes = pack.tick(lost, {}, set(), 2.0)
    said = monitor.problems()
    again = monitor.problems()
    monitor.close()

    assert changes == []  # the GPU had room and time to spare: it would have grown
    assert said == [
        "gpu0: NVML cannot read it: it fell off the bus (GPU is lost: see `dmesg` for Xid 79; "
        "it needs a reset or a reboot)"
    ]
    assert again == []
    assert pack.messages == [f"gpu0 stays at 1: {said[0].removeprefix('gpu0: ')}"]


def test_a_mig_instance_is_packed_by_its_own_memory_alone() -> None:
    """NVML reports no utilisation on MIG: one more trial is added while it fits in the slice's
    memory (4864 MiB here, not the whole GPU's), and none once it does not."""
    packer = GpuPacker("gpu3", PackingSettings())
    packer.ready(1, 0.0)
    packer.trial_ended(0.0, 1.0)
    packer.trial_ended(1.0, 2.0)
    packer.observe_trial_memory(1500)
    grown = packer.decide(GpuReading(4864, 1500, 1500, None), 2.0)
    assert grown is not None and (grown.target, grown.reason) == (2, "31 % memory")

    packer.ready(2, 3.0)
    for t in range(2):
        packer.trial_ended(3.0 + t, 4.0 + t)
        packer.trial_ended(3.0 + t, 4.0 + t)
    held = packer.decide(GpuReading(4864, 3000, 3000, None), 5.0)
    assert held is not None and held.target == 2
    assert held.reason == "stays at 2: no room for one more trial (62 % memory)"


def test_an_uncorrectable_ecc_error_during_the_run_is_said_once(nvml: Any) -> None:
    # GPU 1 had errors before the run (counted since the driver loaded): only new ones count.
    fake = nvml(
        device(0, ecc_uncorrected=0),
        device(1, ecc_uncorrected=2),
        device(2, ecc_uncorrected=None),  # a card without ECC
    )
    monitor = GpuMonitor(detect_inventory().gpus)
    healthy = monitor.sample()
    assert monitor.problems() == []

    fake._machine["devices"][0]["ecc_uncorrected"] = 1
    samples = monitor.sample()
    said = monitor.problems()
    monitor.sample()
    again = monitor.problems()
    monitor.close()

    assert all(not s.problem for s in healthy.values())
    assert said == [
        "gpu0: 1 uncorrectable ECC error(s) since the run began: it needs a reset "
        "(nvidia-smi -r) before its results can be trusted"
    ]
    assert samples[0].problem and not samples[1].problem and not samples[2].problem
    assert again == []


def test_resources_shows_mig_instances_compute_modes_and_near_cores(
    nvml: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hyperfleet.app.cli import main

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    nvml(device(0, compute_mode=3, cpus=[0, 1, 2, 3]), a100_with_mig(1))
    assert main(["resources", "--cpu-slots", "0"]) == 0
    out = capsys.readouterr().out

    assert "GPUs: 1 NVIDIA GPU(s) and 2 MIG instance(s) through NVML" in out
    assert " (EXCLUSIVE_PROCESS compute mode, near cores 0-3)" in out
    assert f"  3: NVIDIA A100-SXM4-40GB MIG 1g.5gb {MIG_B} 4864 MiB (MIG instance of GPU 1)" in out
