"""What this machine offers: GPUs (through NVML, or Apple's MPS) and CPU cores.

The inventory is a plain value so that tests and ``hyperfleet resources`` can use a fake one
(``HYPERFLEET_FAKE_GPUS=4``) and the same slot planning runs for real on a GPU machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from hyperfleet.errors import ResourceError

FAKE_GPUS_ENV = "HYPERFLEET_FAKE_GPUS"
# Fake GPUs in another compute mode than DEFAULT ("exclusive_process"), for tests.
FAKE_GPU_MODE_ENV = "HYPERFLEET_FAKE_GPU_MODE"
DEFAULT_MODE = "default"
EXCLUSIVE_MODE = "exclusive_process"
PROHIBITED_MODE = "prohibited"
# The fake GPUs' memory, and the folder where it follows the trials on them (see
# :mod:`hyperfleet.resources.fakegpu`, which reads and writes that folder).
FAKE_GPU_DIR_ENV = "HYPERFLEET_FAKE_GPU_DIR"
FAKE_GPU_MIB_ENV = "HYPERFLEET_FAKE_GPU_MIB"
DEFAULT_FAKE_GPU_MIB = 16384

# Every slot gets a warm worker process, so the slot count is a process count, with a cost:
# beyond 16 workers per core, trials mostly wait for a core, and starting the workers alone
# (each imports Optuna, about half a CPU-second; torch takes seconds) takes minutes.
WORKERS_PER_CORE = 16

# A warm worker holds Python, Optuna and what the objective imported: about 45 MiB with nothing
# else, hundreds with torch. Counting 100 MiB each refuses only what cannot work anyway.
WORKER_MEMORY_MIB = 100


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML numbers it (PCI bus order), or the single Apple MPS device."""

    index: int
    uuid: str
    name: str
    memory_total_mib: int = 0
    kind: str = "cuda"  # "cuda", "mps" or "fake"
    # NVML's compute mode: DEFAULT lets many processes share the GPU, EXCLUSIVE_PROCESS one.
    compute_mode: str = DEFAULT_MODE
    near_cores: tuple[int, ...] = ()  # the allowed cores NVML puts closest to it; () unknown
    parent: int | None = None  # a MIG instance: the NVML index of the GPU it is a slice of

    @property
    def shared(self) -> bool:
        """Whether several processes may use the GPU at once (its compute mode allows it)."""
        return self.compute_mode == DEFAULT_MODE


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    cores: tuple[int, ...]
    # How GPUs were found, or why there are none; then one line per GPU left out, and why.
    note: str = ""
    warnings: tuple[str, ...] = field(default=())  # the lines after the note's first


def detect_inventory() -> Inventory:
    """Find the GPUs this process may use and the CPU cores it may run on."""
    cores = tuple(sorted(allowed_cores()))
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake:
        return _fake_inventory(fake, cores)
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        mps = Gpu(index=0, uuid="mps", name="Apple MPS", kind="mps")
        return Inventory(gpus=(mps,), cores=cores, note="1 Apple MPS device")
    found = _nvml_gpus(cores)
    gpus, note, problems = found.gpus, found.note, list(found.problems)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if found.listed and visible is not None:
        gpus = _limit_to_visible(gpus, visible)
        unknown = _unmatched(found.listed, visible)
        if unknown:
            problems.append(
                f"CUDA_VISIBLE_DEVICES entry {unknown!r} names none of the devices NVML lists "
                "(see `hyperfleet resources`): it and the entries after it are not used"
            )
        if found.gpus and not gpus:
            note = (
                f"no GPU: CUDA_VISIBLE_DEVICES={visible!r} leaves none of the "
                f"{len(found.listed)} device(s) NVML lists, using CPU slots only"
            )
    # The note's first line says how GPUs were found; each next one, a GPU left out and why.
    return Inventory(
        gpus=tuple(gpus),
        cores=cores,
        note="\n".join([note, *problems]),
        warnings=tuple(problems),
    )


def allowed_cores() -> set[int]:
    """The cores this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _check_fake_count(count: int, cores: tuple[int, ...]) -> None:
    """Each GPU used takes a slot, so more fake GPUs than the machine can run slots is a typo;
    refused before a million of them are built (seconds and hundreds of MB)."""
    limit, why = max_workers(Inventory(gpus=(), cores=cores))
    if not 0 <= count <= limit:
        raise ResourceError(
            f"{FAKE_GPUS_ENV}={count} is not a count of GPUs this machine could give a slot "
            f"each (0 to {limit}: {why}); set it to 4, say, or unset it."
        )


def _fake_inventory(value: str, cores: tuple[int, ...]) -> Inventory:
    try:
        count = int(value)
    except ValueError:
        raise ResourceError(
            f"{FAKE_GPUS_ENV}={value!r} is not a number; set it to how many fake GPUs to "
            "pretend to have (for example 4), or unset it."
        ) from None
    _check_fake_count(count, cores)
    memory = fake_memory_mib()
    mode = os.environ.get(FAKE_GPU_MODE_ENV) or DEFAULT_MODE
    gpus = [
        Gpu(
            index=i,
            uuid=f"GPU-fake-{i}",
            name="Fake GPU",
            memory_total_mib=memory,
            kind="fake",
            compute_mode=mode,
        )
        for i in range(count)
    ]
    # A user's list in CUDA_VISIBLE_DEVICES limits fake GPUs as it limits real ones, so tests
    # and dry runs go through the same selection. An empty value (set to hide real GPUs from
    # CPU-only runs) leaves them alone: they are asked for explicitly.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or None
    gpus = _limit_to_visible(gpus, visible)
    return Inventory(gpus=tuple(gpus), cores=cores, note=f"{count} fake GPUs from {FAKE_GPUS_ENV}")


@dataclass(frozen=True)
class _Found:
    gpus: list[Gpu]  # the devices a worker can use
    note: str
    problems: tuple[str, ...] = ()  # one line per GPU left out or limited, and why
    listed: tuple[Gpu, ...] = ()  # every device NVML listed, usable or not


def _nvml_gpus(allowed: tuple[int, ...]) -> _Found:
    """The GPUs NVML lists, each whole GPU or, with MIG on, each of its MIG instances. A GPU
    NVML cannot read is left out, with one line saying why; the NVML session always ends."""
    try:
        import pynvml
    except ImportError:
        return _Found([], "no GPU: nvidia-ml-py is not installed, using CPU slots only")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _Found([], f"no GPU: NVIDIA driver not available ({exc}), using CPU slots only")
    try:
        return _read_devices(pynvml, allowed)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_devices(nvml: Any, allowed: tuple[int, ...]) -> _Found:
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        return _Found([], f"no GPU: NVML cannot count the GPUs ({exc}), using CPU slots only")
    listed: list[Gpu] = []
    problems: list[str] = []
    next_mig = count  # MIG instances are numbered after every whole GPU, in NVML's order
    for index in range(count):
        try:
            devices, problem = _read_device(nvml, index, next_mig, allowed)
        except nvml.NVMLError as exc:
            problems.append(f"GPU {index} left out: {nvml_problem(nvml, exc)}")
            continue
        next_mig += sum(d.parent is not None for d in devices)
        listed += devices
        if problem:
            problems.append(problem)
    usable = [g for g in listed if g.compute_mode != PROHIBITED_MODE]
    if not usable:
        why = "; ".join(problems) if problems else "the NVIDIA driver reports none"
        return _Found([], f"no GPU: {why}, using CPU slots only", (), tuple(listed))
    whole = sum(g.parent is None for g in usable)
    parts = [f"{whole} NVIDIA GPU(s)"] if whole else []
    if len(usable) > whole:
        parts.append(f"{len(usable) - whole} MIG instance(s)")
    return _Found(usable, " and ".join(parts) + " through NVML", tuple(problems), tuple(listed))


def _read_device(
    nvml: Any, index: int, next_mig: int, allowed: tuple[int, ...]
) -> tuple[list[Gpu], str]:
    """GPU ``index`` (or its MIG instances, numbered from ``next_mig``) and, when it cannot be
    used as it is, one line saying why."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mode = _compute_mode(nvml, handle)
    near = _near_cores(nvml, handle, allowed)
    if _mig_enabled(nvml, handle):
        instances = _mig_instances(nvml, handle, index, next_mig, mode, near)
        if not instances:
            return [], (
                f"GPU {index} left out: MIG is on but it has no MIG instance, so nothing can "
                "run on it; create instances (nvidia-smi mig -cgi ... -C) or turn MIG off"
            )
        return instances, ""
    memory_mib, problem = _memory_mib(nvml, handle, f"GPU {index}")
    gpu = Gpu(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_mib=memory_mib,
        compute_mode=mode,
        near_cores=near,
    )
    if mode == PROHIBITED_MODE:
        problem = (
            f"GPU {index} left out: its compute mode is PROHIBITED, so no process may use it "
            f"(`nvidia-smi -i {index} -c DEFAULT` allows it)"
        )
    return [gpu], problem


def _mig_instances(
    nvml: Any, handle: Any, parent: int, first: int, mode: str, near: tuple[int, ...]
) -> list[Gpu]:
    """The MIG instances of GPU ``parent``, each a device with its own memory and UUID."""
    instances: list[Gpu] = []
    for k in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
        except nvml.NVMLError_NotFound:
            continue  # an empty MIG slot
        memory_mib, _ = _memory_mib(nvml, mig, "")
        instances.append(
            Gpu(
                index=first + len(instances),
                uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                name=_text(nvml.nvmlDeviceGetName(mig)),
                memory_total_mib=memory_mib,
                compute_mode=mode,
                near_cores=near,
                parent=parent,
            )
        )
    return instances


def _memory_mib(nvml: Any, handle: Any, what: str) -> tuple[int, str]:
    """The device's memory, or 0 and why when NVML does not report it (a GPU on unified
    memory such as GB10 says NOT_SUPPORTED): such a GPU is used, but auto packing cannot size
    it."""
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024), ""
    except nvml.NVMLError_NotSupported:
        return 0, (
            f"{what}: NVML reports no memory figures for it (Not Supported, as on GPUs with "
            "unified memory), so auto packing cannot size it: one worker unless "
            "--trials-per-gpu N says more"
        )


_MODES = {0: DEFAULT_MODE, 1: EXCLUSIVE_MODE, 2: PROHIBITED_MODE, 3: EXCLUSIVE_MODE}


def _compute_mode(nvml: Any, handle: Any) -> str:
    """DEFAULT, EXCLUSIVE_PROCESS (EXCLUSIVE_THREAD, retired, counts as it) or PROHIBITED;
    DEFAULT when NVML cannot tell."""
    try:
        return _MODES.get(int(nvml.nvmlDeviceGetComputeMode(handle)), DEFAULT_MODE)
    except nvml.NVMLError:
        return DEFAULT_MODE


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:
        return False  # NOT_SUPPORTED: a GPU without MIG
    return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)


def _near_cores(nvml: Any, handle: Any, allowed: tuple[int, ...]) -> tuple[int, ...]:
    """The allowed cores NVML puts closest to the GPU (its NUMA node's); () when it cannot
    tell or none of them is allowed."""
    words = max(1, -(-(max(allowed, default=0) + 1) // 64))
    try:
        mask = nvml.nvmlDeviceGetCpuAffinity(handle, words)
    except nvml.NVMLError:
        return ()
    near = {64 * i + bit for i, word in enumerate(mask) for bit in range(64) if word >> bit & 1}
    return tuple(sorted(near & set(allowed)))


_NVML_REASONS = {
    "NO_PERMISSION": "this process may not open it (Insufficient Permissions: a container or "
    "cgroup without access to its device file)",
    "GPU_IS_LOST": "it fell off the bus (GPU is lost: see `dmesg` for Xid 79; it needs a reset "
    "or a reboot)",
    "NOT_SUPPORTED": "NVML does not support a query it needs (Not Supported)",
}


def nvml_problem(nvml: Any, error: Exception) -> str:
    """One line on an NVML error: what it means for the GPU, in words."""
    for code, text in _NVML_REASONS.items():
        if getattr(error, "value", None) == getattr(nvml, f"NVML_ERROR_{code}", None):
            return text
    return f"NVML cannot read it ({error})"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _unmatched(gpus: tuple[Gpu, ...], visible: str) -> str:
    """The first CUDA_VISIBLE_DEVICES entry that names no listed device ("" if none)."""
    for token in (t.strip() for t in visible.split(",")):
        if token and _find_gpu(list(gpus), token) is None:
            return token
    return ""


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


def max_workers(inventory: Inventory) -> tuple[int, str]:
    """How many worker processes this machine can sensibly run, and why that many."""
    by_cores = WORKERS_PER_CORE * max(1, len(inventory.cores))
    memory_mib = psutil.virtual_memory().total // 2**20
    by_memory = max(1, memory_mib // WORKER_MEMORY_MIB)
    if by_memory < by_cores:
        return (
            by_memory,
            f"{WORKER_MEMORY_MIB} MiB each in its {memory_mib / 1024:.1f} GiB of memory",
        )
    cores = len(inventory.cores)
    return by_cores, f"{WORKERS_PER_CORE} per core on its {cores} core{'s' * (cores != 1)}"


def fake_memory_mib() -> int:
    """The memory of each fake GPU: ``HYPERFLEET_FAKE_GPU_MIB``, else 16 GiB."""
    text = os.environ.get(FAKE_GPU_MIB_ENV, "").strip()
    if not text:
        return DEFAULT_FAKE_GPU_MIB
    mib = int(text) if text.isascii() and text.isdigit() else 0
    if mib < 1:
        raise ResourceError(
            f"{FAKE_GPU_MIB_ENV}={text!r} is not a memory size; set it to each fake GPU's "
            f"memory in MiB (for example {DEFAULT_FAKE_GPU_MIB}), or unset it for 16 GiB."
        )
    return mib


def fake_gpu_folder() -> Path | None:
    """Where the fake GPUs' memory and utilisation follow their trials; None: they read nothing."""
    folder = os.environ.get(FAKE_GPU_DIR_ENV)
    return Path(folder) if folder else None
