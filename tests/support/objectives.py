"""Objectives that fail in every way the issue lists, each only on trial 0 (or on the trial
``fails_in_turn`` hands it).

Before failing, each one starts a grandchild process (a sleeper whose command line holds the
trial folder, so tests can find it) and writes a line to stderr, so tests can check that the
grandchild is gone and the stderr tail was kept. Every later trial returns a number.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna

STDERR_LINE = "objective: about to fail"


class OutOfMemoryError(RuntimeError):
    """Looks like torch.OutOfMemoryError without needing torch."""


def _prepare_failure() -> None:
    # The trial runs with its folder as working directory; the sleeper names it.
    subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", os.getcwd()],
        stdin=subprocess.DEVNULL,
    )
    print(STDERR_LINE, file=sys.stderr, flush=True)


_failing_now = False  # set by fails_in_turn for the trial it hands to a failing objective


def _fails(trial: optuna.Trial) -> bool:
    trial.suggest_float("x", 0.0, 1.0)
    if trial.number != 0 and not _failing_now:
        return False
    _prepare_failure()
    return True


def raises(trial: optuna.Trial) -> float:
    if _fails(trial):
        raise ValueError("boom from the objective")
    return 1.0


def calls_sys_exit(trial: optuna.Trial) -> float:
    if _fails(trial):
        sys.exit(3)
    return 1.0


def calls_os_exit(trial: optuna.Trial) -> float:
    if _fails(trial):
        os._exit(7)
    return 1.0


def segfaults(trial: optuna.Trial) -> float:
    if _fails(trial):
        ctypes.string_at(0)
    return 1.0


def killed_from_outside(trial: optuna.Trial) -> float:
    if _fails(trial):
        # Another process sends SIGKILL, as the kernel's out-of-memory killer does.
        killer = "import os, signal, sys; os.kill(int(sys.argv[1]), signal.SIGKILL)"
        subprocess.run([sys.executable, "-c", killer, str(os.getpid())], check=False)
        time.sleep(60)  # never reached: the kill above ends this process
    return 1.0


def returns_none(trial: optuna.Trial) -> Any:
    return None if _fails(trial) else 1.0


def returns_nan(trial: optuna.Trial) -> float:
    return math.nan if _fails(trial) else 1.0


def returns_string(trial: optuna.Trial) -> Any:
    return "not a number" if _fails(trial) else 1.0


def returns_numeric_string(trial: optuna.Trial) -> Any:
    return "1.5" if _fails(trial) else 1.0


def returns_huge_int(trial: optuna.Trial) -> Any:
    return 10**400 if _fails(trial) else 1.0


def returns_string_among_two(trial: optuna.Trial) -> Any:
    """For a study with two objectives."""
    return (1.0, "2.0") if _fails(trial) else (1.0, 2.0)


def tells_itself(trial: optuna.Trial) -> Any:
    """Calls the study's tell on its own trial, as ask-and-tell code might."""
    if _fails(trial):
        trial.study.tell(trial.number, 5.0)
    return 1.0


def returns_a_dict(trial: optuna.Trial) -> Any:
    return {"accuracy": 0.9} if _fails(trial) else 1.0


def returns_one_of_two(trial: optuna.Trial) -> Any:
    """For a study with two objectives."""
    return 1.0 if _fails(trial) else (1.0, 2.0)


def returns_unsendable(trial: optuna.Trial) -> Any:
    return threading.Lock() if _fails(trial) else 1.0


def runs_too_long(trial: optuna.Trial) -> float:
    if _fails(trial):
        # Ignore the polite SIGTERM, so only the SIGKILL after the grace period ends it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(120)
    return 1.0


def runs_out_of_memory(trial: optuna.Trial) -> float:
    if _fails(trial):
        raise OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity; "
            "13.20 GiB already allocated)"
        )
    return 1.0


def fails_in_turn(trial: optuna.Trial) -> Any:
    """Trial 2k fails as the objective named by the k-th name of $FAILURES (comma-separated)
    fails on its trial 0; every odd trial returns what that objective returns after its
    failure. One search then shows many failures, each followed by a trial on a fresh worker."""
    global _failing_now
    names = os.environ["FAILURES"].split(",")
    index, after_failure = divmod(trial.number, 2)
    _failing_now = not after_failure
    return globals()[names[min(index, len(names) - 1)]](trial)


def crashes_always(trial: optuna.Trial) -> float:
    """Crashes on every trial: for retry limits."""
    trial.suggest_float("x", 0.0, 1.0)
    os._exit(9)


def raises_always(trial: optuna.Trial) -> float:
    trial.suggest_float("x", 0.0, 1.0)
    raise RuntimeError("always fails")


def quick(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0) ** 2


def _log(folder: Path, line: str) -> None:
    # One short append per line: lines from parallel workers never interleave.
    with open(folder / "log", "a") as handle:
        handle.write(line + "\n")


def waits_for_release(trial: optuna.Trial) -> float:
    """Logs "start N", then runs until the test creates $TEST_FOLDER/release."""
    folder = Path(os.environ["TEST_FOLDER"])
    x = trial.suggest_float("x", 0.0, 1.0)
    _log(folder, f"start {trial.number} {x!r}")
    while not (folder / "release").exists():
        time.sleep(0.02)
    _log(folder, f"end {trial.number} {x!r}")
    return x


def short_and_logged(trial: optuna.Trial) -> float:
    """Logs "start N x" and "end N x" around a short piece of work."""
    folder = Path(os.environ["TEST_FOLDER"])
    x = trial.suggest_float("x", 0.0, 1.0)
    _log(folder, f"start {trial.number} {x!r}")
    time.sleep(0.05 + 0.1 * x)  # stands for the work
    _log(folder, f"end {trial.number} {x!r}")
    return x
