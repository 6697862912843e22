"""Slots: the units of the pool. Each slot gets one warm worker process.

A slot is a set of GPUs (none for a CPU slot), a set of CPU cores and a thread count. The worker
for a slot is started with an environment that pins it there before any user code runs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace

from hyperfleet.errors import ConfigError, ResourceError
from hyperfleet.resources.inventory import Gpu, Inventory, fake_gpu_folder, max_workers, select_gpus
from hyperfleet.resources.packing import AUTO, MAX_WORKERS_PER_GPU, PackingSettings

SLOT_ENV = "HYPERFLEET_SLOT"
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

# Frameworks that take most of a GPU's memory when they start unless told otherwise: JAX
# preallocates 75 % of it, TensorFlow nearly all. On a GPU shared by several workers (a
# fraction of it, or auto packing's workers) the second would fail every trial, so its slots
# ask them to take memory as they need it, unless the user set these.
GPU_WORKER_CORES = 4  # the most cores a GPU worker gets by default beside CPU slots
SHARED_GPU_ENV = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
}

# The GPUs a slot's name starts with, after its node: gpu0#1, gpu0+1, gpu2:4#3, node3/gpu1-2c#0
# (see gpu_slot here and resources.shapes for the names).
_GPUS_IN_NAME = re.compile(r"gpu(\d+(?:\+\d+)*)")


@dataclass(frozen=True)
class PoolOptions:
    """How to cut the machine into slots. ``None`` means "decide from the machine"."""

    gpus: list[str] | None = None
    # "auto": one worker per GPU to start with, more while the GPU has room (see packing.py)
    trials_per_gpu: int | str = 1
    gpus_per_trial: int = 1
    cpu_slots: int | None = None
    threads_per_slot: int | None = None
    gpu_memory_mib: int | None = None  # what one trial takes on its GPU, if the user knows

    @property
    def workers_per_gpu(self) -> int:
        """The workers each GPU starts with: one under auto packing."""
        return 1 if self.trials_per_gpu == AUTO else int(self.trials_per_gpu)


@dataclass(frozen=True)
class Slot:
    """Where one worker runs. ``hyperfleet.current_slot()`` returns this inside an objective."""

    name: str
    kind: str  # "gpu" or "cpu"
    gpus: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    gpu_kind: str = ""  # "cuda", "mps" or "fake" for GPU slots
    cores: tuple[int, ...] = ()
    threads: int = 1
    gpu_share: float = 1.0  # the fraction of each of its GPUs (1/4 when four slots share one)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    packed: bool = False  # auto packing may start more workers beside it on its GPU

    @property
    def node(self) -> str:
        """The node the slot is on (``node3`` for ``node3/gpu1#0``); "" on a single machine."""
        return node_in_name(self.name)

    @property
    def packable(self) -> bool:
        """Whether auto packing may put more workers on this slot's GPU: a slot of one GPU."""
        return self.kind == "gpu" and len(self.gpus) == 1

    @property
    def shares_its_gpu(self) -> bool:
        """Whether other workers may use its GPU at the same time: a fraction of a GPU, or a
        GPU that auto packing fills."""
        return self.kind == "gpu" and (self.gpu_share < 1 or self.packed)

    @property
    def device(self) -> str:
        """The device string for frameworks: "cuda:0" (the slot's first GPU), "mps" or "cpu"."""
        if self.kind == "cpu":
            return "cpu"
        return "mps" if self.gpu_kind == "mps" else "cuda:0"

    def environment(self) -> dict[str, str]:
        """Variables the worker starts with, on top of the controller's own environment."""
        env = {name: str(self.threads) for name in THREAD_ENV_VARS}
        env[SLOT_ENV] = json.dumps(asdict(self))
        if self.shares_its_gpu:
            env.update({k: v for k, v in SHARED_GPU_ENV.items() if k not in os.environ})
        if self.gpu_kind != "mps":
            # Indices are NVML's, which follow the PCI bus; make CUDA count the same way.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            # A CPU slot sees no GPU at all, so CPU trials never grab one by accident.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.cuda_ids())
        return env

    def cuda_ids(self) -> list[str]:
        """The slot's GPUs as CUDA_VISIBLE_DEVICES names them: by UUID (``GPU-...``, or a MIG
        instance's ``MIG-...``), since NVML's index may differ from CUDA's and change across
        reboots; by index only where a GPU's UUID is unknown."""
        if len(self.gpu_uuids) == len(self.gpus) and all(self.gpu_uuids):
            return list(self.gpu_uuids)
        return [str(i) for i in self.gpus]


def node_in_name(name: str) -> str:
    """The node a slot of this name is on (``node3`` for ``node3/gpu1#0``); "" on the
    controller's own machine."""
    return name.rpartition("/")[0]


def gpus_in_name(name: str) -> tuple[int, ...]:
    """The GPUs (their indices on the slot's machine) a slot of this name uses: (0, 1) for
    ``gpu0+1#0``, (2,) for ``node3/gpu2:4#1``; () for a CPU slot. A slot's name is all a
    trial's storage keeps of where it ran, so reading it back is how the GPUs are known later."""
    found = _GPUS_IN_NAME.match(name.rpartition("/")[2])
    return tuple(int(index) for index in found[1].split("+")) if found else ()


def current_slot() -> Slot:
    """The slot the calling process runs in.

    Inside a hyperfleet worker this is the slot it was pinned to. Elsewhere (an objective run by
    plain ``study.optimize``) it describes the whole process: every allowed core, no GPU pinning.
    """
    raw = os.environ.get(SLOT_ENV)
    if raw:
        data = json.loads(raw)
        for key in ("gpus", "gpu_uuids", "cores", "warnings"):
            data[key] = tuple(data[key])
        return Slot(**data)
    cores = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
    return Slot(name="local", kind="cpu", cores=cores, threads=max(1, len(cores)))


def plan_slots(inventory: Inventory, options: PoolOptions) -> list[Slot]:
    """Cut the machine into slots: GPU slots first, then CPU slots on the cores left over."""
    _check_options(options)
    gpus = select_gpus(inventory, options.gpus)
    check_shared(gpus, options.workers_per_gpu)
    groups = _gpu_groups(gpus, options.gpus_per_trial)
    cores = list(inventory.cores) or [0]
    per_gpu = options.workers_per_gpu
    n_gpu_slots = len(groups) * per_gpu
    gpu_threads = _gpu_slot_threads(options, len(cores), n_gpu_slots)
    slots: list[Slot] = []
    picker = CorePicker(cores)
    for group in groups:
        near = [core for gpu in group for core in gpu.near_cores]
        for k in range(per_gpu):
            slot_cores = picker.take(gpu_threads, near)
            slot = gpu_slot(group, k, slot_cores, gpu_threads, 1 / per_gpu)
            slots.append(replace(slot, packed=options.trials_per_gpu == AUTO and slot.packable))
    slots.extend(_cpu_slots(options, cores, picker.unused(), has_gpu_slots=bool(slots)))
    _check_single_pool_size(inventory, options, len(groups), slots)
    return slots


def auto_packing(
    inventory: Inventory, options: PoolOptions, slots: list[Slot]
) -> PackingSettings | None:
    """How auto packing may grow this pool (None with a fixed ``trials_per_gpu``): up to 16
    workers per GPU, fewer where the machine cannot run that many processes."""
    if options.trials_per_gpu != AUTO:
        return None
    packed = [slot for slot in slots if slot.packable]
    return packing_settings(inventory, len(slots), packed, options.gpu_memory_mib)


def packing_settings(
    inventory: Inventory,
    n_slots: int,
    packed: list[Slot],
    declared_mib: int | None,
    undeclared_too: bool = False,
) -> PackingSettings | None:
    """How auto packing may grow the ``packed`` slots (one per GPU) of a pool of ``n_slots``:
    None when there is nothing to grow, or nothing to pack by (GPUs that read nothing, trials
    of undeclared size)."""
    gpus = {slot.gpus[0] for slot in packed}
    if not gpus:
        return None
    readable = any(g.kind != "fake" for g in inventory.gpus) or fake_gpu_folder()
    if not readable and (declared_mib is None or undeclared_too):
        return None  # fake GPUs without their state folder read nothing: one worker each
    limit, _ = max_workers(inventory)
    room = max(0, limit - n_slots) // len(gpus)
    return PackingSettings(
        max_per_gpu=min(MAX_WORKERS_PER_GPU, 1 + room),
        memory_per_trial_mib=declared_mib,
        undeclared_too=undeclared_too and declared_mib is not None,
        single=tuple(
            (gpu.index, f"its compute mode is {gpu.compute_mode.upper()}: one process at a time")
            for gpu in inventory.gpus
            if gpu.index in gpus and not gpu.shared
        ),
    )


def check_worker_count(inventory: Inventory, count: int, what: str, fix: str) -> None:
    """Refuse a pool of more slots (one worker process each) than the machine can run.

    ``what`` says where the count comes from, ``fix`` what to pass instead."""
    limit, why = max_workers(inventory)
    if count > limit:
        raise ResourceError(
            f"{what} make {count} slots, each a worker process: more than this machine can run "
            f"at once, at most {limit} ({why}); {fix}."
        )


def _check_single_pool_size(
    inventory: Inventory, options: PoolOptions, n_groups: int, slots: list[Slot]
) -> None:
    n_gpu = sum(slot.kind == "gpu" for slot in slots)
    n_cpu = len(slots) - n_gpu
    limit, _ = max_workers(inventory)
    parts = []
    fixes = []
    if n_gpu:
        group = f"{n_groups} GPU{'s' * (n_groups != 1)}"
        if options.gpus_per_trial > 1:
            group = f"{n_groups} groups of {options.gpus_per_trial} GPUs"
        parts.append(f"{group} x --trials-per-gpu {options.trials_per_gpu}")
        if options.workers_per_gpu > 1:
            fixes.append(f"--trials-per-gpu {max(1, (limit - n_cpu) // n_groups)} or less")
    if n_cpu:
        parts.append(f"{n_cpu} CPU slot{'s' * (n_cpu != 1)}")
        fixes.append(f"--cpu-slots {max(0, limit - n_gpu)} or less")
    fix = "pass " + ", or ".join(fixes) if fixes else "use fewer GPUs (--gpus)"
    check_worker_count(inventory, len(slots), " and ".join(parts), fix)


def _check_options(options: PoolOptions) -> None:
    if isinstance(options.trials_per_gpu, str) and options.trials_per_gpu != AUTO:
        raise ConfigError(
            f'trials_per_gpu={options.trials_per_gpu!r} is neither a number nor "auto"; pass '
            "--trials-per-gpu auto (fill each GPU to what it can take) or a number such as 4."
        )
    if options.gpu_memory_mib is not None and options.trials_per_gpu != AUTO:
        raise ConfigError(
            f"gpu_memory is set but trials_per_gpu={options.trials_per_gpu} fixes the workers "
            "per GPU; pass --trials-per-gpu auto to pack trials by their memory."
        )
    checks = [
        (options.workers_per_gpu, "trials_per_gpu", 1),
        (options.gpus_per_trial, "gpus_per_trial", 1),
        (options.threads_per_slot, "threads_per_slot", 1),
        (options.cpu_slots, "cpu_slots", 0),
    ]
    for value, name, minimum in checks:
        if value is not None and value < minimum:
            flag = name.replace("_", "-")
            raise ConfigError(
                f"{name}={value} is below {minimum}; pass --{flag} {max(minimum, 1)} or more."
            )


def check_shared(gpus: tuple[Gpu, ...], per_gpu: int, what: str = "", fix: str = "") -> None:
    """Refuse several workers on a GPU whose compute mode lets one process use it: every
    worker but the first would fail every trial. ``what`` asks for them, ``fix`` avoids it."""
    single = next((g for g in gpus if not g.shared), None)
    if per_gpu > 1 and single is not None:
        what = what or f"--trials-per-gpu {per_gpu}"
        fix = fix or "pass --trials-per-gpu 1 (or auto)"
        raise ResourceError(
            f"{what} puts {per_gpu} processes on GPU {single.index}, but its compute mode is "
            f"{single.compute_mode.upper()}: one process at a time may use it; {fix}, or have "
            f"an administrator run `nvidia-smi -i {single.index} -c DEFAULT`."
        )


def _gpu_groups(gpus: tuple[Gpu, ...], per_trial: int) -> list[tuple[Gpu, ...]]:
    if not gpus:
        return []
    if per_trial > len(gpus):
        raise ResourceError(
            f"gpus_per_trial={per_trial} but only {len(gpus)} GPU(s) are available; "
            f"pass --gpus-per-trial {len(gpus)} or less."
        )
    return split_gpus(gpus, per_trial)


def split_gpus(gpus: tuple[Gpu, ...], per_trial: int) -> list[tuple[Gpu, ...]]:
    """Consecutive groups of ``per_trial`` GPUs; a remainder that makes no group is left out."""
    whole = len(gpus) // per_trial * per_trial
    return [tuple(gpus[i : i + per_trial]) for i in range(0, whole, per_trial)]


def _gpu_slot_threads(options: PoolOptions, n_cores: int, n_gpu_slots: int) -> int:
    if options.threads_per_slot is not None:
        return options.threads_per_slot
    if not n_gpu_slots:
        return 1
    if options.cpu_slots == 0:
        # No CPU slots asked for: GPU workers share every core (data loaders need them).
        return max(1, n_cores // n_gpu_slots)
    # Beside CPU slots, a GPU worker still needs more than one core: a small model waits for
    # the core that launches its kernels, and data loading wants more. GPU workers take up to
    # GPU_WORKER_CORES each, and together at most half the machine's cores.
    return max(1, min(GPU_WORKER_CORES, n_cores // (2 * n_gpu_slots)))


class CorePicker:
    """Hands out cores: first those no slot has, those near the slot's GPU before others, in
    the machine's order; once every core is taken, those the fewest slots share."""

    def __init__(self, cores: list[int]) -> None:
        self._cores = cores
        self._position = {core: k for k, core in enumerate(cores)}
        self._uses = dict.fromkeys(cores, 0)

    def take(self, count: int, near: list[int] | tuple[int, ...] = ()) -> tuple[int, ...]:
        close = set(near)
        order = sorted(
            self._cores, key=lambda c: (self._uses[c], c not in close, self._position[c])
        )
        chosen = order[: max(1, count)]
        for core in chosen:
            self._uses[core] += 1
        return tuple(sorted(chosen))

    def unused(self) -> list[int]:
        return [core for core in self._cores if not self._uses[core]]


def take_cores(cores: list[int], start: int, count: int) -> tuple[int, ...]:
    # Past the end we wrap around: more slots than cores share cores rather than fail.
    return tuple(sorted({cores[(start + i) % len(cores)] for i in range(count)}))


def gpu_slot(
    group: tuple[Gpu, ...], k: int, cores: tuple[int, ...], threads: int, share: float
) -> Slot:
    ids = "+".join(str(g.index) for g in group)
    return Slot(
        name=f"gpu{ids}#{k}",
        kind="gpu",
        gpus=tuple(g.index for g in group),
        gpu_uuids=tuple(g.uuid for g in group),
        gpu_kind=group[0].kind,
        cores=cores,
        threads=threads,
        gpu_share=share,
    )


def _cpu_slots(
    options: PoolOptions, cores: list[int], free: list[int], has_gpu_slots: bool
) -> list[Slot]:
    count, threads = _cpu_slot_shape(options, len(free), has_gpu_slots)
    if count and not free:
        free = cores  # every core went to GPU slots: CPU slots share them
    slots = []
    for k in range(count):
        slot_cores = take_cores(free, k * threads, threads)
        slots.append(Slot(name=f"cpu#{k}", kind="cpu", cores=slot_cores, threads=threads))
    return slots


def _cpu_slot_shape(options: PoolOptions, n_free: int, has_gpu_slots: bool) -> tuple[int, int]:
    count, threads = options.cpu_slots, options.threads_per_slot
    if count == 0 and not has_gpu_slots:
        raise ConfigError(
            "cpu_slots=0 but this machine has no GPU slot, so nothing could run a trial; "
            "pass --cpu-slots 1 or more."
        )
    if count is None:
        threads = threads or 1
        count = n_free // threads
        if count == 0 and not has_gpu_slots:
            count = 1
        return count, threads
    if threads is None:
        threads = max(1, n_free // count) if count else 1
    return count, threads
