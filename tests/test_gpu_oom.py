"""Out of memory as each framework says it: a GPU's (torch, TensorFlow, JAX, numba, LightGBM's
OpenCL) is filed as "oom" and tells auto packing its GPU had too many trials; the host's
(MemoryError, numpy's _ArrayMemoryError) is filed as "oom" too but says nothing of the GPU."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import hyperfleet
from hyperfleet.objective.command import CommandObjective
from hyperfleet.resources import inventory
from hyperfleet.resources.inventory import FAKE_GPUS_ENV, detect_inventory
from hyperfleet.sampling.space import parse_space
from hyperfleet.store import schema

OBJECTIVES = Path(__file__).parent / "objectives"

GPU_ERRORS = [
    ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total"),
    (
        "ResourceExhaustedError",
        "{{function_node __wrapped__MatMul_device_/job:localhost/replica:0/task:0/device:GPU:0}} "
        "OOM when allocating tensor with shape[8192,8192] and type float",
    ),
    ("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB."),
    (
        "CudaAPIError",
        "[CUresult.CUDA_ERROR_OUT_OF_MEMORY] Call to cuMemAlloc results in "
        "CUDA_ERROR_OUT_OF_MEMORY",
    ),
    ("LightGBMError", "boost::compute::opencl_error: Memory Object Allocation Failure"),
    ("XGBoostError", "cudaErrorMemoryAllocation: out of memory"),
]
HOST_ERRORS = [
    ("MemoryError", ""),
    ("_ArrayMemoryError", "Unable to allocate 4.00 EiB for an array with shape (..,)"),
    ("RuntimeError", "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
    (
        "ResourceExhaustedError",
        "OOM when allocating tensor with shape[1000000,100000] on "
        "/job:localhost/replica:0/task:0/device:CPU:0",
    ),
]


@pytest.mark.parametrize(("error_type", "message"), GPU_ERRORS)
def test_each_frameworks_gpu_out_of_memory_is_recognised(error_type: str, message: str) -> None:
    assert schema.classify_error(error_type, message) == "oom"
    assert schema.out_of_memory_on(error_type, message) == "gpu"


@pytest.mark.parametrize(("error_type", "message"), HOST_ERRORS)
def test_the_hosts_out_of_memory_is_not_a_gpus(error_type: str, message: str) -> None:
    assert schema.classify_error(error_type, message) == "oom"
    assert schema.out_of_memory_on(error_type, message) == "host"


def test_other_errors_stay_errors() -> None:
    assert schema.classify_error("ValueError", "the data set is empty") == "error"
    assert schema.out_of_memory_on("ValueError", "placed on /device:CPU:0") == ""


def test_a_host_out_of_memory_beside_others_leaves_the_gpus_limit_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(OBJECTIVES))
    monkeypatch.setenv(FAKE_GPUS_ENV, "1")
    monkeypatch.setenv(inventory.FAKE_GPU_DIR_ENV, str(tmp_path / "fake-gpus"))
    failures = importlib.import_module("gpu_failures")
    study = optuna.create_study()
    outcome = hyperfleet.optimize(
        study,
        failures.make_host_oom,
        n_trials=24,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
        inventory=detect_inventory(),
        cpu_slots=0,
        gpu_memory="1000MiB",  # grow without first catching a short trial holding memory
        objective_kwargs={"every": 4},
    )
    assert outcome.status == "completed", outcome.message

    log = (tmp_path / "run" / "run.log").read_text()
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 6, log
    for trial in failed:
        assert trial.system_attrs[schema.KIND_ATTR] == "oom"
        assert trial.system_attrs[schema.REASON_ATTR].startswith("out of host memory: ")
    # Some of them ran beside another trial on the GPU, and none lowered its limit.
    assert any(_overlaps(f, t) for f in failed for t in trials if t is not f), log
    assert "out of memory with" not in log and "1 worker," not in log, log
    assert not any(t.user_attrs.get(schema.ROOM_RERUN_ATTR) for t in trials)


def _overlaps(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    if None in (a.datetime_start, a.datetime_complete, b.datetime_start, b.datetime_complete):
        return False
    return bool(
        max(a.datetime_start, b.datetime_start) < min(a.datetime_complete, b.datetime_complete)
    )  # type: ignore[type-var]


def test_a_commands_long_torch_out_of_memory_is_kept_whole_enough_to_be_filed(
    tmp_path: Path,
) -> None:
    # torch lists every process on the GPU: with many workers its line outgrows the tail kept.
    processes = " ".join(f"Process {4000 + k} has 1.20 GiB memory in use." for k in range(40))
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            print("Traceback (most recent call last):", file=sys.stderr)
            print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
                  "GPU 0 has a total capacity of 79.11 GiB of which 3.44 MiB is free. "
                  "{processes} Of the allocated memory 1.1 GiB is allocated by PyTorch.",
                  file=sys.stderr)
            sys.exit(1)
            """
        )
    )
    space = parse_space({"params": {"x": {"type": "int", "low": 0, "high": 5}}})
    objective = CommandObjective(f"{sys.executable} {script} {{x}}", space)
    study = optuna.create_study()
    hyperfleet.optimize(
        study,
        objective,
        n_trials=1,
        cpu_slots=1,
        run_dir=tmp_path / "run",
        display="quiet",
        report=False,
    )

    (trial,) = study.trials
    assert trial.state == TrialState.FAIL
    assert trial.system_attrs[schema.KIND_ATTR] == "oom", trial.system_attrs[schema.REASON_ATTR]
    reason = trial.system_attrs[schema.REASON_ATTR]
    assert "Of the allocated memory" in reason  # the end of stderr is still there
