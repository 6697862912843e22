"""The run directory: storage, lock, logs and one folder per trial.

It holds everything needed to understand a search without hyperfleet, and it is what makes
"run the same command again" resume: the same directory means the same study.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hyperfleet.errors import ConfigError, RunDirError

LOCK_NAME = ".hyperfleet.lock"
RECORD_NAME = ".hyperfleet-run.json"  # the directory's own id and the study that owns it
STUDIES_NAME = "studies"  # a campaign's studies each get a folder in there
JOURNAL_NAME = "optuna.journal"
STATUS_NAME = "status.json"  # what the controller last said of its slots (display.snapshot)
CHECKPOINTS_NAME = "checkpoints"  # one folder per trial and its repeats, made when asked for
TRIALS_NAME = "trials"
CHECK_EVERY_SECONDS = 0.1  # how often a deleted or moved run folder is looked for, at most
# Trial folders are zero-padded (trials/00017) so that a listing shows them in order; folders
# of runs made before are named by the bare number (trials/17) and are still found.
TRIAL_DIGITS = 5
# A study or campaign name becomes a folder name, which file systems limit to 255 bytes; the
# margin leaves room for what is built from it (".<name>.new", "trial-<n>").
MAX_NAME_BYTES = 128
# What a full disk, a used-up quota or the file size limit (ulimit -f) makes writes fail with.
NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file size limit (ulimit -f) is reached",
}


@dataclass(frozen=True)
class RunOwner:
    """Who a run directory belongs to: one study (its folders are the directory's top level)
    or one campaign (each of its studies has a folder in ``studies/``)."""

    kind: str  # "study" or "campaign"
    name: str

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}"


class RunDirGone(RunDirError):
    """The run directory was deleted or moved while the run used it."""


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self._lock_file: IO[str] | None = None
        self._record: dict[str, Any] | None = None
        self._locked_inode: tuple[int, int] | None = None  # (device, inode) while locked
        self._checked_at = -math.inf  # when check_now_and_then last looked

    @property
    def record_file(self) -> Path:
        return self.path / RECORD_NAME

    @property
    def identity(self) -> str:
        """Marks trials started from this directory, so a restart only fails its own leftovers.

        A random id kept in the directory: it moves and is copied with the directory (and with
        its journal), so a run resumed from another path or on another host still knows them.
        """
        if self._record is None:
            self._record = self._read_record()
        if self._record is None:
            raise RunDirError(f"the run directory {self.path} has no {RECORD_NAME} yet")
        return str(self._record["id"])

    @property
    def kind(self) -> str | None:
        """What made the directory, ``"study"`` or ``"campaign"``; None before its record."""
        record = self._read_record()
        return str(record.get("kind")) if record is not None else None

    @property
    def marks(self) -> tuple[str, ...]:
        """Every mark this directory's controllers put on trials: its id, and ``host:path``,
        the mark of runs made before the directory had an id of its own."""
        return self.identity, f"{socket.gethostname()}:{self.path}"

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL_NAME

    @property
    def run_log(self) -> Path:
        return self.path / "run.log"

    @property
    def workers_dir(self) -> Path:
        return self.path / "workers"

    def trial_dir(self, number: int) -> Path:
        """The folder of a trial this run starts (no look at the disk: the controller asks once
        per trial)."""
        return self.path / TRIALS_NAME / f"{number:0{TRIAL_DIGITS}d}"

    def existing_trial_dir(self, number: int) -> Path:
        """The folder of a trial that may have run before: under its old, unpadded name when
        only that one exists."""
        padded = self.trial_dir(number)
        old = padded.with_name(str(number))
        return old if old != padded and not padded.exists() and old.is_dir() else padded

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_NAME

    def checkpoint_dir(self, first_attempt: int) -> Path:
        """``checkpoints/<n>/``: the folder a trial and every repeat of it share, named after
        the first attempt's number, so each repeat finds what the attempt before it saved."""
        return self.checkpoints_dir / str(first_attempt)

    def study_folder(self, name: str) -> RunDir:
        """``studies/<name>/``: a campaign study's trials, ``best/`` and ``report/``."""
        return RunDir(self.path / STUDIES_NAME / folder_name(name))

    def link_experiment(self, name: str, trial_dir: Path) -> None:
        """``experiments/<name>``: a link to the folder of the trial that runs the named
        experiment (the newest one, when a repeat runs it again). A campaign's names are
        checked before it runs (campaign.folders); a stored name that makes no folder (an
        older version's, or one an objective wrote) gets no link."""
        try:
            check_folder_name(folder_name(name), "experiment name", "")
        except ConfigError:
            return
        link = self.path / "experiments" / folder_name(name)
        link.parent.mkdir(parents=True, exist_ok=True)
        building = link.with_name(f".{link.name}.new")
        building.unlink(missing_ok=True)
        os.symlink(os.path.relpath(trial_dir, link.parent), building)
        os.replace(building, link)  # atomic: the link is never missing or half made

    def check_writable(self) -> None:
        """Fail now, creating nothing, if the directory could not be created or written later."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        problem = ""
        if not existing.is_dir():
            problem = f"{existing} is not a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} cannot be written"
        if problem:
            raise RunDirError(
                f"cannot use the run directory {self.path}: {problem}; "
                "pass --run-dir with a folder you can write to."
            )

    def exists(self) -> bool:
        return self.path.exists()

    def check_owner(self, owner: RunOwner) -> None:
        """Refuse, writing nothing, a directory that belongs to another study or campaign: its
        trial folders and ``best/`` would be overwritten."""
        record = self._read_record()
        if record is None:
            return  # a new directory, or one made before directories recorded their owner
        found = RunOwner(str(record.get("kind")), str(record.get("name")))
        if found != owner:
            raise RunDirError(
                f"the run directory {self.path} belongs to {found.describe()}; running "
                f"{owner.describe()} there would overwrite its trials/ and best/ folders. "
                f"Pass another --run-dir for {owner.describe()} (or run_dir=...)."
            )

    def create(self, owner: RunOwner) -> None:
        """Make the directory and, once, its record: a fresh id and ``owner``."""
        try:
            for folder in (self.path, self.workers_dir):  # trials/ comes with the first trial
                folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-"):
                pass
            self._write_record_once(owner)
        except OSError as exc:
            raise RunDirError(
                f"cannot write to the run directory {self.path} ({exc.strerror}); "
                "pass --run-dir with a folder you can write to."
            ) from None
        self.check_owner(owner)  # another run may have made the record first

    def _write_record_once(self, owner: RunOwner) -> None:
        if self.record_file.exists():
            return
        record = {"id": uuid.uuid4().hex, "kind": owner.kind, "name": owner.name}
        building = self.path / f".{RECORD_NAME}.{os.getpid()}.new"
        try:
            building.write_text(json.dumps(record, indent=2) + "\n")
            # A link fails if the name exists: of two runs starting at once, the first one's
            # record stays, and it is never seen half-written.
            with contextlib.suppress(FileExistsError):
                os.link(building, self.record_file)
        finally:
            with contextlib.suppress(OSError):
                building.unlink()

    def _read_record(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.record_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise RunDirError(
                f"{self.record_file} is unreadable; restore it from a backup, or delete it (the "
                "next run then no longer recognises trials a killed run left RUNNING)."
            )
        return record

    def lock(self) -> None:
        """Hold an exclusive lock for the life of this process (the kernel drops it on death)."""
        handle = open(self.path / LOCK_NAME, "a+")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(
                f"the run directory {self.path} is in use by another hyperfleet controller "
                f"({holder}); wait for it to finish or stop it, or pass another --run-dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock_file = handle
        found = os.stat(self.path)
        self._locked_inode = (found.st_dev, found.st_ino)

    def check_still_there(self) -> None:
        """Raise :class:`RunDirGone` if the locked directory was deleted or moved (a folder
        made again at its path is another folder)."""
        try:
            found = os.stat(self.path)
            gone = self._locked_inode not in (None, (found.st_dev, found.st_ino))
        except FileNotFoundError:
            gone = True
        if gone:
            raise RunDirGone(f"the run directory {self.path} was deleted or moved during the run")

    def check_now_and_then(self) -> None:
        """:meth:`check_still_there`, at most every :data:`CHECK_EVERY_SECONDS`: the loop's
        events come thousands of times a second with short trials, and a ``stat`` each time was
        a tenth of the controller's time. What would make a folder at the path again (a study's
        trial folder) checks every time."""
        now = time.monotonic()
        if now - self._checked_at < CHECK_EVERY_SECONDS:
            return
        self.check_still_there()
        self._checked_at = now

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def check_folder_name(name: str, what: str, fix: str) -> None:
    """Refuse a name that would become a folder anywhere but one level down: a path separator,
    ``.`` or ``..`` (``--study-name ../x`` would write outside ``runs/``), or too long a name."""
    problem = ""
    if not name:
        problem = "is empty"
    elif "/" in name or "\\" in name or "\0" in name:
        problem = "names a folder, so it cannot hold a slash"
    elif name in (".", ".."):
        problem = "names a folder, so it cannot be '.' or '..'"
    elif len(name.encode()) > MAX_NAME_BYTES:
        problem = (
            f"is {len(name.encode())} bytes long, too long for a folder name: use at most "
            f"{MAX_NAME_BYTES} bytes ({MAX_NAME_BYTES} ASCII characters)"
        )
    if problem:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise ConfigError(f"the {what} {shown!r} {problem}; {fix}")


def folder_name(name: str) -> str:
    """A study or experiment name as a folder name: characters other than letters, digits and
    ``.=+-_`` become ``_``."""
    return re.sub(r"[^\w.=+-]+", "_", name)


def _make_folder(folder: Path, levels: int) -> None:
    """Make ``folder`` and as many of its missing parents as it takes, up to ``levels`` folders
    in all (a trial's folder and ``trials/``), never more: in a run folder deleted meanwhile,
    the write fails instead of making the run folder again at its path."""
    try:
        folder.mkdir(exist_ok=True)
    except FileNotFoundError:
        if levels <= 1:
            raise
        _make_folder(folder.parent, levels - 1)
        folder.mkdir(exist_ok=True)


def write_json(path: Path, data: Any, compact: bool = False) -> None:
    """Write atomically (temporary file, then rename), so a reader never sees half a file.
    ``compact``: one line, for a file rewritten often by the controller (indenting makes
    Python's JSON writer take its slow path: 10 times longer for the status of 512 slots)."""
    indent = None if compact else 2
    text = (json.dumps(data, indent=indent, default=str, sort_keys=True) + "\n").encode()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            _write_bytes(tmp, text)
        except FileNotFoundError:  # the folder is made only when needed: a trial writes two
            _make_folder(path.parent, levels=2)
            _write_bytes(tmp, text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk leaves no half-written file behind
        raise


def _write_bytes(path: Path, data: bytes) -> None:
    """A whole file in three system calls. ``Path.write_text`` makes seven (a buffered text
    file asks whether it is a terminal, and where it is, twice); the controller writes two
    files per trial, and on a disk where creating a file is slow those calls were a third of
    the writing's CPU (``bench/RESULTS.md``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def tail(path: Path, max_bytes: int = 4000) -> str:
    """The end of a log file, for failure reasons."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""
