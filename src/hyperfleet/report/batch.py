"""Many studies' reports at once, the end of a campaign: a few processes, each writing its share.

A report costs about a second of CPU (plotly figures, tables), so a campaign's reports written
one after another keep the user waiting long after the last trial. They are spread over one
process per core (at most :data:`MAX_PROCESSES`): ``python -m hyperfleet.report.batch RUN_DIR
NAME FOLDER [NAME FOLDER ...]`` writes the reports of those studies, without their PNGs (the
same plots as the HTML's, and most of the cost; ``hyperfleet report RUN_DIR`` writes them), and
prints one JSON line per study. The caller can kill them at any time: each is in its own
session, and a report is rewritten whole by the next ``hyperfleet report``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

MAX_PROCESSES = 8


class ReportsInterrupted(BaseException):
    """Raised from a signal handler to stop the reports; a BaseException, as KeyboardInterrupt
    is, so that no handler of report errors takes it for one."""


def write_in_parallel(
    run_dir: Path, folders: dict[str, Path], announce: Callable[[str], None]
) -> None:
    """Write the report of each study (name: its folder), announcing each as it is done.

    Anything raised meanwhile (:class:`ReportsInterrupted` from :func:`interrupt_on_signals`)
    kills the report processes at once."""
    shares = _shares(list(folders.items()), _cores())
    processes = [_start(run_dir, share) for share in shares]
    try:
        for process in processes:
            assert process.stdout is not None
            for line in process.stdout:
                announce(_describe(json.loads(line)))
            process.wait()
    except BaseException:
        for process in processes:
            _kill(process)
        raise
    for process in processes:
        if process.returncode:
            announce(
                f"a report process exited with status {process.returncode} before it was done; "
                f"write the reports with: hyperfleet report {run_dir}"
            )


def _cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    count = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(count, MAX_PROCESSES))


def _shares(items: list[tuple[str, Path]], processes: int) -> list[list[tuple[str, Path]]]:
    count = min(processes, len(items))
    return [items[i::count] for i in range(count)]


def _start(run_dir: Path, share: list[tuple[str, Path]]) -> subprocess.Popen[str]:
    args = [str(part) for name, folder in share for part in (name, folder)]
    return subprocess.Popen(
        [sys.executable, "-m", "hyperfleet.report.batch", str(run_dir), *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the terminal's Ctrl+C reaches the controller, which decides
    )


def _kill(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`ReportsInterrupted` in the main thread meanwhile: a
    scheduler's grace period does not wait for reports."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        raise ReportsInterrupted

    previous = signal.signal(signal.SIGINT, interrupt), signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def _describe(result: dict[str, str]) -> str:
    study = result["study"]
    if "folder" in result:
        return f"report of {study}: {Path(result['folder']) / 'index.html'}"
    return f"report of {study} {result['error']}"


def main(argv: list[str]) -> None:
    """Write the reports named on the command line, one JSON line per study."""
    import warnings

    import optuna

    from hyperfleet.errors import HyperfleetError
    from hyperfleet.report import write_report
    from hyperfleet.store.run_reader import open_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    run_dir, pairs = Path(argv[0]), argv[1:]
    studies = {study.study_name: study for study in open_run(run_dir).studies}
    for name, folder in zip(pairs[::2], pairs[1::2], strict=True):
        result = {"study": name}
        try:
            result["folder"] = str(write_report(folder, study=studies[name], pngs=False))
        except HyperfleetError as exc:
            result["error"] = f"skipped: {exc}"
        except Exception as exc:
            result["error"] = (
                f"failed ({type(exc).__name__}: {exc}); retry with: hyperfleet report {run_dir}"
            )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
