"""``RemoteTrial``: what the objective receives in a worker, in place of ``optuna.Trial``.

It subclasses ``optuna.Trial`` so that ``isinstance`` checks in user code and in
optuna-integration callbacks pass, and forwards every call to the real trial, which lives in
the controller (the only process that touches storage).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.study import StudyDirection

from hyperfleet.errors import ArtifactNotSeen
from hyperfleet.workers.artifact_files import written_file
from hyperfleet.workers.protocol import Call, Reply, StudyInfo


class Channel:
    """Request/reply over the worker's connection; a lock keeps threads' calls apart."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._held: collections.deque[Any] = collections.deque()

    def call(self, target: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.ask(Call(target, name, args, kwargs))

    def ask(self, call: Call) -> Any:
        with self._lock:
            self._conn.send(call)
            reply = self._reply()
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _reply(self) -> Reply:
        """The answer to the call just sent. The controller does not wait for a trial to end
        before it tells the worker other things (to release another study that has just
        ended): those wait here for the worker's loop, which reads them after the trial."""
        while True:
            message = self._conn.recv()
            if isinstance(message, Reply):
                return message
            self._held.append(message)

    def next_message(self) -> Any:
        """The worker's next instruction: those that came during the trial first."""
        return self._held.popleft() if self._held else self._conn.recv()

    def tell(self, target: str, name: str, *args: Any, **kwargs: Any) -> None:
        """A call already answered here, for the controller to record: no reply to wait for."""
        with self._lock:
            self._conn.send(Call(target, name, args, kwargs, answered=True))


class RemoteStudy:
    """``trial.study`` inside a worker: names and directions locally, the rest remotely."""

    _METHODS = frozenset({"set_user_attr", "get_trials", "enqueue_trial", "stop"})

    def __init__(self, channel: Channel, info: StudyInfo) -> None:
        self._channel = channel
        self._info = info
        self._study_id = info.study_id  # what Optuna's helpers pass to the storage

    @property
    def study_name(self) -> str:
        return self._info.study_name

    @property
    def directions(self) -> list[StudyDirection]:
        return [StudyDirection[d] for d in self._info.directions]

    @property
    def direction(self) -> StudyDirection:
        if len(self._info.directions) > 1:
            raise RuntimeError(
                "A single best trial cannot be retrieved from a multi-objective study. Consider "
                "using Study.directions to retrieve a list containing all directions."
            )
        return StudyDirection[self._info.directions[0]]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._METHODS:
            return lambda *args, **kwargs: self._channel.call("study", name, *args, **kwargs)
        return self._channel.call("study_attr", name)


def _same(distribution: Callable[[], BaseDistribution], sent: BaseDistribution) -> bool:
    """Whether the objective's arguments make the distribution a value was sampled from.
    Building it may fail (bad arguments): the controller's trial then raises Optuna's own error;
    or warn (a range adjusted to its step): the controller's trial warns too."""
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return distribution() == sent
    return False


class RemoteStorage:
    """``trial.storage`` inside a worker: the storage methods Optuna's helpers call about the
    running trial and its study, each a call the controller answers on the real storage (for
    that trial and study only)."""

    _METHODS = frozenset(
        {"set_trial_system_attr", "set_trial_user_attr", "set_study_system_attr",
         "set_study_user_attr", "get_trial", "get_trial_system_attrs", "get_trial_user_attrs",
         "get_study_system_attrs", "get_study_user_attrs"}
    )  # fmt: skip

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def __getattr__(self, name: str) -> Any:
        if name not in self._METHODS:
            raise AttributeError(
                f"hyperfleet: trial.storage.{name} is not available inside an objective run by "
                f"hyperfleet; available: {', '.join(sorted(self._METHODS))}"
            )
        return lambda *args, **kwargs: self._call(name, args, kwargs)

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call, with the file of the artifact it records if a file-system store of this
        worker wrote it: a file the controller cannot see is removed with its refused record,
        so that the store holds nothing no study names."""
        file = written_file(name, args, kwargs)
        try:
            return self._channel.ask(Call("storage", name, args, kwargs, artifact_file=file))
        except ArtifactNotSeen:
            if file is not None:
                with contextlib.suppress(OSError):
                    os.remove(file)
            raise


class RemoteTrial(optuna.Trial):
    """Behaves like ``optuna.Trial``; every call is answered by the controller's real trial,
    but a suggestion sent with the trial (``suggestions``), answered here and recorded there."""

    def __init__(
        self,
        channel: Channel,
        number: int,
        start: datetime.datetime | None,
        study: RemoteStudy,
        checkpoint_dir: str = "",
        suggestions: dict[str, tuple[BaseDistribution, Any]] | None = None,
        trial_id: int = -1,
    ) -> None:
        # optuna.Trial.__init__ would reach for storage; this object never does.
        self._channel = channel
        self._number = number
        self._trial_id = trial_id  # what Optuna's helpers pass to the storage
        # What Optuna's helpers (upload_artifact, the Terminator's scores) write this trial's
        # and its study's attributes through: each write goes to the controller.
        self.storage = RemoteStorage(channel)  # type: ignore[assignment]
        self._datetime_start = start
        self.study = study  # type: ignore[assignment]
        self._checkpoint_dir = checkpoint_dir  # see hyperfleet.checkpoint_dir
        self._suggestions = suggestions or {}
        self._told: set[str] = set()  # suggestions taken from there and reported
        self._asked: set[str] = set()  # names the controller answered: its value stays theirs

    def _answer_or_ask(
        self,
        method: str,
        name: str,
        distribution: Callable[[], BaseDistribution],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """The value sent for ``name`` when the objective asks for it with the distribution it
        was sampled from, the controller told once; else the controller's answer. A name the
        controller answered before keeps its value, as in Optuna, whatever was sent."""
        sent = self._suggestions.get(name)
        if sent is not None and name not in self._asked and _same(distribution, sent[0]):
            if name not in self._told:
                self._channel.tell("trial", method, name, *args, **kwargs)
                self._told.add(name)
            return sent[1]
        self._asked.add(name)
        return self._call(method, name, *args, **kwargs)

    def _stop_asked(self) -> bool:
        """Whether the controller wants running trials to stop soon (see hyperfleet.should_stop)."""
        return bool(self._channel.call("hyperfleet", "should_stop"))

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._channel.call("trial", name, *args, **kwargs)

    def _attr(self, name: str) -> Any:
        return self._channel.call("trial_attr", name)

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        def distribution() -> BaseDistribution:
            return FloatDistribution(low, high, log=log, step=step)

        return float(
            self._answer_or_ask("suggest_float", name, distribution, low, high, step=step, log=log)
        )

    def suggest_uniform(self, name: str, low: float, high: float) -> float:
        return float(self._call("suggest_uniform", name, low, high))

    def suggest_loguniform(self, name: str, low: float, high: float) -> float:
        return float(self._call("suggest_loguniform", name, low, high))

    def suggest_discrete_uniform(self, name: str, low: float, high: float, q: float) -> float:
        return float(self._call("suggest_discrete_uniform", name, low, high, q))

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        def distribution() -> BaseDistribution:
            return IntDistribution(low, high, log=log, step=step)

        return int(
            self._answer_or_ask("suggest_int", name, distribution, low, high, step=step, log=log)
        )

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:  # type: ignore[override]
        def distribution() -> BaseDistribution:
            return CategoricalDistribution(choices)

        return self._answer_or_ask("suggest_categorical", name, distribution, choices)

    def report(self, value: float, step: int) -> None:
        self._call("report", value, step)

    def should_prune(self) -> bool:
        return bool(self._call("should_prune"))

    def set_user_attr(self, key: str, value: Any) -> None:
        self._call("set_user_attr", key, value)

    def set_constraint(self, key: str, value: float) -> None:
        self._call("set_constraint", key, value)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._attr("params"))

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return dict(self._attr("distributions"))

    @property
    def user_attrs(self) -> dict[str, Any]:
        return dict(self._attr("user_attrs"))

    @property
    def constraints(self) -> dict[str, float]:
        return dict(self._attr("constraints"))

    @property
    def relative_params(self) -> dict[str, Any]:
        return dict(self._attr("relative_params"))

    @property
    def datetime_start(self) -> datetime.datetime | None:
        return self._datetime_start

    @property
    def number(self) -> int:
        return self._number

    def __repr__(self) -> str:
        return f"RemoteTrial(number={self._number})"
