"""Writing trial folders' files, on the controller's thread while that is quick, else on a
thread of their own.

Each trial ends with two small files written atomically (``params.json``, ``result.json``). The
controller hands them over only once the storage has committed the trial's end (so a file never
says more than the storage), and whoever reads a trial's folder while the search runs (the
``best/`` folder) first waits for the queue to drain.

Where they are written is measured, not assumed. On most disks the writes take a few tens of
microseconds, and doing them on the controller's thread is cheapest: a writer thread costs the
controller more than the writes themselves, in hand-overs of Python's interpreter lock (a fifth of
its time per trial with trials that do nothing, measured on 2 cores). On some file systems a file
creation takes a millisecond or more, and slots would wait for the controller meanwhile; once
the writes are that slow (the median of the last few: one stall of the disk is not a slow disk),
the writer thread takes them for a while. Jobs run in the order they were
given either way: none runs on the controller's thread while the thread has some to do.
"""

from __future__ import annotations

import collections
import queue
import statistics
import threading
import time
from collections.abc import Callable

SLOW_SECONDS = 0.001  # jobs that take this long (the median of the last few) go to the thread...
THREAD_SECONDS = 10.0  # ...for this long; then the controller's thread tries again
TIMED_JOBS = 15  # how many of the last jobs run on the controller's thread that median looks at


class FileWriter:
    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._failure: BaseException | None = None
        self._thread_until = 0.0  # monotonic time until which jobs go to the thread
        self._took: collections.deque[float] = collections.deque(maxlen=TIMED_JOBS)
        self._thread = threading.Thread(target=self._work, name="hyperfleet-files", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` after every job given before it: now, on the caller's thread, unless
        writes were slow lately or the writer thread has jobs left."""
        self.raise_failure()
        start = time.monotonic()
        if start < self._thread_until or self._jobs.unfinished_tasks:
            self._jobs.put(job)
            return
        try:
            job()
        except Exception as exc:  # raised at the next look, as from the thread
            self._failure = exc
        self._took.append(time.monotonic() - start)
        if len(self._took) == TIMED_JOBS and statistics.median(self._took) >= SLOW_SECONDS:
            self._thread_until = time.monotonic() + THREAD_SECONDS
            self._took.clear()

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
