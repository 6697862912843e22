"""Optuna's callbacks, run by the controller as ``study.optimize`` runs them.

Each callback is called with ``(study, frozen_trial)`` once per finished trial (complete,
pruned or failed, a copy of the trial as stored), in the order trials finish, on the
controller's thread: the study it gets is the real one, so ``study.get_trials()``,
``study.best_trial`` and ``study.stop()`` mean what they mean in Optuna. A slow callback holds
the loop (as it holds Optuna's own loop): keep callbacks quick.

``study.stop()``, from a callback or from the objective (``trial.study.stop()``), stops handing
out that study's trials; running trials finish, as with Optuna's ``n_jobs``, and the run ends as
stopped: running the same command again carries on. A callback that raises stops the run the
same way, and ``hyperfleet.optimize`` raises its exception once nothing runs any more, as
``study.optimize`` does.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.controller.context import RunContext
from hyperfleet.controller.study_run import Callback, StudyRun, opened
from hyperfleet.errors import ConfigError


class Callbacks:
    """Calls the studies' callbacks, and turns ``study.stop()`` into a stop of that study."""

    def __init__(self, ctx: RunContext) -> None:
        self._ctx = ctx
        self.error: BaseException | None = None  # the first a callback raised

    def trial_ended(self, run: StudyRun, label: str, frozen: FrozenTrial) -> None:
        if not run.plan.callbacks:
            return
        study = opened(run)
        with allow_stop(study):
            for callback in run.plan.callbacks:
                try:
                    callback(study, copy.deepcopy(frozen))
                except Exception as exc:
                    self._raised(label, callback, exc)
        self.check_stop(run, label)

    def check_stop(self, run: StudyRun, label: str) -> None:
        """Say once that ``study.stop()`` was called: the study starts no more trials."""
        study = run.study
        if study is None or not study._stop_flag or run.stop_said:
            return
        run.stop_said = True
        self._ctx.announce(
            f"{label}: study.stop() was called: no new trials; running trials finish, and "
            "running the same command again carries on"
        )

    def _raised(self, label: str, callback: Callback, exc: Exception) -> None:
        name = getattr(callback, "__qualname__", type(callback).__qualname__)
        self._ctx.announce(
            f"{label}: the callback {name} raised {type(exc).__name__}: {exc}; no new trials: "
            "running trials finish, then the run ends with this error"
        )
        if self.error is None:
            self.error = exc
        self._ctx.stops.request(hard=False, grace=None)


@contextlib.contextmanager
def allow_stop(study: optuna.Study) -> Iterator[None]:
    """Let ``study.stop()`` be called (Optuna allows it only inside its optimize loop)."""
    before = getattr(study._thread_local, "in_optimize_loop", False)
    study._thread_local.in_optimize_loop = True
    try:
        yield
    finally:
        study._thread_local.in_optimize_loop = before


def check_callbacks(callbacks: object, where: str) -> tuple[Callback, ...]:
    """The callbacks as a tuple; anything that is not a list of callables is refused."""
    if callbacks is None:
        return ()
    if callable(callbacks) or isinstance(callbacks, str | bytes):
        raise ConfigError(
            f"{where}: callbacks must be a list of callables, as in study.optimize; wrap the "
            "one you have in a list: callbacks=[cb]"
        )
    try:
        found = tuple(cast(Iterable[Any], callbacks))
    except TypeError:
        raise ConfigError(
            f"{where}: callbacks must be a list of callables, not {type(callbacks).__name__}"
        ) from None
    for callback in found:
        if not callable(callback):
            raise ConfigError(
                f"{where}: callback {callback!r} is not callable; a callback is a function "
                "called with (study, frozen_trial)"
            )
    return found


def load_callback(text: str, where: str) -> Callback:
    """The callback ``MODULE:ATTR`` or ``FILE.py:ATTR`` names, imported in the controller."""
    location, _, attr = text.rpartition(":")
    if not location or not attr:
        raise ConfigError(f"{where} {text!r}: give MODULE:ATTR or FILE.py:ATTR")
    try:
        if location.endswith(".py"):
            file = Path(location).resolve()
            spec = importlib.util.spec_from_file_location(f"hyperfleet_callback_{file.stem}", file)
            if spec is None or spec.loader is None or not file.is_file():
                raise ImportError(f"no file {location}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a module of the folder the run starts in
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(location)
    except Exception as exc:  # the user's module, whatever it raises
        raise ConfigError(
            f"{where} {text!r} could not be imported: {type(exc).__name__}: {exc}; check the "
            "name, and that the module imports on its own"
        ) from None
    callback = getattr(module, attr, None)
    if not callable(callback):
        raise ConfigError(
            f"{where} {text!r}: {location} has no callable {attr!r}; a callback is a function "
            "(or an object with __call__) called with (study, frozen_trial)"
        )
    return cast(Callback, callback)
