"""Typed settings for one run, and the parsing of durations and retry policies."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial

from hyperfleet.errors import ConfigError
from hyperfleet.resources.packing import PackingSettings

FAIL_KINDS = ("interrupted", "crash", "oom", "timeout", "error", "lost")
RETRY_KINDS = FAIL_KINDS[1:]  # an interrupted trial is always run again
# A trial whose node was lost says little about its parameters, so it runs again by default; a
# limit still stops parameters that take their node down with them from doing so for ever.
DEFAULT_RETRIES = {"lost": 3}
# Which trials' checkpoint folders outlive them once they completed or were pruned.
KEEP_CHECKPOINTS = ("best", "all", "none")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?", re.IGNORECASE)
_MIB_PER_UNIT = {
    "g": 1024.0,
    "gb": 1000**3 / 2**20,
    "gib": 1024.0,
    "m": 1.0,
    "mb": 1e6 / 2**20,
    "mib": 1.0,
}


def parse_duration(text: str | float | int | None, what: str = "timeout") -> float | None:
    """Seconds from "90", "90s", "30m", "2h" or "1h30m"; None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        seconds = _parse_duration_text(text.strip().lower(), what)
    if seconds <= 0:
        raise ConfigError(f"{what} must be positive, got {text!r}; for example 90s, 30m or 2h.")
    return seconds


def _parse_duration_text(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise ConfigError(
            f"cannot read {what} {text!r}; write seconds or a duration such as 90s, 30m, 2h "
            "or 1h30m."
        )
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def parse_memory(text: str | int | None, what: str = "gpu_memory") -> int | None:
    """MiB from "10GiB", "10GB", "512MiB" or "10G"; a bare number is MiB; None stays None."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = _MEMORY.fullmatch(str(text).strip())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(
            f"cannot read {what} {text!r}; write what one trial takes on its GPU, such as "
            "10GiB or 512MiB."
        )
    unit = (match.group(2) or "m").lower()
    return max(1, round(float(match.group(1)) * _MIB_PER_UNIT[unit]))


@dataclass(frozen=True)
class RetryPolicy:
    """How many times a failed trial's parameters are tried again, per reason.

    An interrupted trial (the controller stopped or died while it ran) is not part of the
    policy: an interruption says nothing about the trial, so it is always run again and never
    counts against a limit. A trial lost with its node runs again up to
    ``DEFAULT_RETRIES["lost"]`` times unless the policy says otherwise (``lost=0``).
    """

    limits: dict[str, int] = field(default_factory=dict)

    def allows(self, kind: str, retries_so_far: int) -> bool:
        """May a trial that failed with ``kind`` run again, after ``retries_so_far`` earlier
        failures of that same kind in its chain of repeats?"""
        if kind == "interrupted":
            return True
        return retries_so_far < self.limits.get(kind, DEFAULT_RETRIES.get(kind, 0))

    @classmethod
    def parse(cls, text: str) -> RetryPolicy:
        """From "crash=2,oom=1,error=0"; reasons not named are not retried."""
        limits: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, number = item.partition("=")
            kind = kind.strip()
            if kind == "interrupted":
                raise ConfigError(
                    f"retry rule {item!r} is not needed: interrupted trials are always run "
                    "again and never count against a limit; remove it from the retry rules."
                )
            if kind not in RETRY_KINDS or not number.strip().isdigit():
                raise ConfigError(
                    f"cannot read retry rule {item!r}; write REASON=MAX with REASON one of "
                    f"{', '.join(RETRY_KINDS)}, for example --retry crash=2,oom=1."
                )
            limits[kind] = int(number)
        return cls(limits)


@dataclass(frozen=True)
class RunSettings:
    n_trials: int | None = None
    timeout: float | None = None
    trial_timeout: float | None = None
    kill_grace: float = 5.0  # seconds between SIGTERM and SIGKILL for a trial's processes
    stop_grace: float = 30.0  # seconds between SIGTERM's soft stop and its hard stop
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_trials_per_worker: int | None = None
    keep_checkpoints: str = "best"
    packing: PackingSettings | None = None  # None: the workers per GPU are fixed
    # Optuna's callbacks of a single search, called with (study, frozen_trial) as each trial
    # ends (see controller.callbacks); a campaign's studies each have their own.
    callbacks: tuple[Callable[[optuna.Study, FrozenTrial], None], ...] = ()
    # Sampler processes beside the controller for TPE studies (controller.sampler_pool);
    # None or 0 (the default): none, the controller samples every trial.
    sampling_processes: int | None = None

    def __post_init__(self) -> None:
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            raise ConfigError(
                f"keep_checkpoints={self.keep_checkpoints!r} is not one of "
                f"{', '.join(KEEP_CHECKPOINTS)}; pass --keep-checkpoints best, all or none."
            )
        if self.sampling_processes is not None and self.sampling_processes < 0:
            raise ConfigError(
                f"sampling_processes={self.sampling_processes} must be 0 or more; pass "
                "--sampling-processes 0 to sample on the controller alone."
            )
        for name in ("n_trials", "max_trials_per_worker"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = name.replace("_", "-")
                raise ConfigError(f"{name}={value} must be at least 1; pass --{flag} 1 or more.")
