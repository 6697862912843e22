"""Start-up: a pool larger than the machine can run is refused before anything is written, and
a stop asked while the workers are still starting is obeyed at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hyperfleet.errors import ResourceError
from hyperfleet.resources.inventory import Gpu, Inventory, max_workers
from hyperfleet.resources.shapes import PoolSpec, Shape, plan_pool
from hyperfleet.resources.slots import PoolOptions, plan_slots
from support.procs import assert_no_leftovers, cpu_only_env, run_cli, wait_until


def _machine(n_gpus: int, n_cores: int) -> Inventory:
    gpus = tuple(Gpu(i, f"GPU-fake-{i}", "fake", kind="fake") for i in range(n_gpus))
    return Inventory(gpus=gpus, cores=tuple(range(n_cores)))


def test_a_huge_trials_per_gpu_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "objective.py").write_text("def objective(trial):\n    return 1.0\n")
    env = {**cpu_only_env(), "HYPERFLEET_FAKE_GPUS": "2"}
    started = time.monotonic()
    done = run_cli(
        ["run", "objective.py:objective", "--n-trials", "1", "--trials-per-gpu", "10000"],
        tmp_path,
        env=env,
    )

    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1
    limit, _ = max_workers(_machine(0, len(os.sched_getaffinity(0))))
    assert "--trials-per-gpu 10000 make 20000 slots" in message
    assert f"at most {limit}" in message
    assert f"pass --trials-per-gpu {limit // 2} or less" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objective.py"]  # no run folder


def test_the_limit_counts_cpu_slots_and_names_the_flag_to_lower() -> None:
    machine = _machine(1, 2)
    limit, why = max_workers(machine)
    assert why.startswith("16 per core") or "MiB each" in why

    with pytest.raises(ResourceError, match=rf"--cpu-slots {limit - 1} or less"):
        plan_slots(machine, PoolOptions(cpu_slots=limit))
    assert len(plan_slots(machine, PoolOptions(cpu_slots=limit - 1))) == limit


def test_a_campaign_pool_counts_the_slots_of_every_shape() -> None:
    machine = _machine(2, 1)
    limit, _ = max_workers(machine)  # 16 on one core
    quarter, half = Shape(gpus=0.25), Shape(gpus=0.5)
    assert len(plan_pool(machine, PoolSpec(cpu_slots=0), [quarter, half]).slots) == 12

    # Each shape alone fits; together (and with the CPU slots) they do not.
    shapes = [quarter, half, Shape(gpus=1 / 8)]
    with pytest.raises(ResourceError, match=r"the pool's 3 slot shapes make 28 slots"):
        plan_pool(machine, PoolSpec(cpu_slots=0), shapes)
    assert limit < 28


# The objective closes over a data set, so it is sent to each worker with its setup, which the
# controller writes while the worker starts: starting many workers takes seconds.
SCRIPT = """
import os
import sys

import optuna

import hyperfleet


def main() -> None:
    data = os.urandom(1 << 20)

    def objective(trial):
        return trial.suggest_float("x", 0.0, 1.0) + len(data) * 0.0

    outcome = hyperfleet.optimize(
        optuna.create_study(), objective, n_trials=1000, trials_per_gpu={per_gpu}, cpu_slots=0,
        run_dir="run", display="plain", report=False,
    )
    sys.exit(130 if outcome.status == "stopped" else 0)


if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("signals", [("SIGINT", "SIGINT"), ("SIGTERM",)])
def test_a_stop_during_start_up_is_obeyed_at_once(signals: tuple[str, ...], tmp_path: Path) -> None:
    # As many workers as the limit allows, up to 30: two fake GPUs, several workers each.
    per_gpu = min(15, max_workers(_machine(2, len(os.sched_getaffinity(0))))[0] // 2)
    (tmp_path / "search.py").write_text(textwrap.dedent(SCRIPT).format(per_gpu=per_gpu))
    controller = subprocess.Popen(
        [sys.executable, "search.py"],
        cwd=tmp_path,
        env={**cpu_only_env(), "HYPERFLEET_FAKE_GPUS": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = tmp_path / "run" / "workers"
    wait_until(lambda: workers.is_dir() and any(workers.iterdir()), 60, "the first worker")

    sent = time.monotonic()
    for name in signals:
        controller.send_signal(getattr(signal, name))
    assert controller.wait(timeout=60) == 130
    took = time.monotonic() - sent

    assert took < 6, f"{took:.1f}s from the signal to the exit"
    assert_no_leftovers(tmp_path / "run", timeout=5)
