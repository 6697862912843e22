"""The live terminal view: a thin event sink around ``rich.live.Live``.

Automatic refresh is off (rich would otherwise draw from its own thread while the controller
changes the state): the view is drawn once per controller tick, about once a second, which is
all the time it ever takes from the loop.
"""

from __future__ import annotations

import errno
import os

from rich.console import Console
from rich.live import Live
from rich.text import Text

from hyperfleet.display.events import (
    Event,
    Notice,
    RunEnded,
    RunStarted,
    Tick,
    summary_lines,
)
from hyperfleet.display.render import render
from hyperfleet.display.runstate import RunState


class ViewConsole(Console):
    """rich's Console, except that an output closed under it (``| head``) raises
    BrokenPipeError where rich would end the whole process (SystemExit): only the view ends
    (see display.screen.ScreenGuard), the search goes on."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


class LiveView:
    def __init__(self, console: Console) -> None:
        self._console = console
        self._live: Live | None = None

    def handle(self, event: Event) -> None:
        match event:
            case Tick(state):
                self._draw(state)
            case Notice(state, text):
                # Printed above the live area, so notices stay on screen after it moves on.
                self._console.print(Text(text, style="yellow"))
                self._draw(state)
            case RunStarted(state) if not state.nothing_to_run:
                # (else no dashboard of idle slots: the budget lines and the summary say it all)
                self._start(state)
            case RunEnded(state):
                self._end(state)

    def _start(self, state: RunState) -> None:
        self._live = Live(
            render(state, self._console.width),
            console=self._console,
            auto_refresh=False,
            redirect_stdout=False,  # the objective runs in other processes; keep ours untouched
            redirect_stderr=False,
        )
        self._live.start()

    def _end(self, state: RunState) -> None:
        self._draw(state)
        if self._live is not None:
            self._live.stop()
            self._live = None
        for line in summary_lines(state):
            # Parameters may hold "[...]", which rich would read as markup.
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _draw(self, state: RunState) -> None:
        if self._live is not None:
            self._live.update(render(state, self._console.width), refresh=True)
