"""On a real NVIDIA GPU with PyTorch: each worker sees its own GPU through CUDA, training runs
concurrently, workers can share a GPU, and the CUDA cache is freed between trials.

Every test here is marked ``gpu`` and skips, saying why, unless PyTorch is built with CUDA, NVML
finds a GPU and torch can use it in a fresh process (not with a driver older than the CUDA torch
was built for). This module never initialises CUDA itself: only the workers and that child do.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.resources.inventory import FAKE_GPUS_ENV, Inventory, detect_inventory

OBJECTIVES = Path(__file__).parent / "objectives"


def _torch_has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.version.cuda is not None  # a CUDA build; asks the driver nothing


# Run in a fresh process, as a worker would: whether torch can use CUDA there, and if not the
# warning torch gave (a driver older than the CUDA it was built for says so).
_CUDA_CHECK = """
import sys, warnings
warnings.simplefilter("always")
import torch
ok = torch.cuda.is_available()
print("ok" if ok else "no", flush=True)
"""


def _why_no_gpu() -> str:
    """Why the GPU tests cannot run here, in one line; "" when they can. This process never
    initialises CUDA: a child asks torch."""
    if os.environ.get(FAKE_GPUS_ENV):
        return f"{FAKE_GPUS_ENV} is set: fake GPUs only"
    if not _torch_has_cuda():
        return "needs PyTorch built with CUDA"
    inventory = detect_inventory()
    if not any(g.kind == "cuda" for g in inventory.gpus):
        return f"needs an NVIDIA GPU ({inventory.note.splitlines()[0]})"
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CUDA_CHECK], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "torch did not answer whether it can use CUDA within 120 s"
    if child.stdout.strip() == "ok":
        return ""
    lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
    said = [line for line in lines if "Warning" in line or "Error" in line] or lines or ["-"]
    return (
        "NVML lists a GPU but torch.cuda.is_available() is False in a fresh process (a driver "
        f"older than the CUDA torch was built for?): {said[-1]}"
    )


WHY_NO_GPU = _why_no_gpu()
INVENTORY = None if WHY_NO_GPU else detect_inventory()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(bool(WHY_NO_GPU), reason=WHY_NO_GPU),
]


@pytest.fixture
def gpu_torch(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    return importlib.import_module("gpu_torch")


def gpus() -> Inventory:
    assert INVENTORY is not None
    return INVENTORY


def run(study: optuna.Study, objective: Any, n_trials: int, tmp_path: Path, **pool: Any) -> None:
    outcome = hyperfleet.optimize(
        study,
        objective,
        n_trials=n_trials,
        run_dir=tmp_path / "run",
        display="quiet",
        inventory=gpus(),
        cpu_slots=0,
        **pool,
    )
    assert outcome.status == "completed"
    failed = [t.system_attrs for t in study.get_trials() if t.state != TrialState.COMPLETE]
    assert not failed, failed


def test_each_worker_sees_only_its_own_gpu(gpu_torch: ModuleType, tmp_path: Path) -> None:
    parties = len(gpus().gpus)
    study = optuna.create_study()
    run(
        study,
        gpu_torch.make_trainer,
        parties,
        tmp_path,
        objective_kwargs={"barrier_dir": str(tmp_path / "barrier"), "parties": parties},
    )

    names = {g.index: g.name for g in gpus().gpus}
    seen = [t.user_attrs for t in study.get_trials()]
    assert sorted(s["slot_gpus"][0] for s in seen) == sorted(names)
    for s in seen:
        assert s["device_count"] == 1
        assert s["cuda_visible_devices"] == s["slot_uuids"][0]  # pinned by UUID
        assert s["device_uuid"] == s["slot_uuids"][0]
        assert s["device_name"] == names[s["slot_gpus"][0]]
        assert s["parameters_on"] == "cuda:0"


def test_two_workers_train_at_once_on_one_gpu(gpu_torch: ModuleType, tmp_path: Path) -> None:
    first = gpus().gpus[0]
    study = optuna.create_study()
    run(
        study,
        gpu_torch.make_trainer,
        4,
        tmp_path,
        gpus=[first.index],
        trials_per_gpu=2,
        objective_kwargs={"barrier_dir": str(tmp_path / "barrier"), "parties": 2},
    )

    trials = study.get_trials()
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    for trial in trials:
        assert trial.user_attrs["device_count"] == 1
        assert trial.user_attrs["device_uuid"] == first.uuid
        assert len(trial.intermediate_values) == 5
    # Each worker's first trial waited for the other's: the two ran at the same time.
    a, b = trials[0], trials[1]
    assert a.datetime_start and b.datetime_start and a.datetime_complete and b.datetime_complete
    assert max(a.datetime_start, b.datetime_start) < min(a.datetime_complete, b.datetime_complete)


def test_cuda_cache_is_freed_between_trials(gpu_torch: ModuleType, tmp_path: Path) -> None:
    study = optuna.create_study()
    run(study, gpu_torch.cache_probe, 3, tmp_path, gpus=[gpus().gpus[0].index])

    trials = study.get_trials()
    for trial in trials:
        # The trial really filled the cache, and the next one started with it empty again.
        assert trial.user_attrs["reserved_after_alloc_mib"] >= 64
        assert trial.user_attrs["reserved_at_start_mib"] == 0


def test_auto_packing_adds_workers_for_a_small_model(gpu_torch: ModuleType, tmp_path: Path) -> None:
    first = gpus().gpus[0]
    study = optuna.create_study()
    run(study, gpu_torch.small_trainer, 60, tmp_path, gpus=[first.index])  # auto: the default

    log = (tmp_path / "run" / "run.log").read_text()
    assert f"gpu{first.index}: 1 -> 2 workers" in log, log
    assert "## GPU packing" in (tmp_path / "run" / "summary.md").read_text()


def test_auto_packing_keeps_a_trial_that_takes_most_of_the_gpu_alone(
    gpu_torch: ModuleType, tmp_path: Path
) -> None:
    first = gpus().gpus[0]
    study = optuna.create_study()
    run(study, gpu_torch.most_of_the_gpu, 8, tmp_path, gpus=[first.index])

    log = (tmp_path / "run" / "run.log").read_text()
    assert "-> 2 workers" not in log, log
    assert {t.system_attrs["hyperfleet:slot"] for t in study.get_trials()} == {
        f"gpu{first.index}#0"
    }
