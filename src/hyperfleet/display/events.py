"""Events the controller emits, and the plain-line log that listens to them.

A sink overrides only what it needs (every hook has an empty default). The live view, the
plain log and the run folder's ``run.log`` are all sinks of the same events.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from hyperfleet.display.runstate import RunState, StudyView, TrialRecord


class EventSink:
    def on_start(self, state: RunState) -> None:
        pass

    def on_trial_start(self, state: RunState, record: TrialRecord) -> None:
        pass

    def on_trial_end(self, state: RunState, record: TrialRecord) -> None:
        pass

    def on_message(self, state: RunState, text: str) -> None:
        """A one-line notice: stopping, a worker restarted, a GPU missing."""

    def on_tick(self, state: RunState) -> None:
        """About once a second, for views that refresh."""

    def on_end(self, state: RunState) -> None:
        pass


def format_values(values: list[float] | None) -> str:
    if values is None:
        return "-"
    return ", ".join(f"{v:.6g}" for v in values)


def trial_name(record: TrialRecord, state: RunState) -> str:
    """ "trial 7", or "trial 7 of xgb-iris" when the run has several studies."""
    several = len(state.studies) > 1
    text = f"trial {record.number}" + (f" of {record.study}" if several else "")
    return text + (f" (experiment {record.experiment})" if record.experiment else "")


def trial_start_line(record: TrialRecord, state: RunState) -> str:
    retry = f" (repeats trial {record.retry_of})" if record.retry_of is not None else ""
    return f"{trial_name(record, state)} started on {record.slot}{retry}"


def trial_end_line(record: TrialRecord, state: RunState) -> str:
    took = f" in {record.duration:.1f}s" if record.duration is not None else ""
    text = f"{trial_name(record, state)} {record.state.lower()} on {record.slot}{took}"
    if record.state == "COMPLETE":
        text += f": {format_values(record.values)} {record.params}"
    elif record.reason:
        text += f": {record.reason}"
    return text


class PlainLog(EventSink):
    """Timestamped lines, one per trial start and end, for files, pipes and CI logs.

    Trial lines are flushed with the controller's tick (about once a second), notices at once:
    a flush per trial would cost the controller a system call per line for short trials.
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._quiet = quiet

    def _line(self, text: str, summary: bool = False, flush: bool = True) -> None:
        if self._quiet and not summary:  # --quiet still prints the final summary
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._stream.write(f"{stamp} {text}\n")
        if flush:
            self._stream.flush()

    def on_tick(self, state: RunState) -> None:
        self._stream.flush()

    def on_start(self, state: RunState) -> None:
        if state.nothing_to_run:
            return  # the budget lines said so; no slot is used
        slots = ", ".join(s.name for s in state.slots)
        self._line(f"run {state.run_name} in {state.run_dir} on {len(state.slots)} slots: {slots}")

    def on_trial_start(self, state: RunState, record: TrialRecord) -> None:
        self._line(trial_start_line(record, state), flush=False)

    def on_trial_end(self, state: RunState, record: TrialRecord) -> None:
        self._line(trial_end_line(record, state), flush=False)

    def on_message(self, state: RunState, text: str) -> None:
        self._line(text)

    def on_end(self, state: RunState) -> None:
        for line in summary_lines(state):
            self._line(line, summary=True)


def summary_lines(state: RunState) -> list[str]:
    """The final summary, one line per study: what the live view and plain log end with."""
    lines = []
    for study in state.studies:
        counts = f"{study.complete} complete, {study.pruned} pruned, {study.failed} failed"
        if study.interrupted:
            counts += f", {study.interrupted} interrupted"
        lines.append(f"study {study.name}: {counts}; {_best_text(study)}")
    return lines


def _best_text(study: StudyView) -> str:
    if study.best_number is not None:
        best = format_values(study.best_values)
        return f"best trial {study.best_number}: {best} {study.best_params}"
    if len(study.directions) > 1 and study.complete:
        return "its Pareto front is in best/"
    return "no trial completed"
