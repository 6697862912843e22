"""Opening the Optuna storage. Only the controller ever calls this: workers never touch storage."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

from hyperfleet.errors import StorageError

RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def open_storage(url: str | None, default_journal: Path) -> BaseStorage:
    """A journal file in the run directory by default; any Optuna storage URL or journal path."""
    if url is None:
        return JournalStorage(JournalFileBackend(str(default_journal)))
    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if not scheme:
        return JournalStorage(JournalFileBackend(str(Path(url).absolute())))
    if scheme not in RDB_SCHEMES:
        raise StorageError(
            f"storage URL {url!r} has an unknown scheme {scheme!r}; use sqlite:///path.db, "
            "postgresql://user:pass@host/db, mysql://..., or a path to a journal file."
        )
    return _open_rdb(url)


def _open_rdb(url: str) -> BaseStorage:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
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
