"""Opening the Optuna storage. Only the controller ever calls this: workers never touch storage."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.study import StudyDirection

from hyperfleet.errors import StorageError

if TYPE_CHECKING:
    from hyperfleet.rundir import RunDir

RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
# "scheme:" followed by a slash: meant as a URL even when the "//" is missing.
_LOOKS_LIKE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def open_storage(url: str | None, default_journal: Path) -> BaseStorage:
    """A journal file in the run directory by default; any Optuna storage URL or journal path."""
    if url is None:
        return open_private_journal(default_journal)
    if "://" not in url and _LOOKS_LIKE_URL.match(url):
        raise StorageError(
            f"storage URL {url!r} is malformed; write it as dialect://user:pass@host/db, "
            "sqlite:///path/to/file.db, or give a path to a journal file."
        )
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if not scheme:
        return _open_journal_path(Path(url).absolute())
    if scheme not in RDB_SCHEMES:
        raise StorageError(
            f"storage URL {url!r} has an unknown scheme {scheme!r}; use sqlite:///path.db, "
            "postgresql://user:pass@host/db, mysql://..., or a path to a journal file."
        )
    return _open_rdb(url)


def open_private_journal(path: Path) -> BaseStorage:
    """The run directory's own journal, written only by the controller holding the run lock.

    Optuna's default journal lock is a symlink that outlives a killed writer and then blocks
    the next run for its 30 s grace period; a kernel lock dies with its holder. A line half
    written when the power went is cut off, since appending after it would corrupt the file.
    """
    repair_journal_tail(path)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=KernelFileLock(path)))


def is_private_journal(storage: BaseStorage, path: Path) -> bool:
    """True when ``storage`` is the journal at ``path``; no other controller can write to it."""
    backend = getattr(storage, "_backend", None)  # JournalStorage keeps its backend private
    return isinstance(backend, JournalFileBackend) and Path(backend._file_path) == path


def repair_journal_tail(path: Path) -> None:
    """Drop an incomplete last line (a write cut off by a crash, never acknowledged)."""
    try:
        with open(path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


class KernelFileLock(JournalFileOpenLock):
    """An exclusive ``flock`` on ``JOURNAL.flock``; the kernel releases it if the holder dies."""

    def __init__(self, journal: Path) -> None:
        super().__init__(str(journal))
        self._path = journal.with_name(journal.name + ".flock")
        self._handle: IO[bytes] | None = None

    def acquire(self) -> bool:
        handle = open(self._path, "ab")  # noqa: SIM115 (closed in release)
        fcntl.flock(handle, fcntl.LOCK_EX)
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _open_journal_path(path: Path) -> BaseStorage:
    if path.is_dir():
        raise StorageError(
            f"storage {str(path)!r} is a folder; give a journal file path such as "
            f"{path / 'optuna.journal'} or a database URL."
        )
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise StorageError(
            f"cannot create the journal file {path}: its folder does not exist or cannot be "
            "written; create the folder or give another --storage path."
        )
    return JournalStorage(JournalFileBackend(str(path)))


def _open_rdb(url: str) -> BaseStorage:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"storage URL {url!r} is malformed; write it as dialect://user:pass@host/db "
            "or sqlite:///path/to/file.db."
        ) from None
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # drivers raise their own types; all mean "cannot use it"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(
            f"cannot open the database {url!r}: {first_line}. Check that it is running and "
            "reachable and that its driver is installed."
        ) from None


def existing_storage(url: str | None, run_dir: RunDir) -> BaseStorage | None:
    """The storage to check the study against, or None while the default journal is absent
    (it is created with the run directory, once every check has passed)."""
    if url is None and not run_dir.journal.exists():
        return None
    return open_storage(url, run_dir.journal)


def check_directions(
    storage: BaseStorage | None, study_name: str, wanted: list[str] | None
) -> list[StudyDirection]:
    """The directions to use; an existing study (``storage`` None: none yet) must not be asked
    for others."""
    asked = [StudyDirection[name.upper()] for name in wanted or []]
    if storage is None:
        return asked or [StudyDirection.MINIMIZE]
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return asked or [StudyDirection.MINIMIZE]
    existing = list(storage.get_study_directions(study_id))
    if asked and asked != existing:
        raise StorageError(
            f"study {study_name!r} already exists with direction(s) "
            f"{[d.name.lower() for d in existing]}, but {wanted} were asked for; "
            "ask for the same direction(s) (--direction, or direction in a campaign file), or "
            "use a new study name or run folder to start another study."
        )
    return existing
