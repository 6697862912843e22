"""When an engine starts a node's agent again after it ended: at once, unless the node's agents
keep ending soon after they start; then later each time, up to a minute, so that a node where an
agent cannot run is not hammered. Ray's and SLURM's launchers both follow it."""

from __future__ import annotations

import time

SHORT_LIFE_SECONDS = 30.0  # an agent that ended sooner than this after it started lived short
RETRY_MAX_SECONDS = 60.0


class AgentRestarts:
    """Per node: how many agents in a row lived short, and when the next may start."""

    def __init__(self, pace: float) -> None:
        self._pace = pace  # how often the launcher looks: the first wait after a short life
        self._short: dict[str, int] = {}
        self._next: dict[str, float] = {}  # monotonic

    def ended(self, node: str, lived: float) -> str:
        """An agent of ``node`` ended after ``lived`` seconds; when a fresh one starts, as the
        run log says it ("now", "in 4s")."""
        short = self._short.get(node, 0) + 1 if lived < SHORT_LIFE_SECONDS else 0
        wait = min(RETRY_MAX_SECONDS, self._pace * 2 ** (short - 1)) if short else 0.0
        self._short[node] = short
        self._next[node] = time.monotonic() + wait
        return f"in {wait:.0f}s" if wait > self._pace else "now"

    def due(self, node: str) -> bool:
        """Whether a fresh agent may start on ``node`` now."""
        return time.monotonic() >= self._next.get(node, 0.0)
