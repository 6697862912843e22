"""The one way a trial ends: :meth:`TrialEnds.tell` records it in the storage, repeats it where
the retry policy (or a GPU shared too tightly) says so, gives its slot's claims back, and
writes its files and the views' lines once that is committed."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from hyperfleet.controller import ahead, checkpoints
from hyperfleet.controller import bookkeeping as books
from hyperfleet.controller.callbacks import Callbacks
from hyperfleet.controller.context import RunContext
from hyperfleet.controller.slot_table import ActiveTrial, SlotState, SlotTable
from hyperfleet.controller.studies import StudyBook
from hyperfleet.controller.study_run import StudyRun, opened
from hyperfleet.controller.trial_starts import TrialStarts
from hyperfleet.display.events import TrialEnded
from hyperfleet.display.runstate import TrialRecord
from hyperfleet.store import schema
from hyperfleet.workers.protocol import Finished


class TrialEnds:
    def __init__(
        self, ctx: RunContext, slots: SlotTable, studies: StudyBook, starts: TrialStarts
    ) -> None:
        self._ctx, self._slots, self._studies, self._starts = ctx, slots, studies, starts
        self.callbacks = Callbacks(ctx)

    def finish(self, name: str, active: ActiveTrial, finished: Finished) -> bool:
        """Record how the objective ended (True: the trial failed); a next trial sent to the
        slot before this result was recorded (see controller.prepared) runs from now."""
        sent = self._slots.sent_next.pop(name, None)
        failed = self._tell_finished(name, active, finished)
        if sent is not None:
            self._starts.begin(name, sent)
        return failed

    def _tell_finished(self, name: str, active: ActiveTrial, finished: Finished) -> bool:
        study = opened(active.run)
        if finished.outcome == "pruned":
            self.tell(name, TrialState.PRUNED)
            return False
        if finished.outcome == "interrupted":
            self._tell_interrupted(name, active)
            return True
        if finished.outcome == "returned":
            values, problem = books.objective_values(study, finished.value)
            if values is not None:
                self.tell(name, TrialState.COMPLETE, values)
                return False
            self.tell(name, TrialState.FAIL, kind="error", reason=problem)
        elif finished.outcome == "error":
            kind, reason = _error_of(finished)
            self.tell(
                name, TrialState.FAIL, kind=kind, reason=reason, traceback_text=finished.traceback
            )
        else:
            reason = f"the result cannot be sent back: {finished.message}"
            self.tell(name, TrialState.FAIL, kind="error", reason=reason)
        return True

    def _tell_interrupted(self, name: str, active: ActiveTrial) -> None:
        """The objective raised TrialInterrupted: an interruption (repeated, from its
        checkpoint) when the run is stopping, else an error, which a policy must allow to
        repeat: a trial that interrupts itself unasked would otherwise run for ever."""
        if active.stop_asked or self.stop_asked(active):
            why = "SIGTERM"
            if self._slots.on_drained_node(name):
                why = f"node {self._slots.node_of(name)} is taken back by its engine"
            reason = f"interrupted: it stopped when asked to ({why}); its next attempt continues"
            self.tell(name, TrialState.FAIL, kind="interrupted", reason=reason)
            return
        reason = (
            "TrialInterrupted: the objective raised it although hyperfleet did not ask the trial "
            "to stop; raise it only after hyperfleet.should_stop(trial) answers True"
        )
        self.tell(name, TrialState.FAIL, kind="error", reason=reason)

    def stop_asked(self, active: ActiveTrial) -> bool:
        """True once SIGTERM has set a hard stop, or the trial's node is taken back: the trial
        should save and stop. A first Ctrl+C lets running trials finish: False then."""
        asked = self._ctx.stops.in_a_hurry or self._slots.on_drained_node(active.record.slot)
        active.stop_asked = active.stop_asked or asked
        return asked

    def tell(
        self,
        name: str,
        state: TrialState,
        values: Any = None,
        kind: str = "",
        reason: str = "",
        traceback_text: str = "",
    ) -> None:
        """End the slot's trial: the storage, its repeat, its claims, its files, the views."""
        rerun = state == TrialState.FAIL and self._shared_out_of_memory(name, kind, reason)
        active = self._slots.end(name)
        run = active.run
        study = opened(run)
        frozen = books.store_end(study, active.trial, state, values, kind, reason, traceback_text)
        run.trial_ended(time.monotonic())
        self._starts.pools.ended(run, frozen)
        if frozen.state == TrialState.COMPLETE:
            run.space = ahead.narrowed(run.space, frozen.distributions)
        if run.plan.timeout is not None:  # no extra write per trial for the others
            books.store_time_used(study, run.time_used(time.monotonic()))
        kind = str(frozen.system_attrs.get(schema.KIND_ATTR, kind))
        if rerun:
            books.rerun_with_more_room(study, frozen)
        retried = rerun or (
            frozen.state == TrialState.FAIL
            and books.maybe_retry(study, frozen, kind, self._ctx.settings.retry)
        )
        if retried:
            run.queue_unknown = True  # the repeat is enqueued: it goes before prepared trials
        else:
            run.finished += 1
        record = books.record_from_frozen(study.study_name, frozen)
        record.slot = name
        self._slot_idle(name, record)
        self._ctx.state.recent.appendleft(record)
        self._studies.count_trial_end(run, frozen)
        if frozen.state in checkpoints.ENDED:
            self._release_checkpoint(run, frozen)
        trial_dir = run.plan.folder.trial_dir(frozen.number)
        write = functools.partial(books.write_trial_files, trial_dir, record, traceback_text)
        self._ctx.after_commit(functools.partial(self._ctx.files.submit, write))
        self._ctx.emit_after_commit(TrialEnded(self._ctx.state, record))
        if run.plan.callbacks:  # as study.optimize gives them: the trial as stored now
            stored = study._storage.get_trial(frozen._trial_id)
            self.callbacks.trial_ended(run, self._studies.label(run), stored)

    def _release_checkpoint(self, run: StudyRun, trial: FrozenTrial) -> None:
        """Remove the checkpoint folder of a chain that ended, unless --keep-checkpoints keeps
        it; once the storage has the trial's end (a controller killed before that repeats the
        trial, which needs the folder). The Pareto front is settled by the end-of-run sweep."""
        keep = self._ctx.settings.keep_checkpoints
        folder: Path | None = run.plan.folder.checkpoint_dir(schema.first_attempt(trial))
        if keep == "all" or (keep == "best" and len(opened(run).directions) > 1):
            return
        if keep == "best" and run.view.best_number == trial.number:
            folder, run.best_checkpoint = run.best_checkpoint, folder  # the old best's goes
        if folder is None:
            return
        removal = functools.partial(checkpoints.remove, folder)
        self._ctx.after_commit(functools.partial(self._ctx.files.submit, removal))

    def _slot_idle(self, name: str, record: TrialRecord) -> None:
        view = self._slots.move(name, SlotState.IDLE)
        view.trial, view.study, view.since = None, None, None
        view.experiment = ""
        view.trials_done += 1
        view.busy_seconds += record.duration or 0.0

    def _shared_out_of_memory(self, name: str, kind: str, reason: str) -> bool:
        """A trial that ran out of memory beside others on its GPU runs again (see AutoPack);
        one out of the host's memory says nothing of its GPU."""
        autopack = self._ctx.autopack
        if autopack is None or kind != "oom" or self._ctx.stops.level:
            return False
        if reason.startswith(schema.HOST_OOM_REASON):
            return False
        gpu = autopack.gpu_of(name)
        sharing = sum(autopack.gpu_of(other) == gpu for other in self._slots.active)
        rerun = autopack.out_of_memory(name, sharing)
        if rerun:
            number = self._slots.active[name].record.number
            self._ctx.announce(
                f"trial {number} ran out of memory on {gpu} beside {sharing - 1} other "
                "trial(s): it runs again, with fewer beside it"
            )
        return rerun


def _error_of(finished: Finished) -> tuple[str, str]:
    """The kind and reason of a trial whose objective raised."""
    kind = schema.classify_error(finished.error_type, finished.message)
    reason = f"{finished.error_type}: {finished.message}"
    if kind == "oom":
        on = schema.out_of_memory_on(finished.error_type, finished.message)
        reason = f"{schema.HOST_OOM_REASON if on == 'host' else 'out of memory'}: {reason}"
    elif finished.error_type == "SystemExit":
        reason = f"the objective called {finished.message}"
    return kind, reason
