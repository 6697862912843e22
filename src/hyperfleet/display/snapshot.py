"""``RUN_DIR/status.json``: what only the controller knows, for ``hyperfleet status``.

The storage already says which trials ran and how they ended; what it cannot say is which slots
exist, how busy they have been and whether the controller is still alive. This sink writes that
every couple of seconds (atomically, so a reader never sees half a file) and once at the end.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from hyperfleet.display.events import Event, RunEnded, RunStarted, Tick, time_trials
from hyperfleet.display.runstate import NodeView, RunState, TrialClock
from hyperfleet.resources.monitor import GpuSample
from hyperfleet.store.rundir import STATUS_NAME, write_json

WRITE_EVERY_SECONDS = 2.0


class StatusSnapshot:
    """Writes status.json from the run's events: at the start, every ``every`` seconds of
    ticks, and once at the end; trial starts and ends measure the time trials ran."""

    def __init__(
        self,
        run_dir: Path,
        get_study: Callable[[], optuna.Study | None] = lambda: None,
        every: float = WRITE_EVERY_SECONDS,
    ) -> None:
        self._path = run_dir / STATUS_NAME
        self._get_study = get_study
        self._every = every
        self._last_write = 0.0
        self._clock = TrialClock()  # the time trials ran, which busy shares are of

    def handle(self, event: Event) -> None:
        time_trials(self._clock, event)
        match event:
            case RunStarted(state):
                self._write(state, ended=False)
            case Tick(state) if time.monotonic() - self._last_write >= self._every:
                self._write(state, ended=False)
            case RunEnded(state):
                self._write(state, ended=True)

    def _write(self, state: RunState, ended: bool) -> None:
        if state.nothing_to_run and self._path.exists():
            return  # the last run's record (its slots and busy time) stays
        self._last_write = time.monotonic()
        running = self._clock.seconds(time.time())
        write_json(self._path, snapshot(state, self._get_study(), ended, running), compact=True)


def last_update(run_dir: Path) -> float | None:
    """When the controller that wrote ``run_dir``'s status.json last wrote it (a Unix time), or
    None: read before this run writes its own, it tells when a dead controller was last alive."""
    try:
        updated = json.loads((run_dir / STATUS_NAME).read_text()).get("updated")
    except (OSError, ValueError, AttributeError):
        return None
    return float(updated) if isinstance(updated, (int, float)) else None


def snapshot(
    state: RunState, study: optuna.Study | None, ended: bool, running: float | None = None
) -> dict[str, Any]:
    """What status.json holds; ``running``: the time trials ran so far (see TrialClock)."""
    now = time.time()
    return {
        "run_name": state.run_name,
        "run_dir": state.run_dir,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": state.started,
        "updated": now,
        "running_s": running,
        "ended": ended,
        "stopping": state.stopping,
        "timeout": state.timeout,
        "storage": describe_storage(study) if study is not None else None,
        "studies": [
            {"name": s.name, "directions": list(s.directions), "n_trials": s.n_trials}
            for s in state.studies
        ],
        "slots": [
            {
                "name": slot.name,
                "kind": slot.kind,
                "gpus": list(slot.gpus),
                "state": slot.state,
                "trial": slot.trial,
                "study": slot.study,
                "since": slot.since,
                "trials_done": slot.trials_done,
                "busy_seconds": slot.busy_seconds,
                "cpu_percent": slot.cpu_percent,
            }
            for slot in state.slots
        ],
        "nodes": [node_snapshot(node) for node in state.nodes.values()],
    }


def node_snapshot(node: NodeView) -> dict[str, Any]:
    """A node an agent joined from, with its newest readings."""
    return {
        "name": node.name,
        "where": node.where,
        "state": node.state,
        "cores": node.cores,
        "cpu_percent": node.cpu_percent,
        "memory_used_mib": node.memory_used_mib,
        "memory_total_mib": node.memory_total_mib,
        "updated": node.updated,
        "gpus": [gpu_snapshot(sample) for _, sample in sorted(node.gpus.items())],
    }


def gpu_snapshot(sample: GpuSample) -> dict[str, Any]:
    return {
        "index": sample.index,
        "utilization_pct": sample.utilization_pct,
        "memory_used_mib": sample.memory_used_mib,
        "memory_total_mib": sample.memory_total_mib,
        "problem": sample.problem,
    }


def describe_storage(study: optuna.Study) -> str | None:
    """What ``open_storage`` needs to open the same storage from another process: a journal
    file's path or a database URL; None for in-memory storage (nothing to reopen)."""
    storage: Any = study._storage  # no public accessor
    if isinstance(storage, optuna.storages.JournalStorage):
        path = getattr(storage._backend, "_file_path", None)
        return str(path) if path is not None else None
    inner = getattr(storage, "_backend", storage)  # RDB storages come in a caching wrapper
    url = getattr(inner, "url", None)
    return url if isinstance(url, str) else None
