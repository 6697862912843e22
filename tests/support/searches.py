"""A search through ``hyperfleet.optimize`` on a few CPU slots, as several tests run one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna

import hyperfleet
from hyperfleet.resources.inventory import Inventory


def cpu_slots(count: int) -> Inventory:
    """An inventory of ``count`` CPU slots on the cores this process may use (shared when
    there are fewer cores than slots)."""
    cores = sorted(os.sched_getaffinity(0))
    return Inventory(gpus=(), cores=tuple(cores[i % len(cores)] for i in range(count)))


def optimize_on_cpu_slots(
    study: optuna.Study,
    objective: object,
    n_trials: int,
    slots: int,
    run_dir: Path,
    **options: Any,
) -> None:
    """Run the search quietly, without a report, with ``options`` for ``hyperfleet.optimize``;
    it must complete."""
    outcome = hyperfleet.optimize(
        study,
        objective,  # type: ignore[arg-type]
        n_trials=n_trials,
        run_dir=run_dir,
        display="quiet",
        report=False,
        inventory=cpu_slots(slots),
        cpu_slots=slots,
        **options,
    )
    assert outcome.status == "completed", outcome.message
