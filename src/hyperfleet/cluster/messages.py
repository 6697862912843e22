"""What a controller and an agent say to each other over their one connection.

Everything travels as pickles over a ``multiprocessing.connection`` authenticated with the
run's token (see :mod:`hyperfleet.cluster.channel`). A worker's own messages are relayed as the
bytes the worker pickled, tagged with the worker's id, and never unpickled on the way.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from hyperfleet import __version__
from hyperfleet.cluster.sealed import protocol_fingerprint
from hyperfleet.cluster.trialfiles import TrialLogs
from hyperfleet.resources.inventory import Gpu, Inventory
from hyperfleet.resources.monitor import GpuSample
from hyperfleet.resources.slots import Slot
from hyperfleet.workers import protocol as worker_protocol
from hyperfleet.workers.protocol import ObjectiveSpec


def valid_node_name(name: object) -> bool:
    """A node's name goes into slot names (``node/gpu0#1``): no separators, no blanks."""
    return isinstance(name, str) and bool(name) and not any(c in name for c in "/# \t\n")


@dataclass(frozen=True)
class Hello:
    """An agent's first message: who it is and what its node has."""

    node: str
    inventory: Inventory
    pid: int
    sampling_processes: int = 0  # sampler processes the node offers (hyperfleet agent flag)


@dataclass(frozen=True)
class Welcome:
    """The controller's answer: the heartbeat both sides keep, in seconds, and the run
    directory the trial folders go in, with its id, for the agent to check it sees the same."""

    heartbeat: float
    node_timeout: float
    run_dir: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class Joined:
    """The agent's answer to the welcome: whether this node sees the controller's run
    directory (a disk both share); if not, the node's own folder its trials run in."""

    shares_run_dir: bool
    local_run_dir: str = ""


@dataclass(frozen=True)
class Refused:
    """The controller will not use this node; ``reason`` says why and what to change."""

    reason: str


@dataclass(frozen=True)
class StartWorker:
    worker: int  # the id every later message about this worker carries
    slot: Slot
    specs: dict[str, ObjectiveSpec]
    cwd: str  # the controller's run directory (a node without it uses its own folder)


@dataclass(frozen=True)
class WorkerStarted:
    worker: int
    pid: int


@dataclass(frozen=True)
class Relay:
    """One message to or from a worker, as the pickled bytes its sender wrote."""

    worker: int
    payload: bytes


@dataclass(frozen=True)
class Relays:
    """The relays of one step, in order, in one write: at hundreds of slots, a write (and a
    read at the other end) per worker message cost more than the messages themselves."""

    items: tuple[Relay | SamplerNews, ...]


@dataclass(frozen=True)
class WorkerExited:
    """A worker died on the node; ``kind`` and ``reason`` as a local worker's exit says them,
    ``outside_signal`` as :meth:`hyperfleet.workers.handle.WorkerHandle.outside_signal`."""

    worker: int
    kind: str
    reason: str
    outside_signal: str = ""


@dataclass(frozen=True)
class StopWorker:
    worker: int
    graceful: bool  # an idle worker may leave on its own; else killed with all it started


@dataclass(frozen=True)
class SignalWorker:
    """Signal the worker's process group and descendants (a trial's timeout)."""

    worker: int
    signum: int


@dataclass(frozen=True)
class StartSampler:
    """Start a sampler process on the node for a study's pool (see
    :mod:`hyperfleet.controller.sampler_pool`); ``setup`` is the process's first message as the
    pool pickled it (the study's sampler and directions, the process's index), passed on
    unread. ``sampler``: the id every later message about this process carries."""

    sampler: int
    setup: bytes


@dataclass(frozen=True)
class SamplerNews:
    """The study's news for sampler processes on the node, as the pool pickled it: one copy
    for all the node's processes it goes to."""

    samplers: tuple[int, ...]
    payload: bytes


@dataclass(frozen=True)
class SamplerSet:
    """A suggestion set a sampler process on the node made ready, as it pickled it."""

    sampler: int
    payload: bytes


@dataclass(frozen=True)
class StopSampler:
    sampler: int


@dataclass(frozen=True)
class SamplerEnded:
    """A sampler process on the node ended, or was never started (the node offers fewer):
    ``reason`` says which."""

    sampler: int
    reason: str


@dataclass(frozen=True)
class Beat:
    """Nothing to say: the sender is alive."""


@dataclass(frozen=True)
class NodeReading:
    """What the node's agent read of its machine, about once a second: each GPU as a single
    machine's monitor reads it (pids are the node's), the node's CPU and memory use, and the
    CPU use of each worker's process, by worker id."""

    gpus: tuple[GpuSample, ...]
    cpu_percent: float | None
    memory_used_mib: int
    memory_total_mib: int
    workers_cpu: dict[int, float]
    problems: tuple[str, ...] = ()  # a GPU's health changed since the last reading: one line


@dataclass(frozen=True)
class Goodbye:
    """The run is over: the agent stops its workers and exits with status 0."""


def _message_classes() -> list[type]:
    """Every class that travels between a controller and its agents, relayed worker messages
    included: what the two ends must agree on."""
    modules = (sys.modules[__name__], worker_protocol)
    classes = {
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value)
    }
    return [*classes | {TrialLogs, Gpu, GpuSample, Inventory, Slot}]


# hyperfleet's version and the messages' shapes: both ends of a channel must say the same.
PROTOCOL = f"{__version__}+{protocol_fingerprint(_message_classes())}"
