"""How many warm workers one GPU should run: the decisions of ``trials_per_gpu="auto"``.

Pure logic, no processes and no clock of its own: the controller feeds one :class:`GpuPacker`
per GPU with readings (memory in total, taken by others, held by the pool's workers, how busy
the GPU is), with trial ends and out-of-memory failures, and applies what it decides.

A GPU starts with one worker. One more is added while
- one more trial's memory (the largest a trial of this GPU was seen to hold, or the amount the
  user declared) fits next to what is there, with a safety margin;
- the GPU is not yet busy (utilisation below a target);
- the last worker added raised the GPU's trial throughput (trials completed per second, where
  the time a failed trial took, and the restart of the worker that ran it, count as lost);
- the GPU's compute mode lets several processes use it (not EXCLUSIVE_PROCESS).
When the last worker added did not raise the throughput, a trial ran out of memory while it
shared the GPU, or an added worker failed trial after trial quickly while the GPU's others
completed theirs (a GPU that takes one process, a framework that took the whole GPU), the limit
drops and the controller retires a worker after its trial ends.
Without readings (a GPU NVML cannot read, a fake GPU without its state folder) and without a
declared size, a GPU keeps one worker: nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

AUTO = "auto"
# Each worker is a process holding a CUDA context (hundreds of MiB) and a share of the cores;
# beyond 16 on one GPU the measured gain is a few per cent (see bench/RESULTS.md).
MAX_WORKERS_PER_GPU = 16
# An added worker whose trials fail this many times in a row, each faster than half the time a
# trial of the GPU takes to complete, is taken to be one the GPU cannot run.
QUICK_FAILURES = 3


@dataclass(frozen=True)
class PackingSettings:
    """What auto packing aims for; the defaults suit most GPUs."""

    max_per_gpu: int = MAX_WORKERS_PER_GPU
    memory_per_trial_mib: int | None = None  # declared by the user: pack by it, not by readings
    # Some trials of the GPU declare no size (a campaign's auto studies, some with gpu_memory,
    # some without): one more trial needs the declared size or the most one was seen to hold,
    # whichever is larger, since either may be the next to start.
    undeclared_too: bool = False
    busy_target_pct: float = 90.0  # a GPU this busy gets no more workers
    margin_fraction: float = 0.10  # of the GPU's memory, kept free for a trial that grows
    min_gain: float = 0.03  # one more worker must raise throughput by this fraction
    # GPUs that keep one worker, and why (a compute mode that allows one process).
    single: tuple[tuple[int, str], ...] = ()

    def single_reason(self, gpu: int) -> str:
        return next((why for index, why in self.single if index == gpu), "")


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. ``None``: the GPU cannot tell."""

    total_mib: int
    used_mib: int | None
    ours_mib: int | None  # held by this pool's workers (None: no per-process figures)
    busy_pct: float | None


@dataclass(frozen=True)
class Decision:
    """The worker count a GPU should have, and why, in words for the run log."""

    target: int
    reason: str


@dataclass
class _Segment:
    """A stretch of time during which the GPU had one worker count."""

    workers: int
    start: float
    completions: int = 0  # trials that ended within the stretch and did their work
    ended: int = 0  # every trial that ended within it, failed ones too
    # The trials that ran wholly within the stretch (counting it with work done before it
    # began would credit it with the count before): how many, how many of them completed,
    # and the worker time they took, with the restarts of workers after failed ones.
    whole: int = 0
    whole_completed: int = 0
    worker_seconds: float = 0.0
    busy: list[float] = field(default_factory=list)  # utilisation read during the stretch

    def mean_busy(self) -> float | None:
        return sum(self.busy) / len(self.busy) if self.busy else None

    def rate(self, restarting: float = 0.0) -> float | None:
        """Trials completed per second with every worker at work: the workers over the worker
        time one completed trial took, failed trials and restarts included (so a worker that
        fails every trial adds time and no trial); ``restarting``: seconds of restarts not
        over yet."""
        seconds = self.worker_seconds + restarting
        return self.workers * self.whole_completed / seconds if seconds > 0 else None


@dataclass
class GpuPacker:
    """The worker count of one GPU under auto packing."""

    name: str  # "gpu0", for messages
    settings: PackingSettings
    workers: int = 1
    limit: int = 0  # set from the settings; lowered by out-of-memory and by throughput
    peak_mib: int = 0  # the most one trial was seen to hold on this GPU
    pending: bool = True  # a worker is starting: no decision until it is ready
    _segment: _Segment = field(default_factory=lambda: _Segment(1, 0.0))
    _rates: dict[int, float] = field(default_factory=dict)
    _completed_in: list[float] = field(default_factory=list)  # the last trials' durations
    _held_for: str = ""
    _lowered_because: str = "the most workers one GPU may have"

    def __post_init__(self) -> None:
        self.limit = self.limit or self.settings.max_per_gpu

    def keep_one(self, why: str) -> Decision:
        """The GPU takes one worker whatever its readings say, for the reason ``why``: the
        decision to say at once (and not again)."""
        self.limit, self._lowered_because, self._held_for = 1, why, "limit"
        return Decision(1, f"stays at 1: {why}")

    # ----- what happened ----------------------------------------------------------------

    def ready(self, workers: int, now: float) -> None:
        """Every worker of the GPU is ready with ``workers`` of them: measure from now."""
        self.workers, self.pending = workers, False
        self._segment = _Segment(workers, now)

    def observe_trial_memory(self, mib: int) -> None:
        self.peak_mib = max(self.peak_mib, int(mib))

    def trial_ended(
        self, started: float, now: float, failed: bool = False, restart: float = 0.0
    ) -> None:
        """A trial that began at ``started`` ended at ``now``; ``restart``: the seconds its
        worker spent restarting after a failed trial before it began."""
        segment = self._segment
        segment.ended += 1
        if started - restart >= segment.start:
            segment.whole += 1
            segment.whole_completed += not failed
            segment.worker_seconds += now - started + restart
        if not failed:
            segment.completions += 1
            self._completed_in = [*self._completed_in[-19:], now - started]

    def quick_failure(self, seconds: float) -> bool:
        """Whether a trial that failed after ``seconds`` failed quickly: in less than half the
        time the GPU's completed trials took (never before one completed: then every worker
        fails alike, and packing is not to blame)."""
        if not self._completed_in:
            return False
        typical = sorted(self._completed_in)[len(self._completed_in) // 2]
        return seconds < typical / 2

    def failing_worker(self, slot: str) -> None:
        """An added worker (``slot``) failed QUICK_FAILURES trials in a row, quickly, while
        the GPU's others completed theirs: the GPU keeps fewer workers than it has now."""
        if self.workers <= 1:
            return
        self.limit = max(1, min(self.limit, self.workers - 1))
        self._lowered_because = (
            f"{slot} failed {QUICK_FAILURES} trials in a row, each within half the time "
            "a trial completes in (a GPU that takes one process, or a framework that takes "
            "all its memory?)"
        )
        self._held_for = ""

    def out_of_memory(self, sharing: int) -> bool:
        """A trial ran out of memory while ``sharing`` trials (itself included) ran on the GPU:
        True, and the limit drops below that count, when it shared the GPU; False when it had
        the GPU alone (nothing to learn: it fails as it would anywhere)."""
        if sharing <= 1:
            return False
        self.limit = max(1, min(self.limit, sharing - 1))
        self._lowered_because = f"out of memory with {sharing} trials sharing it"
        self._held_for = ""
        return True

    # ----- what to do -------------------------------------------------------------------

    def decide(
        self, reading: GpuReading | None, now: float, restarting: tuple[float, ...] = ()
    ) -> Decision | None:
        """A new worker count, or the reason it holds when that reason is new; else None.
        ``restarting``: when the trials failed whose workers are restarting now (lost time
        the next trial's end would count)."""
        self._observe(reading)
        if reading is not None and reading.busy_pct is not None:
            self._segment.busy.append(reading.busy_pct)
        if self.pending:
            return None
        if self.workers > self.limit:
            return Decision(self.limit, f"{self._lowered_because}: at most {self.limit} from now")
        if not self._measured(now, restarting):
            return None
        slower = self._no_gain()
        if slower is not None:
            return slower
        return self._grow_or_hold(reading)

    def unhealthy(self, why: str) -> Decision | None:
        """NVML cannot read the GPU (``why``): no worker is added to it, and failures on it are
        not the packing's to learn from; said once."""
        self._segment = _Segment(self.workers, self._segment.start)  # its rate means nothing
        return self._hold("unhealthy", f"stays at {self.workers}: {why}")

    def _measured(self, now: float, restarting: tuple[float, ...]) -> bool:
        """Enough trials ended at this count to compare its throughput: two rounds of them, one
        of which ran wholly at this count."""
        segment = self._segment
        if segment.ended < 2 * segment.workers or segment.whole < segment.workers:
            return False
        rate = segment.rate(sum(now - max(t, segment.start) for t in restarting))
        if rate is not None:
            self._rates[segment.workers] = rate
        return rate is not None

    def _no_gain(self) -> Decision | None:
        n = self.workers
        now_rate, before = self._rates.get(n), self._rates.get(n - 1)
        if now_rate is None or before is None or now_rate >= before * (1 + self.settings.min_gain):
            return None
        self.limit = n - 1
        self._lowered_because = f"{n} workers ran no more trials per second than {n - 1}"
        return Decision(
            n - 1,
            f"{n} workers ran {now_rate:.3g} trials/s, {n - 1} ran {before:.3g}: "
            "more no longer helps",
        )

    def _grow_or_hold(self, reading: GpuReading | None) -> Decision | None:
        n = self.workers
        if n >= self.limit:
            return self._hold("limit", f"stays at {n}: {self._lowered_because}")
        if not self._segment.completions:
            return self._hold("failing", f"stays at {n}: no trial completed at this count")
        per_trial = self._per_trial_mib(reading)
        if per_trial is None and reading is not None and reading.used_mib is not None:
            return None  # readings, but no trial seen holding memory yet: wait for one
        if reading is None or reading.total_mib <= 0 or per_trial is None:
            return self._hold(
                "blind",
                f"stays at {n}: no memory readings (pass --trials-per-gpu N, or --gpu-memory "
                'SIZE, to choose; in a campaign, slot = { gpu_memory = "SIZE" })',
            )
        total = reading.total_mib
        used = reading.used_mib if reading.used_mib is not None else n * per_trial
        memory = f"{100 * used / total:.0f} % memory"
        # Busy over the whole stretch at this count: one reading may fall between trials.
        mean_busy = self._segment.mean_busy()
        busy = "" if mean_busy is None else f", {mean_busy:.0f} % busy"
        if self._projected_mib(reading, per_trial) + self.settings.margin_fraction * total > total:
            return self._hold("memory", f"stays at {n}: no room for one more trial ({memory})")
        if mean_busy is not None and mean_busy >= self.settings.busy_target_pct:
            return self._hold("busy", f"stays at {n}: busy ({memory}{busy})")
        self._held_for = ""
        return Decision(n + 1, f"{memory}{busy}")

    def _per_trial_mib(self, reading: GpuReading | None) -> float | None:
        """The memory one more trial needs: the declared size, else the most one trial held."""
        declared = self.settings.memory_per_trial_mib
        if declared and not self.settings.undeclared_too:
            return float(declared)
        if reading is None or reading.used_mib is None:
            return None  # nothing read: nothing is guessed
        if not self.peak_mib:
            return None  # no trial seen holding memory yet
        return float(max(self.peak_mib, declared or 0))

    def _observe(self, reading: GpuReading | None) -> None:
        if reading is None or reading.used_mib is None or reading.ours_mib is not None:
            return  # per-process figures come through observe_trial_memory
        if reading.used_mib > 0 and not self.pending:
            # Without them everything in use counts as our trials' (too much when others use
            # the GPU, which only makes packing more careful).
            self.observe_trial_memory(reading.used_mib // max(1, self.workers))

    def _projected_mib(self, reading: GpuReading, per_trial: float) -> float:
        """Memory in use with one more trial: others' memory stays taken, and each of our
        trials is counted at the most one was seen to hold (or the declared size)."""
        n = self.workers
        if reading.used_mib is None:  # declared sizes only (Apple MPS): ours is all there is
            return (n + 1) * per_trial
        used = reading.used_mib
        ours = reading.ours_mib if reading.ours_mib is not None else min(used, n * per_trial)
        others = max(0.0, used - ours)
        return others + (n + 1) * per_trial

    def _hold(self, why: str, text: str) -> Decision | None:
        if why == self._held_for:
            return None
        self._held_for = why
        return Decision(self.workers, text)


def parse_trials_per_gpu(value: int | str) -> int | str:
    """``"auto"`` or a whole number of 1 or more, from a flag, a keyword or a file."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ValueError(value)
    return int(value)
