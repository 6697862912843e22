"""Trial folders on a node that does not see the controller's run directory.

Such a node keeps a run folder of its own (the agent's ``--work-dir``), laid out as the
controller's: a trial that would run in ``RUN_DIR/trials/00017`` runs in
``LOCAL/trials/00017``, and so does its checkpoint folder. The worker maps the paths of each
trial it is sent, and tells its agent where each trial starts and when it ends with two marks
sent on its connection (both on the worker's side: :mod:`hyperfleet.workers.nodefolder`, and the
marks in :mod:`hyperfleet.workers.protocol`). This module is the agent's and the controller's
side. The agent sends the trial's ``stdout.log`` and ``stderr.log`` to the
controller (the last :data:`COPIED_LOG_BYTES` of each) before it relays the trial's result, and
before it reports a worker that died during a trial, so the logs are queued for writing before
the result is, and ``result.json`` quotes ``stderr.log`` as on one machine. ``params.json`` and
``result.json`` are written by the controller itself, from the storage, wherever trials run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hyperfleet.workers.nodefolder import NodeRunFolder

LOG_NAMES = ("stdout.log", "stderr.log")
# Enough for the end of any trial's story; a trial that logs more keeps the rest on its node.
COPIED_LOG_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class TrialLogs:
    """A message from an agent: the logs of a trial that ran in the node's own folder. (Here,
    not with the other messages, so that a worker imports none of what those need.)"""

    folder: str  # the trial's folder, relative to the run directory (trials/00017)
    logs: dict[str, bytes]


def run_folder_note(node: str, folder: NodeRunFolder | None) -> str:
    """The one line on where this node's trial folders are, said by the agent and the run."""
    if folder is None:
        return "it shares the run directory"
    return (
        "run folder not shared; trial logs copied back, objective files stay in "
        f"{folder.local} on {node}"
    )


def collect_logs(local_root: Path, folder: str, node: str) -> TrialLogs:
    """The end of each log of the trial in ``local_root/folder``, as the agent sends them."""
    logs = {}
    for name in LOG_NAMES:
        path = local_root / folder / name
        try:
            logs[name] = _tail_with_note(path, f"{path} on {node}")
        except FileNotFoundError:
            continue  # a trial that died before it opened its logs
    return TrialLogs(folder, logs)


def _tail_with_note(path: Path, where: str) -> bytes:
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        start = max(0, size - COPIED_LOG_BYTES)
        file.seek(start)
        data = file.read(COPIED_LOG_BYTES)
    if start == 0:
        return data
    note = f"[hyperfleet: the first {start} bytes of this log are left out; see {where}]\n"
    return note.encode() + data


def trial_folder(run_dir: Path, logs: TrialLogs) -> Path | None:
    """Where a node's trial logs go in the run directory; None for a folder that is not a
    trial's (a path out of the run directory, a name that is not a log)."""
    if not isinstance(logs.folder, str) or not isinstance(logs.logs, dict):
        return None
    relative = PurePosixPath(logs.folder)
    if relative.is_absolute() or os.pardir in relative.parts or not relative.parts:
        return None
    for name, data in logs.logs.items():
        if name not in LOG_NAMES or not isinstance(data, bytes):
            return None
    folder = run_dir.joinpath(*relative.parts)
    return folder if _inside(run_dir, folder) else None


def _inside(run_dir: Path, path: Path) -> bool:
    """Whether ``path`` stays in the run directory once its links are followed (a link in the
    run directory could point anywhere)."""
    return path.resolve().is_relative_to(run_dir.resolve())


def write_logs(run_dir: Path, trial_dir: Path, logs: dict[str, bytes]) -> None:
    """On the controller's file-writer thread. Its parent (``trials/``) was made when the trial
    started; a run directory deleted meanwhile is not made again here. The folder is checked
    again here, and each log is opened without following a link, so that a link made in the
    meantime cannot take a node's bytes out of the run directory."""
    if not _inside(run_dir, trial_dir):
        return
    trial_dir.mkdir(exist_ok=True)
    for name, data in logs.items():
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(trial_dir / name, flags, 0o644)
        except OSError:  # a link where the log goes: leave it, write nothing through it
            continue
        with os.fdopen(fd, "wb") as out:
            out.write(data)
