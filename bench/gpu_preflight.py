"""What this machine's GPUs are, as NVML and as CUDA see them: the first step of
``bench/gpu_protocol.sh``, so that every later figure can be read against it.

Prints Markdown: the driver and the CUDA version it supports; each GPU's name, UUID, memory,
compute mode and MIG mode (with its MIG instances); what hyperfleet's inventory makes of it;
whether torch can use CUDA in a fresh process (and why not: a driver older than the CUDA torch
was built for); the map from CUDA's device order to NVML's, found by UUID in a child process;
and, per GPU, the memory one CUDA context takes and whether NVML sees per-process memory here
(in some containers it does not, and auto packing then counts all memory in use as its own).

Each check says what it could not do and the script goes on; it exits 0 unless torch cannot
use CUDA (the GPU tests would then skip). Run it with the project's interpreter:
``.venv/bin/python bench/gpu_preflight.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

CHILD_SECONDS = 90
_MIB = 2**20
_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}

# Run in a child process: what torch sees with the environment it was given; with "context",
# it also makes a CUDA context and holds it until the parent has read NVML.
CHILD = r"""
import json, os, sys
out = {"pid": os.getpid()}
try:
    import torch
    out.update(torch=torch.__version__, built_for_cuda=torch.version.cuda)
    out["available"] = torch.cuda.is_available()
    if out["available"]:
        out["devices"] = [
            {"name": torch.cuda.get_device_name(i),
             "uuid": str(getattr(torch.cuda.get_device_properties(i), "uuid", ""))}
            for i in range(torch.cuda.device_count())
        ]
        if sys.argv[1] == "context":
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out), flush=True)
if sys.argv[1] == "context":
    sys.stdin.readline()
"""


def main() -> int:
    print("## GPU preflight\n")
    print(f"- python: {sys.executable} ({sys.version.split()[0]})")
    nvml = _nvml()
    devices = _nvml_devices(nvml) if nvml is not None else []
    _inventory()
    torch_ok = _torch_in_a_child()
    if torch_ok and devices:
        _index_map(devices)
        _contexts(nvml, devices)
    if nvml is not None:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    return 0 if torch_ok else 1


def _nvml() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # any failure is a finding here, not a crash
        print(f"- NVML: not available ({type(exc).__name__}: {exc})")
        return None
    driver = _ask(pynvml, pynvml.nvmlSystemGetDriverVersion)
    cuda = _ask(pynvml, pynvml.nvmlSystemGetCudaDriverVersion)
    if isinstance(cuda, int):
        cuda = f"{cuda // 1000}.{cuda % 1000 // 10}"
    print(f"- driver: {driver}; the newest CUDA it supports: {cuda}")
    return pynvml


def _nvml_devices(nvml: Any) -> list[dict[str, Any]]:
    """Every GPU, and every MIG instance, NVML lists, with what the protocol needs of it."""
    count = _ask(nvml, nvml.nvmlDeviceGetCount)
    if not isinstance(count, int):
        print(f"- NVML cannot count the GPUs: {count}")
        return []
    print("\n| NVML index | name | UUID | memory | compute mode | MIG mode |")
    print("|---:|---|---|---:|---|---|")
    devices: list[dict[str, Any]] = []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            print(f"| {index} | cannot open: {exc} | | | | |")
            continue
        uuid = _text(_ask(nvml, nvml.nvmlDeviceGetUUID, handle))
        memory = _ask(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
        mode = _ask(nvml, nvml.nvmlDeviceGetComputeMode, handle)
        mig = _ask(nvml, nvml.nvmlDeviceGetMigMode, handle)
        mig_text = "not supported" if isinstance(mig, str) else ("on" if mig[0] else "off")
        print(
            f"| {index} | {_text(_ask(nvml, nvml.nvmlDeviceGetName, handle))} | {uuid} | "
            f"{_mib(memory)} | {_MODES.get(mode, mode) if isinstance(mode, int) else mode} "
            f"| {mig_text} |"
        )
        if not isinstance(mig, str) and mig[0]:
            devices += _mig_instances(nvml, handle, index)
        else:
            devices.append({"label": str(index), "uuid": uuid, "handle": handle})
    return devices


def _mig_instances(nvml: Any, handle: Any, parent: int) -> list[dict[str, Any]]:
    found = []
    limit = _ask(nvml, nvml.nvmlDeviceGetMaxMigDeviceCount, handle)
    for k in range(limit if isinstance(limit, int) else 0):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
        except nvml.NVMLError:
            continue
        uuid = _text(_ask(nvml, nvml.nvmlDeviceGetUUID, mig))
        memory = _ask(nvml, nvml.nvmlDeviceGetMemoryInfo, mig)
        name = _text(_ask(nvml, nvml.nvmlDeviceGetName, mig))
        print(f"| {parent}/mig{k} | {name} | {uuid} | {_mib(memory)} | | instance |")
        found.append({"label": f"{parent}/mig{k}", "uuid": uuid, "handle": mig})
    return found


def _inventory() -> None:
    try:
        from hyperfleet.resources.inventory import detect_inventory

        inventory = detect_inventory()
    except Exception as exc:
        print(f"\n- hyperfleet's inventory failed: {type(exc).__name__}: {exc}")
        return
    print(f"\n- hyperfleet's inventory: {inventory.note.splitlines()[0]}")
    for line in inventory.warnings:
        print(f"  - {line}")
    for gpu in inventory.gpus:
        near = f"{len(gpu.near_cores)} near cores" if gpu.near_cores else "near cores unknown"
        print(f"  - gpu{gpu.index}: {gpu.uuid}, {gpu.compute_mode}, {near}")


def _torch_in_a_child() -> bool:
    seen = _child("list", {})
    if seen is None:
        return False
    print(
        f"- torch {seen.get('torch')} built for CUDA {seen.get('built_for_cuda')}: "
        f"cuda.is_available() in a fresh process is {seen.get('available')}"
        + (f" ({seen['error']})" if "error" in seen else "")
    )
    if not seen.get("available"):
        print(
            "  - the GPU tests skip: a CPU build of torch, or a driver older than the CUDA "
            "torch was built for (see the driver line above)"
        )
    return bool(seen.get("available"))


def _index_map(devices: list[dict[str, Any]]) -> None:
    """CUDA's device order (default FASTEST_FIRST, and PCI_BUS_ID) against NVML's, by UUID."""
    by_uuid = {_bare(d["uuid"]): d["label"] for d in devices}
    for order in ("FASTEST_FIRST", "PCI_BUS_ID"):
        seen = _child("list", {"CUDA_DEVICE_ORDER": order, "CUDA_VISIBLE_DEVICES": None})
        if seen is None or "devices" not in seen:
            continue
        pairs = [
            f"cuda:{i} = NVML {by_uuid.get(_bare(d['uuid']), '? (' + d['uuid'] + ')')}"
            for i, d in enumerate(seen["devices"])
        ]
        print(f"- CUDA_DEVICE_ORDER={order}: " + ", ".join(pairs))


def _contexts(nvml: Any, devices: list[dict[str, Any]]) -> None:
    """Per device, a child pinned by UUID makes a CUDA context: what it takes, and whether NVML
    reports it by the child's own process id (not in some containers' pid namespaces)."""
    print("\n| device | torch sees | context MiB (used before -> after) | NVML per process |")
    print("|---|---|---:|---|")
    for device in devices:
        before = _ask(nvml, nvml.nvmlDeviceGetMemoryInfo, device["handle"])
        env = {"CUDA_VISIBLE_DEVICES": device["uuid"]}
        process = _start_child("context", env)
        line = process.stdout.readline() if process.stdout else ""
        try:
            seen = json.loads(line) if line else {"error": "no answer"}
            after = _ask(nvml, nvml.nvmlDeviceGetMemoryInfo, device["handle"])
            per_process = _per_process(nvml, device["handle"], int(seen.get("pid", -1)))
        finally:
            _end_child(process)
        names = ", ".join(d["name"] for d in seen.get("devices", [])) or seen.get("error", "")
        print(f"| {device['label']} | {names} | {_delta(before, after)} | {per_process} |")


def _per_process(nvml: Any, handle: Any, pid: int) -> str:
    processes = _ask(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, handle)
    if isinstance(processes, str):
        return f"cannot list processes: {processes}"
    mine = [p for p in processes if int(p.pid) == pid]
    if not mine:
        pids = ", ".join(str(p.pid) for p in processes) or "none"
        return f"not by this pid (NVML lists {pids}): another pid namespace"
    used = getattr(mine[0], "usedGpuMemory", None)
    return "pid seen, no memory figure" if used is None else f"yes, {int(used) // _MIB} MiB"


def _child(mode: str, env: dict[str, str | None]) -> dict[str, Any] | None:
    process = _start_child(mode, env)
    try:
        out, err = process.communicate(timeout=CHILD_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        print(f"- a child process asking torch ({mode}) did not answer in {CHILD_SECONDS} s")
        return None
    try:
        return dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        print(f"- a child process asking torch ({mode}) failed: {err.strip()[-300:]}")
        return None


def _start_child(mode: str, env: dict[str, str | None]) -> subprocess.Popen[str]:
    full = dict(os.environ)
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        env=full,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _end_child(process: subprocess.Popen[str]) -> None:
    try:
        process.communicate(input="\n", timeout=CHILD_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def _ask(nvml: Any, query: Any, *args: Any) -> Any:
    """NVML's answer, or the error's text."""
    try:
        return query(*args)
    except nvml.NVMLError as exc:
        return f"error: {exc}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bare(uuid: str) -> str:
    return uuid.removeprefix("GPU-").removeprefix("MIG-")


def _mib(memory: Any) -> str:
    return memory if isinstance(memory, str) else f"{int(memory.total) // _MIB}"


def _delta(before: Any, after: Any) -> str:
    if isinstance(before, str) or isinstance(after, str):
        return "unknown"
    used = int(before.used) // _MIB, int(after.used) // _MIB
    return f"{used[1] - used[0]} ({used[0]} -> {used[1]})"


if __name__ == "__main__":
    sys.exit(main())
