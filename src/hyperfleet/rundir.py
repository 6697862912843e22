"""The run directory: storage, lock, logs and one folder per trial.

It holds everything needed to understand a search without hyperfleet, and it is what makes
"run the same command again" resume: the same directory means the same study.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Any

from hyperfleet.errors import RunDirError

LOCK_NAME = ".hyperfleet.lock"
STUDIES_NAME = "studies"  # a campaign's studies each get a folder in there
JOURNAL_NAME = "optuna.journal"


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self._lock_file: IO[str] | None = None

    @property
    def identity(self) -> str:
        """Marks trials started from this directory, so a restart only fails its own leftovers."""
        return f"{socket.gethostname()}:{self.path}"

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
        return self.path / "trials" / str(number)

    def study_folder(self, name: str) -> RunDir:
        """``studies/<name>/``: a campaign study's trials, ``best/`` and ``report/``."""
        return RunDir(self.path / STUDIES_NAME / folder_name(name))

    def link_experiment(self, name: str, trial_dir: Path) -> None:
        """``experiments/<name>``: a link to the folder of the trial that runs the named
        experiment (the newest one, when a repeat runs it again)."""
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

    def create(self) -> None:
        try:
            for folder in (self.path, self.workers_dir):  # trials/ comes with the first trial
                folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-"):
                pass
        except OSError as exc:
            raise RunDirError(
                f"cannot write to the run directory {self.path} ({exc.strerror}); "
                "pass --run-dir with a folder you can write to."
            ) from None

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

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def folder_name(name: str) -> str:
    """A study or experiment name as a folder name: characters other than letters, digits and
    ``.=+-_`` become ``_``."""
    return re.sub(r"[^\w.=+-]+", "_", name)


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temporary file, then rename), so a reader never sees half a file."""
    text = json.dumps(data, indent=2, default=str, sort_keys=True) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except FileNotFoundError:  # the folder is made only when needed: trials write two a trial
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
    os.replace(tmp, path)


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
