"""Fake GPUs whose memory and utilisation follow the trials running on them.

With ``HYPERFLEET_FAKE_GPUS=N`` and ``HYPERFLEET_FAKE_GPU_DIR=<folder>``, each fake GPU is the
folder ``<folder>/gpu<index>/``. An objective that calls :func:`work` (or holds :func:`hold`)
registers there, in a file named after its process, how much memory it takes and how busy it
keeps the GPU; :func:`read` sums the files of live processes, as NVML sums processes. A trial
whose memory would not fit next to what is there raises :class:`FakeOutOfMemoryError`, whose
message is CUDA's, and a GPU asked for more than 100 % of its time slows every trial on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from hyperfleet.resources.inventory import FAKE_GPU_DIR_ENV, fake_gpu_folder, fake_memory_mib
from hyperfleet.resources.slots import current_slot

_STEP_SECONDS = 0.02
SWITCH_COST = 0.9  # what is left of a saturating trial's speed when it shares the GPU


class FakeOutOfMemoryError(RuntimeError):
    """What ``torch.cuda.OutOfMemoryError`` would be on a real GPU."""


@dataclass(frozen=True)
class FakeReading:
    used_mib: int
    busy_pct: float
    by_pid: dict[int, int]  # memory each live process holds


def read(index: int) -> FakeReading | None:
    """What NVML would say of fake GPU ``index``; None without a state folder."""
    root = fake_gpu_folder()
    if root is None:
        return None
    with _locked(root / f"gpu{index}") as folder:
        holds = _live_holds(folder)
    by_pid = {pid: int(hold["mib"]) for pid, hold in holds.items()}
    busy = min(100.0, sum(float(hold["busy"]) for hold in holds.values()))
    return FakeReading(sum(by_pid.values()), busy, by_pid)


@contextlib.contextmanager
def hold(mib: int, busy_pct: float = 0.0, index: int | None = None) -> Iterator[None]:
    """Take ``mib`` of fake GPU ``index`` (the calling worker's own GPU by default) and keep
    it ``busy_pct`` busy until the block ends; raise FakeOutOfMemoryError if it does not fit."""
    folder = _gpu_folder(index)
    mine = folder / f"{os.getpid()}.json"
    with _locked(folder):
        used = sum(int(h["mib"]) for h in _live_holds(folder).values())
        total = fake_memory_mib()
        if used + mib > total:
            raise FakeOutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {mib} MiB (fake GPU; {total} MiB "
                f"total capacity; {used} MiB already allocated)"
            )
        mine.write_text(json.dumps({"mib": mib, "busy": busy_pct}))
    try:
        yield
    finally:
        with _locked(folder):
            mine.unlink(missing_ok=True)


def work(seconds: float, mib: int, busy_pct: float, saturates: bool = False) -> None:
    """A trial that needs ``seconds`` of a GPU to itself at ``busy_pct``: while the GPU is asked
    for more than 100 %, every trial on it advances proportionally slower, as on a real GPU.
    ``saturates``: the trial uses up something the utilisation does not show (memory
    bandwidth), so n trials sharing the GPU each run n times slower, however busy it reads,
    and a tenth slower again for the switches between them (as measured on an H100 for a
    large model: two workers 0.376 trials/s, one 0.386)."""
    index = _own_gpu()
    with hold(mib, busy_pct, index):
        done = 0.0
        last = time.monotonic()
        while done < seconds:
            asked, sharing = _demand(index)
            time.sleep(_STEP_SECONDS)
            speed = min(1.0, 100.0 / asked) if asked > 0 else 1.0
            if saturates:
                speed = 1.0 if sharing <= 1 else SWITCH_COST / sharing
            # Progress by the clock, not by steps: a process the machine's load delays does
            # not make the fake GPU slower.
            now = time.monotonic()
            done += (now - last) * speed
            last = now


def _demand(index: int) -> tuple[float, int]:
    """The sum of what the trials on the GPU ask for, uncapped (``read`` caps it at 100 as NVML
    does), and how many trials share it."""
    root = fake_gpu_folder()
    if root is None:
        return 0.0, 1
    with _locked(root / f"gpu{index}") as folder:
        holds = _live_holds(folder)
    return sum(float(h["busy"]) for h in holds.values()), len(holds)


def _own_gpu() -> int:
    gpus = current_slot().gpus
    if not gpus:
        raise RuntimeError("a fake GPU trial must run in a GPU slot (HYPERFLEET_FAKE_GPUS)")
    return gpus[0]


def _gpu_folder(index: int | None) -> Path:
    root = fake_gpu_folder()
    if root is None:
        raise RuntimeError(f"set {FAKE_GPU_DIR_ENV} to a folder for the fake GPUs' state")
    return root / f"gpu{_own_gpu() if index is None else index}"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _live_holds(folder: Path) -> dict[int, dict[str, float]]:
    """The holds of processes still alive (a killed trial's file is left behind)."""
    holds = {}
    for path in folder.glob("*.json"):
        pid = int(path.stem)
        if not psutil.pid_exists(pid):
            path.unlink(missing_ok=True)
            continue
        with contextlib.suppress(ValueError, OSError):
            holds[pid] = json.loads(path.read_text())
    return holds
