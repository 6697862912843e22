"""Writing trial folders' files off the controller's thread.

Each trial ends with two small files written atomically (``params.json``, ``result.json``): a
few file creations that cost the controller a millisecond or more on some file systems, while
slots wait for its next answer. A single writer thread does them in order instead; the
controller hands them over only once the storage has committed the trial's end (so a file never
says more than the storage), and whoever reads a trial's folder while the search runs (the
``best/`` folder) first waits for the queue to drain. The file writes release the interpreter
lock, so they overlap the controller's own work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class FileWriter:
    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="hyperfleet-files", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the writer thread, after every job submitted before it."""
        self.raise_failure()
        self._jobs.put(job)

    def queue(self, job: Callable[[], None]) -> None:
        """``submit`` for other threads: a failure is left for the controller's thread."""
        self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every job submitted so far has run; raise the first one's error."""
        self._jobs.join()
        self.raise_failure()

    def raise_failure(self) -> None:
        """A job that failed (a full disk, a vanished folder) stops the run at the next look."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._failure is None:  # after a failure, the run is stopping: skip
                    job()
            except BaseException as exc:  # handed to the controller's thread to raise
                self._failure = exc
            finally:
                self._jobs.task_done()
