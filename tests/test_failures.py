"""A failing trial fails alone: its reason is recorded, its slot gets a fresh worker, the search
goes on, and nothing it started is left running."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from optuna.trial import TrialState

from support.objectives import STDERR_LINE
from support.procs import assert_no_leftovers, load_trials, objective, run_cli

KIND = "hyperfleet:fail_kind"
REASON = "hyperfleet:fail_reason"
SLOT = "hyperfleet:slot"
PID = "hyperfleet:worker_pid"


@dataclass(frozen=True)
class Case:
    function: str
    kind: str
    reason: str  # a piece of the recorded reason
    traceback: str = ""  # a piece of the traceback, when Python could write one
    flags: tuple[str, ...] = ()
    stderr: str = ""  # more the end of stderr must hold


CASES = [
    Case("raises", "error", "ValueError: boom from the objective", "ValueError"),
    Case("calls_sys_exit", "crash", "the objective called sys.exit(3)", "SystemExit"),
    Case("calls_os_exit", "crash", "exited with status 7"),
    Case("segfaults", "crash", "SIGSEGV", stderr="Fatal Python error: Segmentation fault"),
    Case("killed_from_outside", "crash", "SIGKILL"),
    Case("returns_none", "error", "returned None"),
    Case("returns_nan", "error", "returned NaN"),
    Case("returns_string", "error", "returned 'not a number', a string, not a number"),
    # Values that pass float() but that Optuna's tell refuses must fail the trial, not the run.
    Case("returns_numeric_string", "error", "returned '1.5', a string, not a number"),
    Case("returns_huge_int", "error", "a number too large for a float"),
    Case("returns_a_dict", "error", "a dict, not a number"),
    Case(
        "returns_string_among_two",
        "error",
        "returned '2.0', a string",
        flags=("--direction", "minimize", "--direction", "minimize"),
    ),
    # The controller tells every trial; an objective that tries is told so and fails alone.
    Case("tells_itself", "error", "trial.study.tell is not available", "RuntimeError"),
    Case(
        "returns_one_of_two",
        "error",
        "returned 1 value(s) but the study has 2 objective(s)",
        flags=("--direction", "minimize", "--direction", "minimize"),
    ),
    Case("returns_unsendable", "error", "cannot be sent back"),
    Case(
        "runs_too_long",
        "timeout",
        "per-trial limit of 1s",
        flags=("--trial-timeout", "1s", "--kill-grace", "1s"),
    ),
    Case("runs_out_of_memory", "oom", "CUDA out of memory", "OutOfMemoryError"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.function for c in CASES])
def test_a_failing_trial_fails_alone(tmp_path: Path, case: Case) -> None:
    run_dir = tmp_path / "run"
    args = ["run", objective(case.function), "--n-trials", "2", "--cpu-slots", "1", "--plain"]
    result = run_cli([*args, "--run-dir", str(run_dir), "--study-name", "s", *case.flags], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    failed, after = load_trials(run_dir, "s")
    assert failed.state == TrialState.FAIL
    assert failed.system_attrs[KIND] == case.kind
    assert case.reason in failed.system_attrs[REASON]

    saved = json.loads((run_dir / "trials" / "00000" / "result.json").read_text())
    assert saved["state"] == "FAIL"
    assert saved["fail_kind"] == case.kind
    assert case.reason in saved["reason"]
    assert STDERR_LINE in saved["stderr_tail"]
    assert case.stderr in saved["stderr_tail"]
    assert case.traceback in saved["traceback"]

    # The search went on, on the same slot, in a fresh worker.
    assert after.state == TrialState.COMPLETE
    assert after.system_attrs[SLOT] == failed.system_attrs[SLOT]
    assert after.system_attrs[PID] != failed.system_attrs[PID]
    assert_no_leftovers(run_dir)
