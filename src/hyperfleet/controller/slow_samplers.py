"""Suggestions of slow samplers, computed off the controller's thread.

The controller serves every slot from one thread. Optuna's GP sampler spends a good part of a
second per suggestion fitting its model and maximising its acquisition function (more as the
study grows), time during which no other slot would get its next trial, an answer to a
suggestion, or its result told. For such a sampler a freed slot's trial is prepared here:

1. In the loop's thread, :meth:`Suggestions.start` takes a snapshot of the study's trials (the
   storage is read there, like every other read) and starts a thread.
2. The thread runs the part of ``study.ask()`` that costs, ``infer_relative_search_space`` and
   ``sample_relative``, on a view of the study that holds the snapshot and records, instead of
   writing, what the sampler stores on the new trial (GP keeps its suggestion in the trial's
   system attributes, so that the next suggestions know where a running trial will be). The
   trial does not exist yet: the running trials the sampler sees leave it out, as in a plain
   ask, where the new trial has no parameters yet when the sampler runs.
3. The thread wakes the loop, which asks with the study's sampler wrapped to hand back what was
   computed (:meth:`Prepared.ask`): the trial is created there, in the loop's thread, so a stop
   simply drops a computation in flight and leaves no trial RUNNING for it.

One computation at a time per study: the next one starts once the last was taken, so it sees
that trial among the running ones (GP's qLogEI conditions on it) instead of suggesting the same
point. Results that arrive meanwhile are not in the snapshot: the suggestion is as if asked
when the computation started.

Thread safety: the thread reads no trials from the storage (the snapshot; Optuna's in-memory
and journal storages, hyperfleet's included, copy a trial when they change it, so a shallow
snapshot stays as it was, and any other storage's is deep-copied). Other reads a sampler makes
(study attributes) go to the storage, whose every method holds the storage's own lock in
Optuna's storages; hyperfleet's journal appends and replays inside that lock too, and its
commit (an ``fdatasync``) touches only the file descriptor. Writes other than the new trial's
system attributes are refused in the thread; the trial is then asked the plain way.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.storages import InMemoryStorage, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.sampling.auto_sampler import AutoSampler
from hyperfleet.sampling.delegating import DelegatingSampler
from hyperfleet.sampling.pending import PendingTrialsSampler, TrialsView
from hyperfleet.store.placing import running_trial

_NEW_TRIAL_ID = -1  # the trial being prepared, which the storage has not created yet


def suggests_slowly(sampler: BaseSampler) -> bool:
    """Whether the sampler's suggestions are prepared off the loop's thread: Optuna's GP (the
    auto sampler once it chose GP, either wrapped in PendingTrialsSampler too). Every other
    sampler is asked in the loop, as fast as ever."""
    if isinstance(sampler, PendingTrialsSampler):
        return suggests_slowly(sampler.base)
    if isinstance(sampler, AutoSampler):
        return suggests_slowly(sampler.current)
    return isinstance(sampler, optuna.samplers.GPSampler)


@dataclass
class Prepared:
    """A relative sample computed for the study's next trial (``error``: it failed)."""

    search_space: dict[str, BaseDistribution] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    system_attrs: dict[str, Any] = field(default_factory=dict)  # to write on the new trial
    error: BaseException | None = None

    def ask(self, study: optuna.Study) -> optuna.Trial:
        """``study.ask()``, with the sampler's relative sample taken from here (a failed
        computation: the plain ask, where the sampler's error shows as it would anyway)."""
        if self.error is not None:
            return study.ask()
        sampler = study.sampler
        study.sampler = _HandBack(sampler, self)
        try:
            trial = study.ask()
            _ = trial.relative_params  # Optuna samples lazily: now, from the hand-back sampler
        finally:
            study.sampler = sampler
        return trial


class Suggestions:
    """At most one computation per study (by key) in flight or ready; ``wake`` is called from
    the computing thread when one is ready."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._ready: dict[str, Prepared] = {}

    def start(self, key: str, study: optuna.Study) -> None:
        """Prepare the study's next trial, unless it is being prepared or is ready."""
        with self._lock:
            if key in self._in_flight or key in self._ready:
                return
            self._in_flight.add(key)
        view = _SnapshotStudy(study)
        thread = threading.Thread(
            target=self._compute, args=(key, view), name=f"hyperfleet-sample-{key}", daemon=True
        )
        thread.start()

    def ready(self, key: str) -> bool:
        with self._lock:
            return key in self._ready

    def take(self, key: str) -> Prepared | None:
        with self._lock:
            return self._ready.pop(key, None)

    def _compute(self, key: str, view: _SnapshotStudy) -> None:
        prepared = prepare(view)
        with self._lock:
            self._in_flight.discard(key)
            self._ready[key] = prepared
        self._wake()


def prepare(view: _SnapshotStudy) -> Prepared:
    """The relative sample of the study's next trial, from its snapshot."""
    sampler, trial = view.sampler, view.new_trial
    try:
        space = sampler.infer_relative_search_space(view, trial)
        params = sampler.sample_relative(view, trial, space)
    except Exception as exc:  # the loop asks the plain way; the error shows there
        return Prepared(error=exc)
    return Prepared(space, params, dict(view.recorder.system_attrs))


class _SnapshotStudy(TrialsView):
    """The study as its sampler sees it in the computing thread: the trials of the moment it
    was made, the new trial's system attributes recorded rather than written."""

    def __init__(self, study: optuna.Study) -> None:
        trials = study._get_trials(deepcopy=False)
        if not isinstance(study._storage, InMemoryStorage | JournalStorage):
            trials = copy.deepcopy(trials)  # a storage that may change its trials in place
        super().__init__(study, trials)
        self.new_trial = running_trial(number=len(trials), trial_id=_NEW_TRIAL_ID)
        self.recorder = _Recorder(study._storage, [*trials, self.new_trial])
        # Duck-typed: it answers what samplers call, and refuses the rest.
        self._storage = self.recorder  # type: ignore[assignment]


class _Recorder:
    """The storage as the computing thread sees it: trials from the snapshot, the new trial's
    system attributes kept here, other reads from the storage, other writes refused."""

    def __init__(self, storage: Any, trials: list[FrozenTrial]) -> None:
        self._storage = storage
        self._trials = {t._trial_id: t for t in trials}
        self.system_attrs: dict[str, Any] = {}

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id != _NEW_TRIAL_ID:
            raise _WriteRefused(f"a sampler wrote on trial {trial_id} while suggesting")
        self.system_attrs[key] = value

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return copy.deepcopy(self._trials[trial_id])

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        trials = [
            t
            for i, t in self._trials.items()
            if i != _NEW_TRIAL_ID and (states is None or t.state in states)
        ]
        return copy.deepcopy(trials) if deepcopy else trials

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("set_", "create_", "delete_", "check_trial")):
            raise _WriteRefused(f"a sampler called the storage's {name} while suggesting")
        return getattr(self._storage, name)


class _WriteRefused(RuntimeError):
    """A sampler wrote to the storage from the computing thread: the trial is asked the plain
    way instead (never shown to users: the plain ask makes the same writes)."""


class _HandBack(DelegatingSampler):
    """The study's sampler, except that the relative sample is the one prepared."""

    def __init__(self, base: BaseSampler, prepared: Prepared) -> None:
        super().__init__(base)
        self._prepared = prepared

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._prepared.search_space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        for key, value in self._prepared.system_attrs.items():
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
        return dict(self._prepared.params)
