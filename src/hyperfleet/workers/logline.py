"""A worker's own lines in its log, between what its objectives print.

Its own module so that the worker's entry point (:mod:`hyperfleet.workers.main`) and what it
runs (:mod:`hyperfleet.workers.runner`) both write them without importing each other.
"""

from __future__ import annotations

import time


def say(text: str) -> None:
    """A timestamped line in the worker's log (its stdout, outside any trial); flushed with
    what the objective's module printed before it, so a worker killed later loses none."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", flush=True)
