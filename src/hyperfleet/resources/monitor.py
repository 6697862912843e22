"""GPU utilisation and memory, read through NVML about once a second for the live view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hyperfleet.resources.inventory import Gpu


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization_pct: float | None  # None when the GPU cannot tell (fake GPUs, MPS)
    memory_used_mib: int | None
    memory_total_mib: int


class GpuMonitor:
    """Reads every GPU of the pool once per call; one sample serves all slots of a GPU."""

    def __init__(self, gpus: tuple[Gpu, ...]) -> None:
        self._gpus = gpus
        self._handles: dict[int, Any] = {}
        self._nvml: Any = None
        if any(g.kind == "cuda" for g in gpus):
            self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            for gpu in self._gpus:
                self._handles[gpu.index] = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
        except Exception:  # NVML vanished since the inventory: report unknown values
            self._nvml = None
            self._handles = {}

    def sample(self) -> dict[int, GpuSample]:
        return {gpu.index: self._sample_one(gpu) for gpu in self._gpus}

    def _sample_one(self, gpu: Gpu) -> GpuSample:
        handle = self._handles.get(gpu.index)
        if handle is None or self._nvml is None:
            return GpuSample(gpu.index, None, None, gpu.memory_total_mib)
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception:
            return GpuSample(gpu.index, None, None, gpu.memory_total_mib)
        mib = 1024 * 1024
        return GpuSample(
            gpu.index, float(util.gpu), int(memory.used) // mib, int(memory.total) // mib
        )

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            finally:
                self._nvml = None
