"""Answering what an objective calls on its trial and study: the controller runs the call on the
real trial (so Optuna's sampler and storage see it as in ``study.optimize``) and sends back the
value, or the very exception Optuna raised. What may be called is in
:mod:`hyperfleet.controller.calls`."""

from __future__ import annotations

from typing import Any

from hyperfleet.controller import ahead
from hyperfleet.controller.artifact_check import check_artifact_seen
from hyperfleet.controller.callbacks import allow_stop
from hyperfleet.controller.calls import check_call_allowed, storage_target_id
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.outbox import send
from hyperfleet.controller.slot_table import ActiveTrial, SlotTable
from hyperfleet.controller.studies import StudyBook
from hyperfleet.controller.study_run import opened
from hyperfleet.controller.trial_ends import TrialEnds
from hyperfleet.workers.handle import Worker
from hyperfleet.workers.protocol import Call, Reply

ENQUEUING = frozenset({"enqueue_trial", "add_trial", "add_trials"})  # study calls that queue


class CallAnswers:
    def __init__(
        self, ctx: RunContext, slots: SlotTable, studies: StudyBook, ends: TrialEnds
    ) -> None:
        self._ctx, self._slots, self._studies, self._ends = ctx, slots, studies, ends

    def answer(self, name: str, worker: Worker, call: Call) -> None:
        """Answer the call of the slot's trial; a call the worker answered from the
        suggestions sent with its trial is only recorded. A worker whose connection fails
        raises ConnectionError (its exit is handled by the loop)."""
        if call.answered:
            self._record_answered(name, call)
            return
        reply = self._reply(self._slots.active.get(name), call)
        try:
            sent = send(worker, reply)
        except Exception as exc:  # an unpicklable value or error: say so instead
            sent = send(worker, Reply(error=RuntimeError(f"hyperfleet: cannot send reply: {exc}")))
        if not sent:
            raise ConnectionError(f"the worker of slot {name} is gone")

    def _reply(self, active: ActiveTrial | None, call: Call) -> Reply:
        try:
            if active is None:
                raise RuntimeError(f"hyperfleet: no trial is running for call {call.name!r}")
            check_call_allowed(call)
            if call.target == "study" and call.name in ENQUEUING:
                active.run.queue_unknown = True  # it goes before prepared trials
            return Reply(value=self._call_value(active, call))
        except OSError:
            raise  # the storage itself failed (a full disk): nothing more can be recorded
        except Exception as exc:  # the objective gets the very exception Optuna raised
            return Reply(error=exc)

    def _record_answered(self, name: str, call: Call) -> None:
        """Record a suggestion the worker took from those sent with its trial, through the
        trial's own suggest, with the sampler answering the value sent."""
        active = self._slots.active.get(name)
        if active is None:
            return  # its trial ended meanwhile (a timeout): nothing left to record it on
        study = opened(active.run)
        sampler = study.sampler
        study.sampler = ahead.Answers(sampler, active.suggestions)
        try:
            check_call_allowed(call)
            self._call_value(active, call)
        except OSError:
            raise  # the storage itself failed (a full disk): nothing more can be recorded
        except Exception as exc:  # not expected: the value was sampled for this very call
            self._ctx.announce(
                f"trial {active.trial.number}: its suggestion {call.args[:1]} could not be "
                f"recorded: {type(exc).__name__}: {exc}"
            )
        finally:
            study.sampler = sampler

    def _stop_study(self, active: ActiveTrial) -> None:
        """``trial.study.stop()`` in the objective: as in Optuna, the study starts no more
        trials once this one ends; running ones finish."""
        study = opened(active.run)
        with allow_stop(study):
            study.stop()
        self._ends.callbacks.check_stop(active.run, self._studies.label(active.run))

    @staticmethod
    def _storage_call(active: ActiveTrial, call: Call) -> Any:
        """A storage method called through ``trial.storage``, about this trial or its study:
        ids of others are refused (the objective writes only what Optuna lets a trial write)."""
        study = opened(active.run)
        kind, named = storage_target_id(call)
        own = active.trial._trial_id if kind == "trial" else study._study_id
        if named != own:
            raise ValueError(
                f"hyperfleet: trial.storage.{call.name} was called with {kind} id {named!r}; an "
                f"objective may only reach its own {kind} ({kind} id {own}) through it"
            )
        check_artifact_seen(call, active.record.slot)
        return getattr(study._storage, call.name)(*call.args, **call.kwargs)

    def _call_value(self, active: ActiveTrial, call: Call) -> Any:
        if call.target == "hyperfleet":  # should_stop, the only question for the controller
            return self._ends.stop_asked(active)
        if call.name == "report" and _reported_step(call) in active.inherited_steps:
            return None  # an earlier attempt reported this step; its value stays, as in Optuna
        if call.target == "study" and call.name == "stop":
            return self._stop_study(active)
        if call.target == "storage":
            return self._storage_call(active, call)
        target: Any = active.trial if call.target.startswith("trial") else active.run.study
        attr = getattr(target, call.name)
        return attr if call.target.endswith("_attr") else attr(*call.args, **call.kwargs)


def _reported_step(call: Call) -> int | None:
    """The step of a ``trial.report(value, step)`` call, as the objective passed it."""
    step: Any = call.kwargs.get("step", call.args[1] if len(call.args) > 1 else None)
    try:
        return int(step)
    except (TypeError, ValueError):
        return None  # Optuna's own report refuses it, with its own message
