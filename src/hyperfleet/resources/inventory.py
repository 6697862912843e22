"""What this machine offers: GPUs (through NVML, or Apple's MPS) and CPU cores.

The inventory is a plain value so that tests and ``hyperfleet resources`` can use a fake one
(``HYPERFLEET_FAKE_GPUS=4``) and the same slot planning runs for real on a GPU machine.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

from hyperfleet.errors import ResourceError
from hyperfleet.resources.fakegpu import fake_memory_mib

FAKE_GPUS_ENV = "HYPERFLEET_FAKE_GPUS"


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML numbers it (PCI bus order), or the single Apple MPS device."""

    index: int
    uuid: str
    name: str
    memory_total_mib: int = 0
    kind: str = "cuda"  # "cuda", "mps" or "fake"


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    cores: tuple[int, ...]
    note: str = ""  # one line on how GPUs were found, or why there are none
    warnings: tuple[str, ...] = field(default=())


def detect_inventory() -> Inventory:
    """Find the GPUs this process may use and the CPU cores it may run on."""
    cores = tuple(sorted(_allowed_cores()))
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake:
        return _fake_inventory(fake, cores)
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        mps = Gpu(index=0, uuid="mps", name="Apple MPS", kind="mps")
        return Inventory(gpus=(mps,), cores=cores, note="1 Apple MPS device")
    gpus, note = _nvml_gpus()
    if gpus:
        gpus = _limit_to_visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return Inventory(gpus=tuple(gpus), cores=cores, note=note)


def _allowed_cores() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _fake_inventory(value: str, cores: tuple[int, ...]) -> Inventory:
    try:
        count = int(value)
    except ValueError:
        raise ResourceError(
            f"{FAKE_GPUS_ENV}={value!r} is not a number; set it to how many fake GPUs to "
            "pretend to have (for example 4), or unset it."
        ) from None
    memory = fake_memory_mib()
    gpus = [
        Gpu(index=i, uuid=f"GPU-fake-{i}", name="Fake GPU", memory_total_mib=memory, kind="fake")
        for i in range(count)
    ]
    # A user's list in CUDA_VISIBLE_DEVICES limits fake GPUs as it limits real ones, so tests
    # and dry runs go through the same selection. An empty value (set to hide real GPUs from
    # CPU-only runs) leaves them alone: they are asked for explicitly.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or None
    gpus = _limit_to_visible(gpus, visible)
    return Inventory(gpus=tuple(gpus), cores=cores, note=f"{count} fake GPUs from {FAKE_GPUS_ENV}")


def _nvml_gpus() -> tuple[list[Gpu], str]:
    try:
        import pynvml
    except ImportError:
        return [], "no GPU: nvidia-ml-py is not installed, using CPU slots only"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"no GPU: NVIDIA driver not available ({exc}), using CPU slots only"
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_mib=int(memory.total) // (1024 * 1024),
                )
            )
    finally:
        pynvml.nvmlShutdown()
    if not gpus:
        return [], "no GPU: the NVIDIA driver reports none, using CPU slots only"
    return gpus, f"{len(gpus)} NVIDIA GPU(s) through NVML"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _limit_to_visible(gpus: list[Gpu], visible: str | None) -> list[Gpu]:
    """Keep only the GPUs an existing CUDA_VISIBLE_DEVICES allows, in its order.

    Entries may be indices (read in PCI bus order, as NVML numbers them) or UUIDs, or UUID
    prefixes as CUDA accepts them. Like CUDA, an empty value hides every GPU.
    """
    if visible is None:
        return gpus
    chosen: list[Gpu] = []
    for token in (t.strip() for t in visible.split(",")):
        if not token:
            continue
        match = _find_gpu(gpus, token)
        if match is None:
            # CUDA stops at the first invalid entry; we do the same so what we use matches
            # what a CUDA program started with this variable would see.
            break
        if match not in chosen:
            chosen.append(match)
    return chosen


def _find_gpu(gpus: list[Gpu], token: str) -> Gpu | None:
    if token.isdigit():
        return next((g for g in gpus if g.index == int(token)), None)
    wanted = token if token.startswith(("GPU-", "MIG-")) else f"GPU-{token}"
    return next((g for g in gpus if g.uuid.startswith(wanted)), None)


def select_gpus(inventory: Inventory, wanted: list[str] | None) -> tuple[Gpu, ...]:
    """The GPUs named by ``wanted`` (indices or UUIDs); all of them when ``wanted`` is None."""
    if wanted is None:
        return inventory.gpus
    chosen = []
    for token in wanted:
        match = _find_gpu(list(inventory.gpus), str(token).strip())
        if match is None:
            have = ", ".join(f"{g.index} ({g.uuid})" for g in inventory.gpus) or "none"
            raise ResourceError(
                f"GPU {token!r} does not exist on this machine. GPUs available: {have}. "
                "Pass indices or UUIDs from `hyperfleet resources`."
            )
        chosen.append(match)
    return tuple(chosen)
