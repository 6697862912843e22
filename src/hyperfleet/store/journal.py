"""The journal file as the controller writes it: group commit, and trials placed as created.

Both classes keep the file byte-compatible with Optuna's ``JournalFileBackend`` (one JSON record
per line, written the same way), so optuna-dashboard and ``optuna.load_study`` read it while a
search runs.

- :class:`CheckedBackend` is Optuna's file backend that remembers how far reading got, so a line
  Optuna cannot replay is named by its number.
- :class:`GroupCommitBackend` is for the run directory's own journal, which only the controller
  holding the run lock writes. Optuna's backend takes a lock, opens the file, writes and
  ``fsync``s for every record, then reads its own record back from the file; this one appends
  with one ``write`` per record, hands the records back from memory, and makes them durable with
  one ``fsync`` per :meth:`commit`, which the controller calls once per loop step, before anything
  a user can see depends on them (a trial's ``result.json``, the run log, the next trial sent to
  a slot). A crash of the controller loses nothing it wrote (the kernel has it); a crash of the
  machine loses at most the records of the last step, whose trials come back as interrupted.
- :class:`PlacingJournalStorage` writes where a new trial runs (run, slot, worker) into the
  record that creates it, instead of three more records after it (:mod:`hyperfleet.store.placing`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Container, Generator, Iterator
from typing import Any

from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from hyperfleet.store.placing import PlacesTrials
from hyperfleet.store.rundir import write_all


class CheckedBackend(JournalFileBackend):
    """Optuna's journal file backend, counting the lines it hands out. Counting costs nothing
    next to decoding a line."""

    def __init__(self, file_path: str, lock_obj: Any) -> None:
        super().__init__(file_path, lock_obj=lock_obj)
        self.lines_read = 0  # lines handed out, from the first line of the file
        self.unreadable_line = 0  # the line reading stopped at; 0 while reading went well

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        self.lines_read = log_number_from
        logs = super().read_logs(log_number_from)
        while True:
            try:
                log = next(logs)
            except StopIteration:
                return
            except Exception:
                # Optuna raises a line's decoding error when it reaches the next line.
                self.unreadable_line = self.lines_read + 1
                raise
            self.lines_read += 1
            yield log


class GroupCommitBackend(CheckedBackend):
    """A journal file written with one ``fsync`` per :meth:`commit`.

    ``shared=False``: the run directory's own journal, which no one else writes (the run lock
    says so); records are appended without a lock and handed back to the replay from memory.
    ``shared=True``: a journal other processes may write too (``--storage``, or the study's own
    journal in ``hyperfleet.optimize``); each append holds ``lock_obj``, the lock those writers
    take, and records are read back from the file, where theirs are interleaved with ours.
    """

    def __init__(self, file_path: str, lock_obj: Any, shared: bool = False) -> None:
        super().__init__(file_path, lock_obj)
        self._shared = shared
        self._fd = -1
        self._unread: list[dict[str, Any]] = []  # appended, not yet handed to the replay
        self._unread_from = -1  # the log number of _unread[0]; -1 until the file was read
        self._dirty = False
        # What the replay saw of the queue of enqueued (WAITING) trials, for
        # PlacingJournalStorage: a trial may have joined it, and trials whose state changed.
        self.queue_may_have_grown = True
        self.state_changed: list[int] = []

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        if not self._shared and log_number_from == self._unread_from:
            logs, self._unread = self._unread, []
            self._unread_from += len(logs)
            self.lines_read = self._unread_from
            for log in logs:
                yield self._watch_queue(log)
            return
        # The first replay, or any replay of a shared file: the file holds every record.
        count = 0
        for log in super().read_logs(log_number_from):
            count += 1
            yield self._watch_queue(log)
        self._unread, self._unread_from = [], log_number_from + count

    def _watch_queue(self, log: dict[str, Any]) -> dict[str, Any]:
        op_code = log.get("op_code")
        if op_code == _CREATE_TRIAL and log.get("state") == TrialState.WAITING:
            self.queue_may_have_grown = True
        elif op_code == _SET_TRIAL_STATE and not self.queue_may_have_grown:
            # Kept only while a looked-up queue is: otherwise it is looked up afresh anyway,
            # and a long replay (hyperfleet status, a resume) would gather every trial here.
            trial_id = log.get("trial_id")
            if isinstance(trial_id, int):
                self.state_changed.append(trial_id)
        return log

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if self._unread_from < 0:  # nothing read yet: records must follow the file's own
            list(self.read_logs(0))
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        if self._shared:
            with _held(self._lock):
                write_all(self._file(), data)
        else:
            write_all(self._file(), data)
            self._unread.extend(logs)
        self._dirty = True

    def commit(self) -> None:
        """Make every record appended so far durable (one ``fsync``). May run on another
        thread than the appends: the flag is cleared before the sync, so a record appended
        during it leaves the file dirty for the next commit."""
        if self._dirty:
            self._dirty = False
            _sync_data(self._file())

    def close(self) -> None:
        if self._fd >= 0:
            self.commit()
            os.close(self._fd)
            self._fd = -1

    def _file(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd


@contextlib.contextmanager
def _held(lock: Any) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# Op codes of Optuna's journal format (part of the file format, so they do not change).
_CREATE_TRIAL, _SET_TRIAL_STATE = 4, 6


def _sync_data(fd: int) -> None:
    # fdatasync makes the appended records and the file's new length durable, which is all a
    # replay needs; fsync would also write back timestamps, a second write on many disks.
    getattr(os, "fdatasync", os.fsync)(fd)


class PlacingJournalStorage(PlacesTrials, JournalStorage):
    """A journal storage whose trials created inside :meth:`placing` carry where they run in
    their creating record (see :mod:`hyperfleet.store.placing`)."""

    def __init__(self, backend: BaseJournalBackend) -> None:
        self._waiting: dict[int, set[int]] = {}  # the queued trials of each study looked up
        super().__init__(backend)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        """As Optuna's, except that the queue of enqueued trials, which ``study.ask()`` looks
        up for every new trial, is answered without going through every trial of the study:
        that would make each trial cost more the larger the study grows."""
        backend = self._backend
        asks_queue = isinstance(states, tuple) and states == (TrialState.WAITING,)
        if deepcopy or not asks_queue or not isinstance(backend, GroupCommitBackend):
            return super().get_all_trials(study_id, deepcopy, states)
        self.get_study_directions(study_id)  # replays the records appended since the last look
        if backend.queue_may_have_grown:
            self._waiting.clear()
            backend.queue_may_have_grown = False
        for trial_id in backend.state_changed:  # a queued trial only ever leaves the queue
            for queued in self._waiting.values():
                queued.discard(trial_id)
        backend.state_changed.clear()
        if study_id not in self._waiting:
            trials = super().get_all_trials(study_id, deepcopy=False, states=states)
            self._waiting[study_id] = {t._trial_id for t in trials}
        trials = [self.get_trial(trial_id) for trial_id in sorted(self._waiting[study_id])]
        return [t for t in trials if t.state == TrialState.WAITING]

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return super().create_new_trial(study_id, self._placed(template_trial))

    def commit(self) -> None:
        commit = getattr(self._backend, "commit", None)
        if commit is not None:
            commit()

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()


def needs_commit(storage: Any) -> bool:
    """Whether the storage groups its commits (every other storage commits each write)."""
    return isinstance(storage, PlacingJournalStorage)


def commit(storage: Any) -> None:
    """Make what the controller wrote durable, for storages that group their commits; every
    other storage commits each write itself."""
    if isinstance(storage, PlacingJournalStorage):
        storage.commit()


def close(storage: Any) -> None:
    """Commit, and let go of the journal's file descriptor at the end of a run (a process that
    runs many searches, a notebook, would otherwise keep one per run). A later write opens it
    again."""
    if isinstance(storage, PlacingJournalStorage):
        storage.close()
