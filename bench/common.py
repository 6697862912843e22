"""What several benchmarks share: journals, a big study built fast, Optuna processes side by side,
killing a controller and running it again.

Benchmarks run as scripts (``python bench/NAME.py``), so this folder is on ``sys.path`` and they
import this module by name.
"""

from __future__ import annotations

import compileall
import multiprocessing
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

import hyperfleet  # where this run finds it (PYTHONPATH too): its bytecode is written

PARAMS = {f"x{i}": FloatDistribution(-10.0, 10.0) for i in range(4)}  # a big study's space


def _compile_hyperfleet() -> None:
    """Write hyperfleet's bytecode (``.pyc``) before anything is timed, as ``pip install``
    does. An editable install where ``PYTHONDONTWRITEBYTECODE`` is set has none, and every
    process then compiled hyperfleet's modules from source: 0.2 s of the controller's start
    and some of every worker's, which Optuna's runners (installed with their bytecode) did
    not pay."""
    compileall.compile_dir(Path(hyperfleet.__file__).parent, quiet=1)


_compile_hyperfleet()


def bench_sampler(name: str) -> optuna.samplers.BaseSampler:
    """The sampler every runner of a side-by-side bench uses: "random", else TPE with constant
    liar (what several workers at once need)."""
    if name == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler(constant_liar=True)


def journal(path: Path) -> JournalStorage:
    """Optuna's own journal file storage, as a plain Optuna user opens it."""
    return JournalStorage(JournalFileBackend(str(path)))


def build_journal(path: Path, study_name: str, n_trials: int) -> None:
    """A journal of ``n_trials`` finished trials over :data:`PARAMS`, written by plain Optuna."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=journal(path))
    rng = random.Random(n_trials)
    study.add_trials(
        optuna.trial.create_trial(
            params={name: rng.uniform(-10.0, 10.0) for name in PARAMS},
            distributions=PARAMS,
            value=rng.uniform(0.0, 400.0),
        )
        for _ in range(n_trials)
    )


_RUNS_ROOT: tempfile.TemporaryDirectory[str] | None = None


def run_folder(prefix: str = "run-") -> Path:
    """A fresh folder for one run, removed when the benchmark exits and never earlier.

    Deleting a run's thousands of trial files just before the next run made that run's own file
    creations slow: ext4 passes over inodes freed in the last minutes when it allocates one
    (``recently_deleted`` took two fifths of the machine's time in a profile), which showed as
    swings of 2x between runs of the same code. So nothing is deleted while a benchmark
    measures."""
    global _RUNS_ROOT
    if _RUNS_ROOT is None:  # its finalizer removes it all when the interpreter exits
        _RUNS_ROOT = tempfile.TemporaryDirectory(prefix="hyperfleet-bench-")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_RUNS_ROOT.name))


def scratch() -> str | None:
    # Each trial is an fsynced append: 10,000 of them take a minute on a disk, seconds on tmpfs.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def run_processes(target: Callable[..., None], args: Sequence[tuple[Any, ...]]) -> None:
    """One spawned process per ``args`` entry running ``target``, all at once, to the end: the
    launcher people write by hand around ``study.optimize``."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=each) for each in args]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"an Optuna process exited with {process.exitcode}")


POLL = 0.02  # seconds between looks at a condition


def wait_for(condition: Callable[[], object], timeout: float) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL)
    return bool(condition())


def _processes_of_run(run_dir: Path) -> list[str]:
    # The tests' own leftover check; the benchmarks that kill put tests/ on sys.path.
    from support.procs import processes_of_run

    return processes_of_run(run_dir)


def kill_round(
    cmd: list[str], env: dict[str, str], kill_point: Callable[[], bool]
) -> tuple[bool, str]:
    """Start the controller ``cmd``, wait for ``kill_point()`` (60 s at most), SIGKILL it and
    check its workers are gone within 10 s. (killed, problem): not killed when the controller
    ended first; a problem when it failed, made no progress or left workers."""
    run_dir = Path(cmd[cmd.index("--run-dir") + 1])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reached = wait_for(lambda: kill_point() or proc.poll() is not None, 60)
    if proc.poll() is not None:
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        proc.wait()
        if proc.returncode != 0:
            return False, f"controller exited with {proc.returncode}: {stderr.strip()[-500:]}"
        return False, ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    problem = "" if reached else "no progress within 60s"
    if not wait_for(lambda: not _processes_of_run(run_dir), 10):
        problem += f" workers left after the kill: {_processes_of_run(run_dir)}"
    return True, problem.strip()


def final_run(cmd: list[str], env: dict[str, str]) -> str:
    """Run the controller ``cmd`` to the end after the kills: a problem if it failed, else ''."""
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if final.returncode != 0:
        return f"final run exited with {final.returncode}: {final.stderr[-500:]}"
    return ""
