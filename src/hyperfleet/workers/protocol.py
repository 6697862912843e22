"""Messages between the controller and a worker, sent as pickles over a socket pair.

The controller owns the real ``optuna.Trial``; the worker's ``RemoteTrial`` turns each method
call into a :class:`Call` and waits for the :class:`Reply`, except the suggestions sent with
the trial, which it answers itself and reports without waiting.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

# A worker's marks for its agent on a node without the run directory (see
# :mod:`hyperfleet.workers.nodefolder`), sent as raw bytes on the worker's connection; the agent
# relays everything else without reading it. Never a pickle, which starts with b"\x80" (and
# nothing a worker sends is pickled with protocol 0).
TRIAL_STARTED = b"\x00hyperfleet:trial-started:"
TRIAL_ENDED = b"\x00hyperfleet:trial-ended"


@dataclass(frozen=True)
class ObjectiveSpec:
    """How a worker finds the objective.

    ``kind`` is "pickle" (``payload`` holds the pickled callable), "file" (``location`` is a
    path to a Python file) or "module" (``location`` is an importable module name); for the last
    two ``name`` is the attribute to take. With ``factory_kwargs`` set, the attribute is a
    factory called once per worker with them, and returns the objective. ``module_files`` maps
    the modules a pickle names that cannot be imported by name (loaded from a file with
    ``importlib.util.spec_from_file_location``) to their files, imported first under that name.
    """

    kind: str
    name: str = ""
    location: str = ""
    payload: bytes = b""
    main_preparation: dict[str, Any] | None = None  # multiprocessing.spawn data for __main__
    factory_kwargs: dict[str, Any] | None = None
    module_files: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "pickle":
            return self.name or "objective"
        return f"{self.location}:{self.name}"


@dataclass(frozen=True)
class WorkerSetup:
    """The objectives of every study that may use this worker's slot, by study name. The worker
    loads none of them before it says it is ready: each is loaded when the controller sends
    :class:`Load`, before the study's first trial on this slot, and dropped at :class:`Release`,
    once the study has nothing left to run."""

    objectives: dict[str, ObjectiveSpec]
    slot_name: str


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Load:
    study: str


@dataclass(frozen=True)
class Loaded:
    study: str


@dataclass(frozen=True)
class Release:
    study: str


@dataclass(frozen=True)
class LoadFailed:
    message: str
    traceback: str
    study: str = ""


@dataclass(frozen=True)
class StudyInfo:
    """What ``trial.study`` answers without a round trip."""

    study_name: str
    directions: tuple[str, ...]
    study_id: int = -1  # the storage's id of the study (Optuna's helpers pass it back)


@dataclass(frozen=True)
class RunTrial:
    objective: str  # the study's name: which of the worker's objectives to call
    number: int
    trial_dir: str
    datetime_start: datetime.datetime | None
    study: StudyInfo
    user_attrs: dict[str, Any] = field(default_factory=dict)
    # The folder this trial shares with its repeats (made when the objective asks for it).
    checkpoint_dir: str = ""
    # Values sampled when the trial was sent, by parameter with their distribution: a suggest
    # of that name and distribution takes its value from here (see hyperfleet.controller.ahead).
    suggestions: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    trial_id: int = -1  # the storage's id of the trial (Optuna's helpers pass it back)


@dataclass(frozen=True)
class Call:
    """A method call on the real trial ("trial") or study ("study") in the controller, or a
    question for the controller itself ("hyperfleet": ``should_stop``). ``answered``: a
    suggestion the worker took from :attr:`RunTrial.suggestions`, which the controller records
    without a reply. ``artifact_file``: with a storage call that records an artifact, the file a
    file-system artifact store wrote for it in the worker (the controller checks it sees it)."""

    target: str
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    answered: bool = False
    artifact_file: str | None = None


@dataclass(frozen=True)
class Reply:
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Finished:
    """How the objective ended.

    ``outcome`` is "returned" (``value`` holds what it returned), "pruned", "interrupted" (it
    raised :class:`~hyperfleet.errors.TrialInterrupted`), "error" (it raised;
    ``error_type``, ``message`` and ``traceback`` say what) or "unsendable" (it returned
    something that cannot be pickled; ``message`` holds its repr).
    """

    outcome: str
    value: Any = None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    # The most GPU memory torch reserved during the trial, for auto packing (None: no torch
    # on a GPU); what torch says is exact where NVML's per-process figures may be missing.
    gpu_peak_mib: int | None = None


@dataclass(frozen=True)
class Shutdown:
    pass
