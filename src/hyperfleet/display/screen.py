"""The run's view on the screen: the live view on a terminal, else plain lines, and the guard
that lets the search outlive the screen's output.

``hyperfleet run | head`` closes the pipe after ten lines, a terminal closes: only the view ends
then, and the search goes on to its budget with ``run.log`` keeping its lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO

from hyperfleet.display.events import Event, EventSink, Notice, PlainLog


def screen_view(mode: str, stream: TextIO | None, log: EventSink) -> ScreenGuard:
    """The view ``mode`` asks for ("auto", "live", "plain" or "quiet") on ``stream`` (default
    stdout), guarded; ``log`` (run.log) is told when the screen's output ended."""
    stream = stream if stream is not None else sys.stdout
    return ScreenGuard(_view(mode, stream), stream, log)


def _view(mode: str, stream: TextIO) -> EventSink:
    if mode == "quiet":
        return PlainLog(stream, quiet=True)
    if mode == "live" or (mode == "auto" and stream.isatty()):
        live = _live_view(stream)
        if live is not None:
            return live
    return PlainLog(stream)


def _live_view(stream: TextIO) -> EventSink | None:
    try:
        from hyperfleet.display.live import LiveView, ViewConsole
    except ImportError:
        return None
    return LiveView(ViewConsole(file=stream))  # type: ignore[no-any-return]


class ScreenGuard:
    """The screen's view, whose output may end before the search. Only the view ends then (a
    write to it raised an OSError, such as EPIPE); the search goes on to its budget and run.log
    keeps its lines, so a closed stdout never leaves trials RUNNING behind a run that looks
    finished."""

    def __init__(self, view: EventSink, stream: TextIO, log: EventSink) -> None:
        self._view, self._stream, self._log = view, stream, log
        self._ended = False

    def handle(self, event: Event) -> None:
        if self._ended:
            return
        try:
            self._view.handle(event)
        except OSError as exc:
            self._ended = True
            _discard_output(self._stream)
            reason = exc.strerror or type(exc).__name__
            text = (
                f"the screen's output was closed ({reason}): the search goes on; its lines are "
                f"here, and `hyperfleet status {event.state.run_dir}` shows it"
            )
            self._log.handle(Notice(event.state, text))


def _discard_output(stream: TextIO) -> None:
    """Point stdout at /dev/null once its reader is gone: what is still buffered, and the
    interpreter's last flush at exit, would raise again (and make the exit status 120)."""
    if stream is not sys.stdout:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
