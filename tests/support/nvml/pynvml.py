"""A fake ``pynvml`` (nvidia-ml-py) for tests: the names, signatures, constants and error classes
of the real module, answering from a machine described in a JSON file.

The file is named by ``HYPERFLEET_TEST_NVML`` and read again at each ``nvmlInit``, so a test
(or a child process with this folder first on ``PYTHONPATH``) describes the GPUs it needs::

    {"driver": "550.54.15", "cuda": 12040,
     "devices": [{"uuid": "GPU-a", "name": "NVIDIA H100", "memory_mib": 81559,
                  "used_mib": 0, "util": 0, "compute_mode": 0, "cpus": [0, 1],
                  "processes": [[pid, mib], ...], "ecc_uncorrected": 0,
                  "errors": {"nvmlDeviceGetMemoryInfo": 3},      # NVML_ERROR_* codes
                  "mig": [{"uuid": "MIG-x", "name": "... MIG 1g.10gb", "memory_mib": 9856,
                           "errors": {...}}, null, ...]}]}    # null: an empty MIG slot

``errors`` maps a function's name to the NVML error code it raises for that device, or
``"*"`` to the code every call on the device raises (a GPU that fell off the bus).
``sessions`` counts the sessions open (``nvmlInit`` minus ``nvmlShutdown``).
"""

from __future__ import annotations

import json
import os
import string
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

CONFIG_ENV = "HYPERFLEET_TEST_NVML"

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_UNKNOWN = 999

NVML_COMPUTEMODE_DEFAULT = 0
NVML_COMPUTEMODE_EXCLUSIVE_THREAD = 1
NVML_COMPUTEMODE_PROHIBITED = 2
NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3

NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1

NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1

_MIB = 1024 * 1024


class NVMLError(Exception):
    """As the real one: ``NVMLError(code)`` is an instance of the code's own subclass."""

    _valClassMapping: ClassVar[dict[int, type[NVMLError]]] = {}
    _errcode_to_string: ClassVar[dict[int, str]] = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")


def _make_error_classes() -> None:
    module = sys.modules[__name__]
    for err_name in [x for x in dir(module) if x.startswith("NVML_ERROR_")]:
        words = string.capwords(err_name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        value = getattr(module, err_name)

        def new(cls: type[NVMLError], *args: Any, _value: int = value) -> NVMLError:
            return NVMLError.__new__(cls, _value)

        error_class = type("NVMLError_" + words, (NVMLError,), {"__new__": new})
        error_class.__module__ = __name__
        setattr(module, error_class.__name__, error_class)
        NVMLError._valClassMapping[value] = error_class


_make_error_classes()

sessions = 0
calls: list[str] = []  # the device functions called, in order
_machine: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Handle:
    index: int
    mig: int | None = None


@dataclass
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass
class c_nvmlUtilization_t:
    gpu: int
    memory: int


@dataclass
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int | None


def nvmlInit() -> None:
    global sessions, _machine
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    with open(path) as file:
        _machine = json.load(file)
    if _machine.get("init_error"):
        raise NVMLError(int(_machine["init_error"]))
    sessions += 1


def nvmlShutdown() -> None:
    global sessions
    _initialised()
    sessions -= 1


def nvmlSystemGetDriverVersion() -> str:
    return str(_initialised().get("driver", "550.54.15"))


def nvmlSystemGetCudaDriverVersion() -> int:
    return int(_initialised().get("cuda", 12040))


def nvmlDeviceGetCount() -> int:
    return len(_initialised()["devices"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    handle = _Handle(int(index))
    if not 0 <= handle.index < nvmlDeviceGetCount():
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    _answer(handle, "nvmlDeviceGetHandleByIndex")
    return handle


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> _Handle:
    wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
    for index, device in enumerate(_initialised()["devices"]):
        if device["uuid"] == wanted:
            handle = _Handle(index)
            _answer(handle, "nvmlDeviceGetHandleByUUID")
            return handle
        for k, mig in enumerate(device.get("mig") or []):
            if mig is not None and mig["uuid"] == wanted:
                return _Handle(index, k)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return str(_answer(handle, "nvmlDeviceGetUUID")["uuid"])


def nvmlDeviceGetName(handle: _Handle) -> str:
    return str(_answer(handle, "nvmlDeviceGetName").get("name", "NVIDIA Fake"))


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: int | None = None) -> c_nvmlMemory_t:
    device = _answer(handle, "nvmlDeviceGetMemoryInfo")
    total, used = int(device["memory_mib"]) * _MIB, int(device.get("used_mib", 0)) * _MIB
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    if handle.mig is not None:  # NVML reports no utilisation for a MIG device
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    device = _answer(handle, "nvmlDeviceGetUtilizationRates")
    return c_nvmlUtilization_t(gpu=int(device.get("util", 0)), memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    device = _answer(handle, "nvmlDeviceGetComputeRunningProcesses")
    return [
        c_nvmlProcessInfo_t(int(pid), None if mib is None else int(mib) * _MIB)
        for pid, mib in device.get("processes", [])
    ]


def nvmlDeviceGetComputeMode(handle: _Handle) -> int:
    return int(_answer(handle, "nvmlDeviceGetComputeMode").get("compute_mode", 0))


def nvmlDeviceGetTotalEccErrors(handle: _Handle, errorType: int, counterType: int) -> int:
    """The device's ``ecc_uncorrected`` count for uncorrected errors, else 0; NOT_SUPPORTED
    on a device whose ``ecc_uncorrected`` is null (no ECC, as on consumer cards)."""
    device = _answer(handle, "nvmlDeviceGetTotalEccErrors")
    if device.get("ecc_uncorrected", 0) is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if errorType != NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
        return 0
    return int(device.get("ecc_uncorrected", 0))


def nvmlDeviceGetMigMode(device: _Handle) -> list[int]:
    found = _answer(device, "nvmlDeviceGetMigMode")
    if "mig" not in found:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # a GPU without MIG, as on a consumer card
    mode = NVML_DEVICE_MIG_ENABLE if found["mig"] is not None else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(device: _Handle) -> int:
    return len(_answer(device, "nvmlDeviceGetMaxMigDeviceCount").get("mig") or [])


def nvmlDeviceGetMigDeviceHandleByIndex(device: _Handle, index: int) -> _Handle:
    instances = _answer(device, "nvmlDeviceGetMigDeviceHandleByIndex").get("mig") or []
    if not 0 <= index < len(instances) or instances[index] is None:
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return _Handle(device.index, index)


def nvmlDeviceIsMigDeviceHandle(device: _Handle) -> int:
    return int(device.mig is not None)


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migDevice: _Handle) -> _Handle:
    return _Handle(migDevice.index)


def nvmlDeviceGetCpuAffinity(handle: _Handle, cpuSetSize: int) -> list[int]:
    """Words of 64 bits, core ``64 * i + b`` being bit ``b`` of word ``i``, as the real one."""
    cpus = _answer(handle, "nvmlDeviceGetCpuAffinity").get("cpus", [])
    words = [0] * cpuSetSize
    for cpu in cpus:
        if cpu // 64 < cpuSetSize:
            words[cpu // 64] |= 1 << (cpu % 64)
    return words


def _initialised() -> dict[str, Any]:
    if _machine is None or sessions <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _machine


def _answer(handle: _Handle, function: str) -> dict[str, Any]:
    """The device (or MIG device) ``handle`` names, or the error it is set to raise."""
    calls.append(function)
    device: dict[str, Any] = _initialised()["devices"][handle.index]
    errors = device.get("errors", {})
    if handle.mig is not None:
        mig = dict(device["mig"][handle.mig])
        errors = {**errors, **mig.get("errors", {})}
        device = {**device, **mig}
    code = errors.get("*", errors.get(function))
    if code:
        raise NVMLError(int(code))
    return device
