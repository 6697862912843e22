"""GPU utilisation and memory, read through NVML about once a second for the live view and
for auto packing (which also needs the memory each process holds)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import psutil

from hyperfleet.resources import fakegpu
from hyperfleet.resources.inventory import Gpu, fake_memory_mib, nvml_problem

_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization_pct: float | None  # None when the GPU cannot tell (fake GPUs, MPS)
    memory_used_mib: int | None
    memory_total_mib: int
    # MiB each process holds on the GPU; None when the driver does not say (in some containers)
    process_mib: dict[int, int] | None = None
    problem: str = ""  # why NVML cannot read the GPU (fallen off the bus...); "" when healthy


class GpuMonitor:
    """Reads every GPU of the pool once per call; one sample serves all slots of a GPU."""

    def __init__(self, gpus: tuple[Gpu, ...]) -> None:
        self._gpus = gpus
        # MPS: one device on the machine's unified memory, which does not change while we run.
        self._unified_mib = psutil.virtual_memory().total // _MIB
        self._handles: dict[int, Any] = {}
        self._nvml: Any = None
        self._problems: dict[int, str] = {}  # each GPU's current problem, in words
        self._ecc_at_start: dict[int, int] = {}  # uncorrectable ECC errors when the run began
        self._said: dict[int, str] = {}  # what problems() said of each GPU last
        if any(g.kind == "cuda" for g in gpus):
            self._open_nvml()

    def _open_nvml(self) -> None:
        """One NVML session for the run, and a handle per GPU found by its UUID (a MIG
        instance's own, whose memory is the slice's); a GPU NVML cannot open reads as unknown
        without blanking the others."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # NVML vanished since the inventory: report unknown values
            return
        self._nvml = pynvml
        for gpu in self._gpus:
            if gpu.kind != "cuda":
                continue
            try:
                self._handles[gpu.index] = self._handle(gpu)
            except pynvml.NVMLError as exc:
                self._problems[gpu.index] = f"NVML cannot open it: {nvml_problem(pynvml, exc)}"
                continue
            errors = self._uncorrectable_ecc(self._handles[gpu.index])
            if errors is not None:
                self._ecc_at_start[gpu.index] = errors

    def _handle(self, gpu: Gpu) -> Any:
        try:
            return self._nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
        except self._nvml.NVMLError:
            if gpu.uuid.startswith("MIG-"):
                raise
            return self._nvml.nvmlDeviceGetHandleByIndex(gpu.index)  # a driver without UUIDs

    def sample(self) -> dict[int, GpuSample]:
        return {gpu.index: self._sample_one(gpu) for gpu in self._gpus}

    def problems(self) -> list[str]:
        """One line per GPU whose health changed since the last call: NVML cannot read it
        (lost, fallen off the bus), or it reads again."""
        lines = []
        for index in sorted(set(self._problems) | set(self._said)):
            now = self._problems.get(index, "")
            if now != self._said.get(index, ""):
                lines.append(f"gpu{index}: {now}" if now else f"gpu{index}: NVML reads it again")
                self._said[index] = now
        return lines

    def _sample_one(self, gpu: Gpu) -> GpuSample:
        if gpu.kind == "fake":
            return _fake_sample(gpu)
        if gpu.kind == "mps":  # one device on the machine's unified memory; no figures to read
            return GpuSample(gpu.index, None, None, self._unified_mib)
        handle = self._handles.get(gpu.index)
        if handle is None or self._nvml is None:
            problem = self._problems.get(gpu.index, "")
            return GpuSample(gpu.index, None, None, gpu.memory_total_mib, problem=problem)
        # Each figure on its own: NVML reports no utilisation for a MIG instance and no memory
        # on some GPUs (NOT_SUPPORTED), and one missing figure must not hide the other.
        failures: list[Exception] = []
        util = self._read(self._nvml.nvmlDeviceGetUtilizationRates, handle, failures)
        memory = self._read(self._nvml.nvmlDeviceGetMemoryInfo, handle, failures)
        self._note_health(gpu.index, failures)
        self._check_ecc(gpu.index, handle)
        return GpuSample(
            gpu.index,
            float(util.gpu) if util is not None else None,
            int(memory.used) // _MIB if memory is not None else None,
            int(memory.total) // _MIB if memory is not None else gpu.memory_total_mib,
            self._process_mib(handle) if memory is not None else None,
            self._problems.get(gpu.index, ""),
        )

    def _read(self, query: Any, handle: Any, failures: list[Exception] | None = None) -> Any:
        """NVML's answer, or None; an error other than NOT_SUPPORTED goes to ``failures``."""
        try:
            return query(handle)
        except self._nvml.NVMLError as exc:
            if failures is not None and not isinstance(exc, self._nvml.NVMLError_NotSupported):
                failures.append(exc)
            return None

    def _uncorrectable_ecc(self, handle: Any) -> int | None:
        """The GPU's uncorrectable ECC errors since the driver loaded; None without ECC."""
        nvml = self._nvml
        return self._read(  # type: ignore[no-any-return]
            lambda h: int(
                nvml.nvmlDeviceGetTotalEccErrors(
                    h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
                )
            ),
            handle,
        )

    def _check_ecc(self, index: int, handle: Any) -> None:
        """An uncorrectable ECC error during the run: the GPU's trials fail (or compute wrong)
        until it is reset, whatever the packing."""
        before = self._ecc_at_start.get(index)
        if before is None or index in self._problems:
            return
        now = self._uncorrectable_ecc(handle)
        if now is not None and now > before:
            self._problems[index] = (
                f"{now - before} uncorrectable ECC error(s) since the run began: it needs a "
                "reset (nvidia-smi -r) before its results can be trusted"
            )

    def _note_health(self, index: int, failures: list[Exception]) -> None:
        """The GPU is unhealthy while NVML fails to read it for another reason than a figure
        it does not report (a lost GPU fails every query)."""
        if failures:
            self._problems[index] = f"NVML cannot read it: {nvml_problem(self._nvml, failures[0])}"
        else:
            self._problems.pop(index, None)

    def _process_mib(self, handle: Any) -> dict[int, int] | None:
        """MiB per process; None when any process's figure is missing (no per-process view)."""
        processes = self._read(self._nvml.nvmlDeviceGetComputeRunningProcesses, handle)
        if processes is None:
            return None
        held: dict[int, int] = {}
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            if used is None:
                return None
            held[int(process.pid)] = held.get(int(process.pid), 0) + int(used) // _MIB
        return held

    def close(self) -> None:
        """End the NVML session (once; an error ending it changes nothing for the run)."""
        nvml, self._nvml, self._handles = self._nvml, None, {}
        if nvml is not None:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()


def _fake_sample(gpu: Gpu) -> GpuSample:
    """A fake GPU reads as the trials on it say (see :mod:`hyperfleet.resources.fakegpu`);
    without its state folder it cannot tell, as before."""
    reading = fakegpu.read(gpu.index)
    total = gpu.memory_total_mib or fake_memory_mib()
    if reading is None:
        return GpuSample(gpu.index, None, None, total)
    return GpuSample(gpu.index, reading.busy_pct, reading.used_mib, total, reading.by_pid)
