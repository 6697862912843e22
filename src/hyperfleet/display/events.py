"""The run's events, as small typed records, and the plain-line log that listens to them.

The controller says what happened, and nothing else: a run started, a trial started or ended,
a one-line notice, a tick (about once a second), the run ended. It hands each event to one sink
(:class:`Broadcast` passes it on to many); every view of the run derives what it shows from
them: the live view, the plain lines on the screen, ``run.log``, ``status.json``, ``best/`` and
``summary.md``. A sink's ``handle`` matches the events it cares for and lets the rest pass.

Each event carries the run's state (:class:`~hyperfleet.display.runstate.RunState`, which
the controller keeps current), so a view can draw the whole picture and not only the change.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TextIO

from hyperfleet.display.runstate import RunState, StudyView, TrialClock, TrialRecord


@dataclass(frozen=True)
class Event:
    state: RunState


@dataclass(frozen=True)
class RunStarted(Event):
    """The studies are open; the first trials start next."""


@dataclass(frozen=True)
class TrialStarted(Event):
    record: TrialRecord


@dataclass(frozen=True)
class TrialEnded(Event):
    record: TrialRecord


@dataclass(frozen=True)
class Notice(Event):
    """A one-line notice: stopping, a worker restarted, a GPU missing."""

    text: str


@dataclass(frozen=True)
class Tick(Event):
    """About once a second, for views that refresh."""


@dataclass(frozen=True)
class RunEnded(Event):
    """The search is over (its refits and reports may follow)."""


class EventSink(Protocol):
    def handle(self, event: Event) -> None: ...


class Broadcast:
    """One sink that passes each event on to several, in order: the controller's one sink."""

    def __init__(self, sinks: Sequence[EventSink]) -> None:
        self._sinks = tuple(sinks)

    def handle(self, event: Event) -> None:
        for sink in self._sinks:
            sink.handle(event)


def time_trials(clock: TrialClock, event: Event) -> None:
    """Keep ``clock`` (the time trials ran, which busy shares are of) up with the trials'
    starts and ends."""
    match event:
        case TrialStarted(_, record):
            clock.started(record.start)
        case TrialEnded(_, record):
            clock.ended(record.end if record.end is not None else time.time())


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


class PlainLog:
    """Timestamped lines, one per trial start and end, for files, pipes and CI logs.

    Trial lines are flushed with the controller's tick (about once a second), notices at once:
    a flush per trial would cost the controller a system call per line for short trials.
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._quiet = quiet

    def handle(self, event: Event) -> None:
        match event:
            case TrialStarted(state, record):
                self._line(trial_start_line(record, state), flush=False)
            case TrialEnded(state, record):
                self._line(trial_end_line(record, state), flush=False)
            case Notice(_, text):
                self._line(text)
            case Tick():
                self._stream.flush()
            case RunStarted(state) if not state.nothing_to_run:  # else the budget lines said so
                slots = ", ".join(s.name for s in state.slots)
                where = f"in {state.run_dir} on {len(state.slots)} slots"
                self._line(f"run {state.run_name} {where}: {slots}")
            case RunEnded(state):
                for line in summary_lines(state):
                    self._line(line, summary=True)

    def _line(self, text: str, summary: bool = False, flush: bool = True) -> None:
        if self._quiet and not summary:  # --quiet still prints the final summary
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._stream.write(f"{stamp} {text}\n")
        if flush:
            self._stream.flush()


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
