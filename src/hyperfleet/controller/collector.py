"""Keeping Python's cyclic garbage collector from pausing the loop.

What survived the last second joins the collector's permanent generation: a full collection
then goes through only what is new, where it went through every trial of the study (the
journal's replay keeps each): 40-110 ms pauses at a 4,000-trial study, during which no slot got
its next trial. Reference counting still frees those objects; the cycles among them that died
since (measured: under two objects per trial) are collected once a minute, in one full pass, so
that a long run does not keep them.
"""

from __future__ import annotations

import gc
import time

FULL_COLLECTION_SECONDS = 60.0


class CollectorPauses:
    def __init__(self) -> None:
        self._frozen_before = gc.get_freeze_count() > 0
        self._full_collection_at = time.monotonic() + FULL_COLLECTION_SECONDS

    def tick(self) -> None:
        """Once a second: freeze what survived; once a minute, a full collection first."""
        now = time.monotonic()
        if now >= self._full_collection_at:
            gc.unfreeze()
            gc.collect()
            self._full_collection_at = now + FULL_COLLECTION_SECONDS
        gc.freeze()

    def close(self) -> None:
        if not self._frozen_before:
            gc.unfreeze()  # the process's objects, collected as before (a notebook's too)
