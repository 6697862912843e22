"""Opening the Optuna storage. Only the controller ever calls this: workers never touch storage."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalFileSymlinkLock
from optuna.study import StudyDirection

from hyperfleet.errors import StorageError
from hyperfleet.store.journal import CheckedBackend, GroupCommitBackend, PlacingJournalStorage

if TYPE_CHECKING:
    from hyperfleet.store.rundir import RunDir

RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
# "scheme:" followed by a slash: meant as a URL even when the "//" is missing.
_LOOKS_LIKE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
# How every record Optuna writes to a journal file begins (JournalStorage._write_log, dumped
# with separators=(",", ":")): a cut-off last line must be a piece of such a record.
_RECORD_START = b'{"op_code":'
_SQLITE_HEADER = b"SQLite format 3\x00"
JournalLock = JournalFileOpenLock | JournalFileSymlinkLock  # KernelFileLock is an open lock


def open_storage(url: str | None, default_journal: Path) -> BaseStorage:
    """A journal file in the run directory by default; any Optuna storage URL or journal path.

    A journal or SQLite file meant to lie in a folder of the run directory (``default_journal``'s
    folder) that does not exist yet gets that folder, once the run directory exists."""
    if url is None:
        return open_private_journal(default_journal)
    if "://" not in url and _LOOKS_LIKE_URL.match(url):
        raise StorageError(
            f"storage URL {url!r} is malformed; write it as dialect://user:pass@host/db, "
            "sqlite:///path/to/file.db, or give a path to a journal file."
        )
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if not scheme:
        path = _normal(Path(url))
        _make_folder_in_run_dir(path, default_journal.parent)
        return _open_journal_path(path)
    if scheme not in RDB_SCHEMES:
        raise StorageError(
            f"storage URL {url!r} has an unknown scheme {scheme!r}; use sqlite:///path.db, "
            "postgresql://user:pass@host/db, mysql://..., or a path to a journal file."
        )
    return _open_rdb(url, default_journal.parent)


def _storage_file(url: str) -> Path | None:
    """The local file a ``--storage`` value names (a journal path or an SQLite database), or
    None for a server, an in-memory database, or a value that is not a valid storage URL
    (``open_storage`` says what is wrong with it)."""
    if "://" not in url:
        return None if _LOOKS_LIKE_URL.match(url) else _normal(Path(url))
    if url.split(":", 1)[0].split("+", 1)[0] != "sqlite":
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except (ArgumentError, ValueError):
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return _normal(Path(database))


def _normal(path: Path) -> Path:
    """Absolute, with ``..`` resolved as the path reads (sqlite and open() see it so too)."""
    return Path(os.path.normpath(path.absolute()))


def _inside(path: Path, folder: Path) -> bool:
    folder = _normal(folder)
    return path == folder or folder in path.parents


def _make_folder_in_run_dir(file: Path, run_dir: Path) -> None:
    """Make the missing folder of a storage file that belongs in the (existing) run directory."""
    folder = file.parent
    if folder.exists() or not run_dir.is_dir() or not _inside(folder, run_dir):
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the folder {folder} for the storage ({exc.strerror}); "
            "give a --storage path in a folder you can write to."
        ) from None


def open_private_journal(path: Path) -> BaseStorage:
    """The run directory's own journal, written only by the controller holding the run lock.

    Optuna's default journal lock is a symlink that outlives a killed writer and then blocks
    the next run for its 30 s grace period; a kernel lock dies with its holder. A line half
    written when the power went is cut off, since appending after it would corrupt the file.
    """
    return _open_journal(
        path,
        KernelFileLock(path),
        "restore it from a backup, or pass a new --run-dir to start another study",
        shared=False,
    )


def is_private_journal(storage: BaseStorage, path: Path) -> bool:
    """True when ``storage`` is the journal at ``path``; no other controller can write to it."""
    backend = getattr(storage, "_backend", None)  # JournalStorage keeps its backend private
    return isinstance(backend, JournalFileBackend) and Path(backend._file_path) == path


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


def _open_journal(path: Path, lock: JournalLock, fix: str, shared: bool) -> JournalStorage:
    """Open the journal file at ``path``: replay it, refuse it untouched if any complete line
    cannot be replayed, and cut off a last line that a killed writer left without its newline.

    Reading needs no lock (Optuna's replay skips an unfinished last line, and so may a live
    writer's append in progress). Only when the last line is unfinished is ``lock`` taken: the
    lock every writer of the file holds around each append, Optuna's default
    ``JournalFileSymlinkLock`` for a journal given with ``--storage`` (other hyperfleet
    controllers and plain Optuna processes may be writing it) and the controller's kernel lock
    for the run directory's own journal. Holding it, the lines finished meanwhile are replayed
    and the end is judged again: a line still unfinished then has no live writer, and is cut
    off before anything is appended after it. If the lock cannot be taken because the folder
    is read-only, nothing can be appended through this storage either: the file is left alone.
    """
    try:
        # Creates an absent file, as Optuna does.
        backend = GroupCommitBackend(str(path), lock, shared=shared)
        storage = _replayed(path, backend, fix, lambda: PlacingJournalStorage(backend))
    except OSError as exc:
        raise StorageError(f"cannot open the journal {path} ({exc.strerror}); {fix}.") from None
    if _unfinished_tail(path, fix) is None or not _try_acquire(lock):
        return storage
    try:
        _replayed(path, backend, fix, storage.get_all_studies)  # reads the lines added since
        end = _unfinished_tail(path, fix)
        if end is not None:
            with open(path, "rb+") as handle:
                handle.truncate(end)
    except OSError as exc:
        raise StorageError(
            f"the journal {path} ends with a record cut off by a crash, and cutting it off "
            f"failed ({exc.strerror}); make the file writable and run again."
        ) from None
    finally:
        lock.release()
    return storage


T = TypeVar("T")


def _replayed(path: Path, backend: CheckedBackend, fix: str, replay: Callable[[], T]) -> T:
    """``replay()``, with any error reading or applying a line of the journal said as such."""
    try:
        return replay()
    except OSError:
        raise
    except Exception as exc:  # JSON, KeyError, AssertionError, ...: all mean unreadable
        line = backend.unreadable_line or backend.lines_read
        raise _unreadable(path, line, exc, fix) from None


def _try_acquire(lock: JournalLock) -> bool:
    try:
        lock.acquire()
    except PermissionError:  # a read-only folder: no lock file can be made there
        return False
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return False
        raise
    return True


def _unfinished_tail(path: Path, fix: str) -> int | None:
    """Where an unfinished last line starts, or None if the journal ends with a newline.

    Refuses a damaged last complete line (Optuna's replay skips it without a word, then fails
    once anything is appended after it), and a last line that is not the start of a record."""
    end, last_line, tail = _journal_end(path)
    if last_line:
        try:
            json.loads(last_line)
        except ValueError as exc:
            raise _unreadable(path, _line_count(path, end), exc, fix) from None
    if not tail:
        return None
    if not (tail.startswith(_RECORD_START) or _RECORD_START.startswith(tail)):
        line = _line_count(path, end) + 1
        detail = f"its last line ({line}) is neither a record nor the start of one"
        raise _not_a_journal(path, detail, fix)
    return end


def _journal_end(path: Path, block: int = 1 << 16) -> tuple[int, bytes, bytes]:
    """Where the complete lines end, the last complete line, and what follows it (a line
    without its newline); read from the end, whatever the size of the file."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        while True:
            start = max(0, size - block)
            handle.seek(start)
            data = handle.read(size - start)
            end = data.rfind(b"\n") + 1
            begin = data.rfind(b"\n", 0, end - 1) + 1 if end else 0
            if start == 0 or begin > 0:
                return start + end, data[begin:end], data[end:]
            block *= 4


def _line_count(path: Path, end: int) -> int:
    """The number of lines in the first ``end`` bytes (only to name a bad line)."""
    with open(path, "rb") as handle:
        return handle.read(end).count(b"\n")


def _unreadable(path: Path, line: int, exc: Exception, fix: str) -> StorageError:
    """The message for a journal whose ``line`` (counted from 1) cannot be replayed."""
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return _not_a_journal(path, f"line {max(line, 1)} is not JSON", fix)
    return _not_a_journal(path, f"line {max(line, 1)} is not a record Optuna can replay", fix)


def _not_a_journal(path: Path, detail: str, fix: str) -> StorageError:
    with open(path, "rb") as handle:
        if handle.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER:
            return StorageError(
                f"{path} is an SQLite database, not a journal file; pass it as "
                f"--storage sqlite:///{path}."
            )
    return StorageError(
        f"{path} is not an Optuna journal that can be read: {detail}. It was left unchanged; {fix}."
    )


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
    # Optuna's default lock for this path: other processes writing the file share it.
    return open_shared_journal(path, JournalFileSymlinkLock(str(path)))


def open_shared_journal(path: Path, lock: JournalLock) -> BaseStorage:
    """A journal file other processes may write too, each append holding ``lock`` (the lock
    they use); its records are committed once per controller step, not once per record."""
    return _open_journal(
        path, lock, "restore it from a backup, or pass a new --storage path", shared=True
    )


def controller_study(study: optuna.Study) -> optuna.Study:
    """The study the controller runs: the user's own, except that a journal file opened with
    Optuna's file backend is reopened through :func:`open_shared_journal`, which commits once
    per step and repairs a torn last line, and a database through :class:`ControllerRDBStorage`
    (on the same connections), which writes a trial and its placement in one transaction and
    keeps the trials the controller runs in its cache as it writes them. The
    user's study object reads the same file or database, so it sees every trial after the run."""
    storage = study._storage  # no public accessor
    backend = getattr(storage, "_backend", None)
    if type(storage) is _CachedStorage and isinstance(backend, RDBStorage):
        return _reloaded(study, _controller_rdb_storage(backend))
    if type(storage) is not JournalStorage or type(backend) is not JournalFileBackend:
        return study
    lock = backend._lock  # the lock the user's backend writes under (private, no accessor)
    if not isinstance(lock, (JournalFileOpenLock, JournalFileSymlinkLock)):
        return study  # a lock of the user's own making: leave their backend alone
    return _reloaded(study, open_shared_journal(Path(backend._file_path), lock))


def _controller_rdb_storage(backend: RDBStorage) -> BaseStorage:
    """:class:`~hyperfleet.store.database.ControllerRDBStorage` on ``backend``, imported only
    for a database: SQLAlchemy takes a third of a second to import, which a run on a journal,
    the default, need not pay at every start."""
    from hyperfleet.store.database import ControllerRDBStorage

    return ControllerRDBStorage(backend)


def _reloaded(study: optuna.Study, storage: BaseStorage) -> optuna.Study:
    return optuna.load_study(
        study_name=study.study_name, storage=storage, sampler=study.sampler, pruner=study.pruner
    )


def _open_rdb(url: str, run_dir: Path) -> BaseStorage:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"storage URL {url!r} is malformed; write it as dialect://user:pass@host/db "
            "or sqlite:///path/to/file.db."
        ) from None
    file = _storage_file(url)
    if file is not None:
        _make_folder_in_run_dir(file, run_dir)
        if not file.parent.is_dir():
            raise StorageError(
                f"cannot create the SQLite database {file}: its folder {file.parent} does not "
                f"exist; create it (mkdir -p {file.parent}) or give a path in an existing folder."
            )
    try:
        return _controller_rdb_storage(_rdb_storage(url))
    except ImportError as exc:  # Optuna's, for a missing driver: say which package has it
        raise StorageError(_missing_driver(url, exc)) from None
    except Exception as exc:  # drivers raise their own types; all mean "cannot use it"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if file is not None:
            raise StorageError(
                f"cannot open the SQLite database {file}: {first_line}. Check that it is an "
                "SQLite database you can read and write, or give another --storage path."
            ) from None
        raise StorageError(
            f"cannot open the database {url!r}: {first_line}. Check that it is running and "
            "reachable and that its driver is installed."
        ) from None


_OPEN_TRIES = 5  # a new database that other processes open at the same moment


def _rdb_storage(url: str) -> RDBStorage:
    """Optuna's storage for the database. The first process to open a new database creates
    Optuna's tables; two starting at once (runs that share a study, started together) may both
    try, and the one that loses finds them "already" there midway: it opens the database again,
    and finds them made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, _OPEN_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, ProgrammingError) as exc:
            made_meanwhile = isinstance(exc, IntegrityError) or "already exists" in str(exc)
            if attempt == _OPEN_TRIES or not made_meanwhile:
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


# The package that installs each database driver SQLAlchemy names (``dialect+driver://``).
DRIVER_PACKAGES = {
    "psycopg": '"psycopg[binary]"',
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "mysqldb": "mysqlclient",
    "pymysql": "PyMySQL",
    "mysqlconnector": "mysql-connector-python",
    "mariadbconnector": "mariadb",
    "oracledb": "oracledb",
    "cx_oracle": "cx_Oracle",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}


def _missing_driver(url: str, exc: ImportError) -> str:
    """One line naming the package to install for the URL's driver."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    driver = parsed.get_dialect().driver
    module = getattr(exc.__cause__, "name", None) or driver
    package = DRIVER_PACKAGES.get(driver, module)
    extra = ' (or pip install "hyperfleet[postgres]")' if driver == "psycopg" else ""
    return (
        f"the database driver for {parsed.drivername}:// URLs ({module}) is not installed; "
        f"install it with: pip install {package}{extra}"
    )


def existing_storage(url: str | None, run_dir: RunDir) -> BaseStorage | None:
    """The storage to check the study against, or None while there is none yet: the default
    journal, or a storage file in a folder of the run directory that does not exist yet, is
    created with the run directory, once every check has passed."""
    if url is None:
        return open_storage(url, run_dir.journal) if run_dir.journal.exists() else None
    file = _storage_file(url)
    if file is not None and not file.parent.exists() and _inside(file.parent, run_dir.path):
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
