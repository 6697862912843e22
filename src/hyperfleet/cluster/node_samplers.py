"""The sampler processes an agent runs on its node for the controller's pools.

A node whose cores do not all run workers can lend them to TPE's sampling: ``hyperfleet agent
--sampling-processes N`` offers N processes in its hello, and the controller asks for them as
its studies' pools start (see :mod:`hyperfleet.controller.sampler_pool`). Each is the process the
controller's machine runs (:mod:`hyperfleet.sampling.replica`), started and fed the same way
(:mod:`hyperfleet.sampling.replica_process`): the agent passes the controller's setup and
news to it unread, and sends each set it makes back as the process pickled it. The agent never
unpickles a sampler, and never runs more processes than it offered: a start beyond that is
refused and said on its output. A process that dies is reported, and the controller samples
without it; the agent's end ends them all.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hyperfleet.cluster.messages import SamplerEnded, SamplerNews, SamplerSet, StartSampler
from hyperfleet.sampling.replica_process import CLOSE_SECONDS, ReplicaProcess


class NodeSamplers:
    def __init__(self, offered: int, log_dir: Path, node: str) -> None:
        self._offered, self._log_dir, self._node = offered, log_dir, node
        self._running: dict[int, ReplicaProcess] = {}  # by the controller's id
        self._ending: list[ReplicaProcess] = []  # hung up, reaped at the end

    def start(self, message: StartSampler) -> SamplerEnded | None:
        """Start the process the controller asks for; the refusal, if this node will not."""
        if len(self._running) >= self._offered:
            return self._refuse(
                message.sampler,
                f"node {self._node} offers {self._offered} sampler processes (hyperfleet agent "
                f"--sampling-processes) and runs {len(self._running)}",
            )
        log = self._log_dir / f"sampler-{message.sampler}.log"
        try:
            process = ReplicaProcess(message.setup, log, f"node-sampler-{message.sampler}")
        except OSError as exc:
            return self._refuse(message.sampler, f"could not start a process ({exc})")
        self._running[message.sampler] = process
        return None

    def _refuse(self, sampler: int, reason: str) -> SamplerEnded:
        print(f"hyperfleet agent {self._node}: refused a sampler process: {reason}", flush=True)
        return SamplerEnded(sampler, f"refused: {reason}")

    def forward(self, message: SamplerNews) -> None:
        for sampler in message.samplers:
            process = self._running.get(sampler)
            if process is not None:
                process.send_bytes(message.payload)

    def stop(self, sampler: int) -> None:
        process = self._running.pop(sampler, None)
        if process is not None:
            process.hang_up()
            self._ending.append(process)

    def waitables(self) -> list[Connection]:
        return [process.conn for process in self._running.values()]

    def read(self, ready: list[Any]) -> list[SamplerSet | SamplerEnded]:
        """What the processes that are ``ready`` said, for the controller: their sets, and the
        end of those that exited."""
        said: list[SamplerSet | SamplerEnded] = []
        for sampler, process in list(self._running.items()):
            if process.conn not in ready:
                continue
            try:
                while process.conn.poll():
                    said.append(SamplerSet(sampler, process.conn.recv_bytes()))
            except (EOFError, OSError):
                self.stop(sampler)
                said.append(SamplerEnded(sampler, "its sampler process exited"))
        return said

    def close(self) -> None:
        """End every process: all hung up at once, then waited for together."""
        for sampler in list(self._running):
            self.stop(sampler)
        deadline = time.monotonic() + CLOSE_SECONDS
        for process in self._ending:
            process.reap(deadline)
        self._ending.clear()
