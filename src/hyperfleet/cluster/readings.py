"""A node's readings: its GPUs, CPU and memory, read by its agent and kept by the controller.

The agent reads its GPUs through the same monitor a single machine's controller uses
(:class:`~hyperfleet.resources.monitor.GpuMonitor`: NVML, fake GPUs, MPS), and the node's CPU
and memory, and each worker's CPU use, through psutil. It reads on a thread of its own, since
NVML can take seconds to answer about a GPU in trouble and the relay must not wait for it
(a relay that waits long enough misses its heartbeats and loses the node). The relay sends
the latest reading about once a second (:data:`READING_SECONDS`), which also serves as its
heartbeat. The controller keeps the latest reading of each node: the live view, status.json
and auto packing use it as they use the controller's own machine's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import replace

import psutil

from hyperfleet.cluster.messages import NodeReading
from hyperfleet.resources.inventory import Gpu
from hyperfleet.resources.monitor import GpuMonitor, GpuSample

READING_SECONDS = 1.0  # the controller's own machine is read once per tick, about as often
# A node whose readings stop this long (its NVML not answering) has GPUs nobody can read.
STALE_SECONDS = 5.0
STALE_PROBLEM = (
    f"its node has sent no reading for {STALE_SECONDS:g}s or more (NVML not answering there?)"
)
_MIB = 1024 * 1024


class NodeSampler:
    """Reads the node every ``every`` seconds on its own thread; :meth:`take` gives the newest
    reading not sent yet, with the GPU health changes of every reading since the last one."""

    def __init__(self, gpus: tuple[Gpu, ...], every: float = READING_SECONDS) -> None:
        self._monitor = GpuMonitor(gpus)
        # The node's worker processes now, worker id -> pid: set by each agent that joins.
        self.workers: Callable[[], dict[int, int]] = dict
        self._every = every
        self._lock = threading.Lock()
        self._latest: NodeReading | None = None
        self._problems: list[str] = []  # said by readings not sent yet
        self._processes: dict[int, psutil.Process] = {}  # by worker id, for CPU use between reads
        self._stop = threading.Event()
        psutil.cpu_percent(None)  # the first call starts the count: its answer means nothing
        self._thread = threading.Thread(target=self._run, name="hyperfleet-readings", daemon=True)
        self._thread.start()

    def take(self) -> NodeReading | None:
        """The newest reading, once; None when there is none new."""
        with self._lock:
            reading, self._latest = self._latest, None
            if reading is None:
                return None
            problems, self._problems = tuple(self._problems), []
        return NodeReading(
            reading.gpus,
            reading.cpu_percent,
            reading.memory_used_mib,
            reading.memory_total_mib,
            reading.workers_cpu,
            problems,
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)  # a read stuck in NVML: the daemon thread goes with us
        if not self._thread.is_alive():
            self._monitor.close()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            reading = self._read()
            with self._lock:
                self._latest = reading
                self._problems += reading.problems

    def _read(self) -> NodeReading:
        gpus = tuple(self._monitor.sample().values())
        problems = tuple(self._monitor.problems())
        memory = psutil.virtual_memory()
        return NodeReading(
            gpus,
            psutil.cpu_percent(None),
            int(memory.total - memory.available) // _MIB,
            int(memory.total) // _MIB,
            self._workers_cpu(),
            problems,
        )

    def _workers_cpu(self) -> dict[int, float]:
        """Each worker process's CPU use since the last reading, in per cent of one core (as
        the controller reads its own machine's workers); a worker just started has none yet."""
        pids = self.workers()
        for wid in [w for w in self._processes if w not in pids]:
            del self._processes[wid]
        used: dict[int, float] = {}
        for wid, pid in pids.items():
            process = self._processes.get(wid)
            with contextlib.suppress(psutil.Error):
                if process is None or process.pid != pid:
                    self._processes[wid] = psutil.Process(pid)
                    self._processes[wid].cpu_percent(None)
                    continue
                used[wid] = float(process.cpu_percent(None))
        return used


def node_gpus(reading: NodeReading, age: float) -> dict[int, GpuSample]:
    """The node's GPUs by index, as the reading ``age`` seconds old says them; once it is stale,
    each reads nothing and has a problem (the live view shows no figure, auto packing adds no
    worker), as a GPU its own machine's NVML cannot read."""
    if age <= STALE_SECONDS:
        return {sample.index: sample for sample in reading.gpus}
    return {
        sample.index: replace(
            sample,
            utilization_pct=None,
            memory_used_mib=None,
            process_mib=None,
            problem=sample.problem or STALE_PROBLEM,
        )
        for sample in reading.gpus
    }
