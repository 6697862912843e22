"""A search on one fake GPU under auto packing, and the packing decisions its run log shows,
for the tests of auto packing (``test_autopack``, ``test_autopack_faults``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import optuna
import pytest

import hyperfleet
from hyperfleet.resources import inventory
from hyperfleet.resources.inventory import FAKE_GPUS_ENV, detect_inventory

OBJECTIVES = Path(__file__).resolve().parents[1] / "objectives"
DECISION = re.compile(r"gpu0: (\d+) -> (\d+) workers?, (.*)")


def use_one_fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One fake GPU whose readings follow the trials, and the test objectives importable."""
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    monkeypatch.setenv(FAKE_GPUS_ENV, "1")
    monkeypatch.setenv(inventory.FAKE_GPU_DIR_ENV, str(tmp_path / "fake-gpus"))


def run_packed(
    tmp_path: Path,
    module: str,
    factory: str,
    n_trials: int,
    pool: dict[str, Any] | None = None,
    **model: Any,
) -> tuple[optuna.Study, list[str]]:
    """``n_trials`` of ``module.factory(**model)`` on the fake GPU; the study and run log."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    outcome = hyperfleet.optimize(
        study,
        getattr(importlib.import_module(module), factory),
        n_trials=n_trials,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
        inventory=detect_inventory(),
        cpu_slots=0,
        objective_kwargs=model,
        **(pool or {}),
    )
    assert outcome.status == "completed", outcome.message
    return study, (tmp_path / "run" / "run.log").read_text().splitlines()


def workers_over_time(log: list[str]) -> list[int]:
    """GPU 0's worker count after each decision, starting from its one worker; each decision
    starts from the count the one before it left."""
    counts = [1]
    for line in log:
        match = DECISION.search(line)
        if match:
            assert int(match.group(1)) == counts[-1], line
            counts.append(int(match.group(2)))
    return counts
