"""Helpers for tests that drive ``hyperfleet run`` as a real process and inspect what it left."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import optuna
import psutil
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

HERE = Path(__file__).resolve().parent
OBJECTIVES = HERE / "objectives.py"
WORKER_MODULE = "hyperfleet.workers.main"
BENCH = HERE.parents[1] / "bench"

T = TypeVar("T")


def cpu_only_env() -> dict[str, str]:
    """The environment for a run that uses CPU slots only, whatever GPUs this machine has."""
    env = {k: v for k, v in os.environ.items() if k != "HYPERFLEET_FAKE_GPUS"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hyperfleet.app.cli", *args]


def small_search(n_trials: int, *flags: str) -> list[str]:
    """``hyperfleet run objective.py:objective`` on two CPU slots in ``./run``, no report."""
    return cli_command(
        "run", "objective.py:objective", "--n-trials", str(n_trials),
        "--cpu-slots", "2", "--run-dir", "run", "--no-report", *flags,
    )  # fmt: skip


def run_cli(
    args: Sequence[str], cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=env or cpu_only_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def campaign_files(folder: Path, campaign: str, objective: str) -> Path:
    """``objective.py`` and ``campaign.toml`` (``campaign``, dedented) in ``folder``; the
    campaign file's path."""
    (folder / "objective.py").write_text(objective)
    path = folder / "campaign.toml"
    path.write_text(textwrap.dedent(campaign))
    return path


def signal_when(
    process: subprocess.Popen[Any], signum: int, condition: Callable[[], T], what: str
) -> T:
    """Wait for ``condition`` (90 s at most), send ``signum`` to ``process`` and wait for it to
    end (60 s at most); it is killed if it still runs then. What ``condition`` returned."""
    try:
        found = wait_until(condition, 90, what)
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return found


def bench_script(name: str) -> ModuleType:
    """``bench/NAME.py`` loaded as the module ``NAME``, to call its functions."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def objective(name: str) -> str:
    return f"{OBJECTIVES}:{name}"


def load_trials(run_dir: Path, study_name: str) -> list[FrozenTrial]:
    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    return optuna.load_study(study_name=study_name, storage=storage).get_trials()


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # polling interval of a real condition, not a synchronisation sleep


def processes_of_run(run_dir: Path) -> list[str]:
    """Live processes tied to ``run_dir``: its workers (by working directory) and anything
    whose command line names it (the objectives' grandchildren)."""
    marker = str(run_dir.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            is_worker = WORKER_MODULE in cmdline and proc.cwd().startswith(marker)
            if is_worker or (marker in cmdline and proc.pid != os.getpid()):
                found.append(f"{proc.pid}: {cmdline}")
        except psutil.Error:
            continue
    return found


def assert_no_leftovers(run_dir: Path, timeout: float = 10.0) -> None:
    """Every process of the run exits within a few seconds."""
    wait_until(lambda: not processes_of_run(run_dir), timeout, "the run's processes to exit")
