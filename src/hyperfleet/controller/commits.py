"""Commits of the storage, made on a thread of their own while the loop goes on.

A journal's writes become durable with one ``fdatasync`` per commit, which takes from a tenth
of a millisecond to several on the disks users have. Waiting for it on the loop's thread made
every other slot wait too: at hundreds of remote slots whose results arrive one by one, the
loop spent more time waiting for the disk than working. Here the loop starts a commit and goes
on; what depends on that commit (a trial sent to its worker, its files, the run log) runs on the
loop's thread once the commit is done, in order. One commit is in flight at a time; what the
loop writes meanwhile goes with the next one, so the guarantee is unchanged: nothing a user or a
worker sees is ahead of the disk.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hyperfleet.store.journal import commit, needs_commit

Effect = Callable[[], None]


@dataclass
class Effects:
    """What waits for a commit: sends to workers (slots wait on them: they go first), then the
    rest (trial files, views, the run log)."""

    sends: list[Effect] = field(default_factory=list)
    others: list[Effect] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sends or self.others)


class Committer:
    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake  # tells the loop a commit is done
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "hyperfleet-commit")
        self._in_flight: tuple[concurrent.futures.Future[None], Effects] | None = None

    def start(self, storages: Iterable[Any], effects: Effects) -> Effects | None:
        """Commit ``storages`` for ``effects``. Returns them when nothing needed a commit
        (they may run now); None once a commit is under way (see :meth:`finished`)."""
        durable = [storage for storage in storages if needs_commit(storage)]
        if not durable:
            return effects
        future = self._pool.submit(_commit_all, durable)
        future.add_done_callback(lambda _: self._wake())
        self._in_flight = (future, effects)
        return None

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def finished(self, wait: bool = False) -> Effects | None:
        """The effects of the commit in flight once it is done (waiting for it with ``wait``);
        a commit that failed raises its error (a full disk stops the run)."""
        if self._in_flight is None:
            return None
        future, effects = self._in_flight
        if not wait and not future.done():
            return None
        self._in_flight = None
        future.result()
        return effects

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _commit_all(storages: list[Any]) -> None:
    for storage in storages:
        commit(storage)
